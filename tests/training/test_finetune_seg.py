"""``nanomorph finetune-seg`` as a user runs it: tiny drawn images with exact masks, real files, real CLI."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nanomorph.contract import Contract
from tests.fixtures.cli import nanomorph
from training import finetune_seg
from training.backbones import create_backbone, load_backbone, save_backbone
from training.finetune_seg import load_segmenter, segment_image, train_segmenter
from training.models import build_unet
from training.seg_data import SegTileDataset, find_pairs, read_mask, split_indices
from training.seg_losses import DiceCELoss, pixel_confusion, scores_from_confusion

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[2]
FAST = ["--tile", "64", "--batch-size", "4", "--steps", "3", "--arch", "resnet18", "--overlays", "2"]


def draw(rng: np.random.Generator, size: int, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A noisy frame with bright lines (class 1) and, for 3 classes, dark discs (class 2); exact mask."""
    yy, xx = np.mgrid[:size, :size]
    mask = np.zeros((size, size), np.uint8)
    for _ in range(2):
        y0, y1 = rng.integers(0, size, 2)
        # A line from (0, y0) to (size, y1), 3 px thick.
        dist = np.abs((y1 - y0) * xx - size * (yy - y0)) / np.hypot(y1 - y0, size)
        mask[dist < 1.5] = 1
    if n_classes > 2:
        for _ in range(2):
            cy, cx, r = rng.integers(8, size - 8), rng.integers(8, size - 8), rng.integers(4, 8)
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = 2
    levels = np.array([100.0, 200.0, 30.0])[: max(n_classes, 2)]
    image = levels[mask] + rng.normal(0, 15, (size, size))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def make_data(root: Path, n: int = 8, size: int = 64, n_classes: int = 2, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        image, mask = draw(rng, size, n_classes)
        Image.fromarray(image).save(root / "images" / f"frame{i:02d}.png")
        Image.fromarray(mask).save(root / "masks" / f"frame{i:02d}.png")
    return root


def test_cli_end_to_end_writes_every_file(tmp_path: Path) -> None:
    data, out = make_data(tmp_path / "data"), tmp_path / "run"
    cmd = ["finetune-seg", "--encoder", "scratch", "--data", str(data),
           "--classes", "background,wire", "--labeled-images", "all", "--seed", "3", "--out", str(out), *FAST]  # fmt: skip
    proc = nanomorph(*cmd, env={"HF_HUB_OFFLINE": "1", "NANOMORPH_PLAIN_PROGRESS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "mean IoU" in proc.stdout
    for name in ("config.yaml", "metrics.json", "metrics.jsonl", "segmenter.safetensors", "classes.json",
                 "README.md", "checkpoint.pt"):  # fmt: skip
        assert (out / name).is_file(), name
    assert len(list((out / "overlays").glob("*.png"))) == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["metric_type"] == "hard (argmax)"
    assert "argmax" in (out / "README.md").read_text()
    for value in (metrics["mean_iou_foreground"], metrics["mean_dice_foreground"], metrics["pixel_accuracy"]):
        assert 0.0 <= value <= 1.0
    for scores in metrics["per_class"].values():
        assert all(0.0 <= scores[k] <= 1.0 for k in ("iou", "dice") if scores[k] is not None)
    split = metrics["split"]
    assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & set(split["test"])
    assert not set(split["train"]) & set(split["val"])
    assert sorted(split["train"] + split["val"] + split["test"]) == [f"frame{i:02d}" for i in range(8)]
    assert json.loads((out / "classes.json").read_text()) == ["background", "wire"]

    unet, meta = load_segmenter(out)
    assert meta["format"] == "nanomorph-segmenter/1" and meta["architecture"] == "resnet18"
    assert json.loads(meta["classes"]) == ["background", "wire"]
    contract = Contract.from_json(meta["contract"])
    assert (contract.tile_size, contract.tile_overlap) == (64, 16)
    assert meta["encoder_source"] == "scratch" and meta["method"] == "none"

    # A rerun with the same settings reuses the finished run; other settings are refused, not mixed.
    mtime = (out / "segmenter.safetensors").stat().st_mtime_ns
    assert nanomorph(*cmd).returncode == 0
    assert (out / "segmenter.safetensors").stat().st_mtime_ns == mtime
    refused = nanomorph(*cmd, "--seed", "4")
    assert refused.returncode == 2
    assert "--overwrite" in refused.stderr


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_precision_is_used_and_recorded(tmp_path: Path, precision: str) -> None:
    """--precision fp32 | bf16 both train (bf16 autocast runs on any CPU); metrics, config and card say which."""
    data, out = make_data(tmp_path / "data", n=4), tmp_path / "run"
    cmd = ["finetune-seg", "--encoder", "scratch", "--data", str(data), "--classes", "background,wire",
           "--out", str(out), "--precision", precision, *FAST, "--overlays", "0"]  # fmt: skip
    proc = nanomorph(*cmd)
    assert proc.returncode == 0, proc.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["train"]["precision"] == precision
    assert metrics["config"]["precision_used"] == precision
    assert f"| arithmetic | {precision}" in (out / "README.md").read_text()


def test_splits_never_overlap_and_are_nested() -> None:
    for seed in range(20):
        for k in (1, 2, 3, 5, "all"):
            s = split_indices(12, 0.3, 0.2, k, seed)
            assert not (set(s.train) & set(s.test)) and not (set(s.val) & set(s.test))
            assert not set(s.train) & set(s.val)
            assert len(s.train) >= 1
        # Same seed -> same test split for every K, and the K=2 labeled set sits inside K=5.
        small, big = split_indices(12, 0.3, 0.2, 2, seed), split_indices(12, 0.3, 0.2, 5, seed)
        assert small.test == big.test
        assert set(small.train + small.val) <= set(big.train + big.val)
    with pytest.raises(ValueError, match="only 8 of 12"):
        split_indices(12, 0.3, 0.2, 9, 0)


def test_segment_image_larger_than_tile_returns_full_size_mask() -> None:
    torch.manual_seed(0)
    unet = build_unet("resnet18", 2)
    image = np.random.default_rng(0).normal(100, 20, (200, 150)).astype(np.float32)
    contract = Contract(tile_size=64, tile_overlap=16)
    mask, probs = segment_image(unet, image, contract, "cpu")
    assert mask.shape == (200, 150) and mask.dtype == np.uint8
    assert probs.shape == (2, 200, 150)
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, atol=1e-4)
    np.testing.assert_array_equal(mask, probs.argmax(axis=0))
    # A frame smaller than the tile (not a multiple of 32) is padded and cropped back.
    small_mask, _ = segment_image(unet, image[:40, :50], contract, "cpu")
    assert small_mask.shape == (40, 50)


def test_multiclass_training_resumes_after_a_crash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    data = make_data(tmp_path / "data", n=6, n_classes=3, seed=1)
    config = {"data": data, "classes": "background,wire,particle", "encoder": "scratch", "arch": "resnet18",
              "tile": 64, "batch_size": 4, "steps": 2, "labeled_images": 2, "out": tmp_path / "run", "overlays": 1}  # fmt: skip

    def killed(*args: object, **kwargs: object) -> None:
        raise RuntimeError("killed while saving")

    # Training finishes, then the process dies before the model is written: nothing is lost.
    monkeypatch.setattr(finetune_seg, "save_segmenter", killed)
    with pytest.raises(RuntimeError, match="killed"):
        train_segmenter(config)
    assert (tmp_path / "run" / "checkpoint.pt").is_file() and not (tmp_path / "run" / "metrics.json").exists()
    monkeypatch.undo()
    with caplog.at_level(logging.INFO, logger="nanomorph.finetune_seg"):
        metrics = train_segmenter(config)
    assert "resuming" in caplog.text and "at step 2/2" in caplog.text
    assert list(metrics["per_class"]) == ["background", "wire", "particle"]
    assert metrics["n_images"] == {"train": 1, "val": 1, "test": 2}
    assert np.asarray(metrics["confusion_matrix"]).shape == (3, 3)
    assert np.asarray(metrics["confusion_matrix"]).sum() == 2 * 64 * 64
    assert 0.0 <= metrics["mean_iou_foreground"] <= 1.0
    unet, meta = load_segmenter(tmp_path / "run" / "segmenter.safetensors")
    assert unet.state_dict()["segmentation_head.0.weight"].shape[0] == 3
    assert not (tmp_path / "run" / "best.pt").exists()


def test_pretrained_backbone_loads_strictly_and_stays_frozen(tmp_path: Path) -> None:
    torch.manual_seed(1)
    backbone = create_backbone("resnet18")
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.01)  # distinguishable from any fresh random init
    contract = Contract(p_low=1.0, p_high=99.0)
    path = save_backbone(
        backbone, tmp_path / "pre" / "backbone.safetensors",
        {"architecture": "resnet18", "method": "simclr", "contract": contract.to_json(), "in_chans": 1},
    )  # fmt: skip
    data = make_data(tmp_path / "data", n=5)
    train_segmenter(
        {"data": data, "classes": "background,wire", "encoder": str(path), "freeze_encoder": True,
         "tile": 64, "batch_size": 4, "steps": 2, "out": tmp_path / "run", "overlays": 0}
    )  # fmt: skip
    unet, meta = load_segmenter(tmp_path / "run")
    assert meta["method"] == "simclr" and meta["encoder_source"] == str(path)
    saved = Contract.from_json(meta["contract"])
    assert (saved.p_low, saved.p_high, saved.tile_size) == (1.0, 99.0, 64)  # backbone's normalisation kept
    reference, _ = load_backbone(path)
    encoder_state = {k.removeprefix("encoder."): v for k, v in unet.state_dict().items()}
    for key, value in reference.state_dict().items():
        torch.testing.assert_close(encoder_state[f"model.{key}"], value, msg=key)  # frozen: unchanged
    with pytest.raises(ValueError, match="does not match the backbone"):
        train_segmenter({"data": data, "classes": "background,wire", "encoder": str(path), "arch": "resnet34",
                         "out": tmp_path / "run2"})  # fmt: skip


def test_bad_mask_values_give_a_clear_error(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", n=4)
    bad = np.zeros((64, 64), np.uint8)
    bad[5:9, 5:9] = 7
    Image.fromarray(bad).save(data / "masks" / "frame02.png")
    argv = [
        "finetune-seg",
        "--data",
        str(data),
        "--classes",
        "background,wire",
        "--out",
        str(tmp_path / "r"),
        *FAST,
    ]
    run = nanomorph(*argv)
    assert run.returncode == 2
    err = run.stderr
    assert "frame02.png" in err and "7" in err and "[0, 2)" in err
    with pytest.raises(ValueError, match="found values \\[0, 7\\]"):
        read_mask(data / "masks" / "frame02.png", 2)
    assert not (tmp_path / "r" / "metrics.json").exists()
    run = nanomorph(*argv, "--invert-fraction", "2")
    assert run.returncode == 2 and "--invert-fraction must be in [0, 1]" in run.stderr


def test_unpaired_files_are_named(tmp_path: Path) -> None:
    data = make_data(tmp_path / "data", n=3)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(data / "masks" / "orphan.png")
    with pytest.raises(ValueError, match="orphan.png has no image"):
        find_pairs(data)
    (data / "masks" / "orphan.png").unlink()
    (data / "masks" / "frame01.png").unlink()
    with pytest.raises(ValueError, match="frame01.png has no mask"):
        find_pairs(data)


def test_tiles_keep_image_and_mask_aligned() -> None:
    rng = np.random.default_rng(0)
    image, mask = draw(rng, 96, 3)
    # The image is a function of the mask here, so any misaligned flip/rotation would show.
    clean = np.array([0.1, 0.9, 0.5], np.float32)[mask]
    ds = SegTileDataset([clean], [mask], tile=64, length=32, seed=0, fg_fraction=0.5)
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (1, 64, 64) and y.shape == (64, 64)
        np.testing.assert_array_equal(x[0].numpy(), clean_of(y.numpy()))
    assert ds.sample(5)[0].tobytes() == ds.sample(5)[0].tobytes()  # reproducible per index


def test_inverted_tiles_keep_their_masks() -> None:
    """--invert-fraction: about that share of tiles come as 1 - x, the mask unchanged."""
    rng = np.random.default_rng(0)
    _, mask = draw(rng, 96, 3)
    clean = clean_of(mask)
    ds = SegTileDataset([clean], [mask], tile=64, length=200, seed=0, invert_fraction=0.5)
    inverted = 0
    for i in range(len(ds)):
        x, y = ds.sample(i)
        if np.allclose(x, 1.0 - clean_of(y)):
            inverted += 1
        else:
            np.testing.assert_array_equal(x, clean_of(y))
    assert 70 <= inverted <= 130
    with pytest.raises(ValueError, match="invert_fraction"):
        SegTileDataset([clean], [mask], tile=64, length=1, invert_fraction=1.5)


def clean_of(mask: np.ndarray) -> np.ndarray:
    return np.array([0.1, 0.9, 0.5], np.float32)[mask]


def test_loss_and_metrics_on_known_cases() -> None:
    target = torch.zeros(1, 8, 8, dtype=torch.long)
    target[0, 2:6, 2:6] = 1
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float() * 20 - 10
    loss = DiceCELoss(2)
    assert loss(perfect, target).item() < 0.01
    assert loss(-perfect, target).item() > 1.0
    truth = target[0].numpy()
    pred = np.zeros_like(truth)
    pred[2:6, 2:4] = 1  # half of the 16 foreground pixels
    scores = scores_from_confusion(pixel_confusion(truth, pred, 2), ["background", "wire"])
    assert scores["per_class"]["wire"]["iou"] == pytest.approx(0.5)
    assert scores["per_class"]["wire"]["dice"] == pytest.approx(2 * 8 / (2 * 8 + 8))
    assert scores["mean_iou_foreground"] == pytest.approx(0.5)
