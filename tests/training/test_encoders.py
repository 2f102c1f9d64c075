"""Strong starting points: ImageNet (timm) and foreign checkpoints in the layouts people download.

The checkpoints here are tiny fakes written in the real layouts: CEM500K's MoCoV2 ResNet
(``state_dict`` with ``module.encoder_q.`` / ``module.encoder_k.`` prefixes, an MLP ``fc``, the
queue), DINOv2's own ``.pth`` (``mask_token``; training checkpoints under ``teacher`` with a
``backbone.`` prefix) and a timm hub ``model.safetensors`` (with its ImageNet ``head``). Every one
has 3-channel first-layer weights that must be summed to the single TEM channel.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.fixtures.images import write_shapes
from tests.training.cls_helpers import ARCH, one_thread, write_encoder
from training.backbones import create_backbone, load_init_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread() -> Iterator[None]:
    yield from one_thread()


def _rgb(arch: str, **kwargs: Any) -> Any:
    import timm

    torch.manual_seed(0)
    return timm.create_model(arch, pretrained=False, in_chans=3, **kwargs).eval()


def write_cem500k(path: Path, arch: str = "resnet18") -> Any:
    """MoCoV2 as CEM500K released it (their ResNet-50 has the same key layout as timm's)."""
    query, key = _rgb(arch, num_classes=0), _rgb(arch, num_classes=0)
    for p in key.parameters():  # the momentum encoder differs; only encoder_q is the encoder
        p.data.add_(1.0)
    dim = int(query.num_features)
    state = {f"module.encoder_q.{k}": v for k, v in query.state_dict().items()}
    state.update({f"module.encoder_k.{k}": v for k, v in key.state_dict().items()})
    for prefix in ("module.encoder_q.fc", "module.encoder_k.fc"):  # MoCoV2's MLP projection head
        state.update({f"{prefix}.0.weight": torch.randn(dim, dim), f"{prefix}.0.bias": torch.zeros(dim),
                      f"{prefix}.2.weight": torch.randn(128, dim), f"{prefix}.2.bias": torch.zeros(128)})  # fmt: skip
    state["module.queue"] = torch.randn(128, 64)
    state["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": state, "optimizer": {"state": {}}}, path)
    return query


def _same_on_gray(model: Any, rgb: Any, size: int) -> None:
    x = torch.rand(2, 1, size, size)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), rgb(x.repeat(1, 3, 1, 1)), atol=1e-4, rtol=1e-4)


def test_cem500k_mocov2_layout_loads_the_query_encoder_summed_to_one_channel(tmp_path: Path) -> None:
    path = tmp_path / "cem500k_mocov2_resnet50_200ep.pth.tar"
    query = write_cem500k(path)
    model = create_backbone("resnet18")
    report = load_init_checkpoint(model, path)
    assert report["adapted"] == ["conv1.weight"]
    assert {k.split(".")[0] for k in report["dropped"]} == {"fc"}
    assert not report["missing"] and not report["unexpected"]
    torch.testing.assert_close(model.layer4[1].conv2.weight, query.layer4[1].conv2.weight)
    _same_on_gray(model, query, 64)  # summing RGB weights: a gray image gives the RGB net's answer


def test_dinov2_and_timm_hub_layouts(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    vit = _rgb("test_vit", num_classes=0)
    state = vit.state_dict()
    dim = state["cls_token"].shape[-1]
    # DINOv2's released backbone .pth: a bare state dict plus the masked-modelling token.
    torch.save({**state, "mask_token": torch.zeros(1, dim)}, tmp_path / "dinov2_vits14_pretrain.pth")
    # A DINO/DINOv2 training checkpoint: teacher and student, "backbone." prefix, DINO head.
    teacher = {f"backbone.{k}": v for k, v in state.items()}
    teacher["dino_head.mlp.0.weight"] = torch.randn(8, dim)
    torch.save({"teacher": teacher, "student": teacher, "iteration": 5}, tmp_path / "teacher_checkpoint.pth")
    # timm hub model.safetensors: with its ImageNet classifier head.
    hub = {k: v.contiguous() for k, v in _rgb("test_vit", num_classes=5).state_dict().items()}
    save_file(hub, str(tmp_path / "model.safetensors"))

    for name in ("dinov2_vits14_pretrain.pth", "model.safetensors"):
        model = create_backbone("test_vit")
        report = load_init_checkpoint(model, tmp_path / name)
        assert report["adapted"] == ["patch_embed.proj.weight"], name
        assert report["dropped"] in (["mask_token"], ["head.bias", "head.weight"]), report
    model = create_backbone("test_vit", str(tmp_path / "dinov2_vits14_pretrain.pth"))
    _same_on_gray(model, vit, 160)
    # The training checkpoint: the teacher's backbone is the encoder (its DINO head is not).
    model = create_backbone("test_vit", str(tmp_path / "teacher_checkpoint.pth"))
    _same_on_gray(model, vit, 160)


def test_finetune_cls_and_study_take_checkpoints_and_imagenet_side_by_side(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.fixtures.cli import nanomorph
    from training.finetune_cls import resolve_encoder, train_classifier

    data = write_shapes(tmp_path / "classification", n_per_class=5)
    ckpt = tmp_path / "cem.pth.tar"
    write_cem500k(ckpt, ARCH)
    result = train_classifier(
        {"encoder": f"{ckpt}@{ARCH}", "data": str(data), "labels_per_class": "2", "image_size": 32},
        show_progress=False,
    )
    assert result["encoder_source"] == str(ckpt) and result["method"] == "checkpoint"
    assert result["architecture"] == ARCH and 0.0 <= result["balanced_accuracy"] <= 1.0

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no network: a clear error at once, never a hang
    with pytest.raises(ValueError, match="--init PATH"):
        resolve_encoder(f"imagenet@{ARCH}")
    with pytest.raises(ValueError, match="@ARCH goes with"):
        resolve_encoder(f"{tmp_path}@{ARCH}")

    run = tmp_path / "ssl"
    write_encoder(run / "backbone.safetensors")
    out = tmp_path / "study"
    code = nanomorph(*["study", "cls", "--data", str(data), "--encoder", f"cem={ckpt}@{ARCH}",
                     "--encoder", f"ssl={run}", "--labels-per-class", "1", "--repeats", "1",
                     "--modes", "linear", "--image-size", "32", "--out", str(out)]).returncode  # fmt: skip
    assert code == 0
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["encoder"] for r in rows) == ["cem", "scratch", "ssl"]
    summary = (out / "summary.md").read_text()
    assert "| cem | linear |" in summary and "| ssl | linear |" in summary
