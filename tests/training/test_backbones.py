"""Backbones: any timm name, --init PATH with a 3-channel checkpoint, safetensors round trip."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import timm
import torch

from training.backbones import create_backbone, load_backbone, read_metadata, save_backbone

ARCH = "resnet18"


def test_single_channel_encoder_without_classifier() -> None:
    model = create_backbone(ARCH)
    out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == (2, 512)
    with pytest.raises(ValueError, match="not a timm model"):
        create_backbone("no_such_net")


def test_init_imagenet_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ValueError, match="--init PATH"):
        create_backbone(ARCH, "imagenet")
    assert time.perf_counter() - start < 5


def test_init_path_adapts_a_three_channel_checkpoint(tmp_path: Path) -> None:
    rgb = timm.create_model(ARCH, pretrained=False, in_chans=3, num_classes=10)
    # A MoCo-style wrapper as in the public CEM500K checkpoint: state_dict + module.encoder_q. prefix.
    state = {f"module.encoder_q.{k}": v for k, v in rgb.state_dict().items()}
    path = tmp_path / "moco.pth.tar"
    torch.save({"state_dict": state, "epoch": 200}, path)
    model: Any = create_backbone(ARCH, str(path))
    rgb_: Any = rgb
    expected = rgb_.conv1.weight.sum(dim=1, keepdim=True)
    assert torch.allclose(model.conv1.weight, expected)
    assert torch.equal(model.layer4[1].conv2.weight, rgb_.layer4[1].conv2.weight)
    # A gray image through the adapted conv equals the RGB net on the gray image repeated 3 times.
    x = torch.rand(1, 1, 32, 32)
    assert torch.allclose(model.conv1(x), rgb_.conv1(x.repeat(1, 3, 1, 1)), atol=1e-5)


def test_init_path_is_strict_about_other_keys(tmp_path: Path) -> None:
    state = timm.create_model(ARCH, in_chans=1, num_classes=0).state_dict()
    del state["layer1.0.conv1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="layer1.0.conv1.weight"):
        create_backbone(ARCH, str(path))
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        create_backbone(ARCH, str(tmp_path / "nope.pth"))


def test_safetensors_round_trip(tmp_path: Path) -> None:
    model = create_backbone(ARCH).eval()
    meta = {"architecture": ARCH, "in_chans": "1", "method": "simclr", "image_size": "32", "epochs": "2"}
    path = save_backbone(model, tmp_path / "backbone.safetensors", meta)
    loaded, read_meta = load_backbone(tmp_path)
    assert read_meta["architecture"] == ARCH and read_meta["method"] == "simclr"
    assert read_metadata(path)["format"] == "nanomorph-backbone/1"
    x = torch.rand(2, 1, 32, 32)
    assert torch.allclose(loaded.eval()(x), model(x))
