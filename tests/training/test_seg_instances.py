"""``finetune-seg`` with ``segmentation/instances/``: boundary class, parameters through export to the runtime."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from skimage.draw import disk

from nanomorph.contract import read_image
from nanomorph.particles import BOUNDARY_CLASS, InstanceParams, instance_target
from nanomorph.runtime import Segmenter
from nanomorph.store import resolve
from training.export import export_runs
from training.finetune_seg import load_segmenter, train_segmenter
from training.seg_data import find_pairs
from training.seg_instances import TUNING_GRID, instance_params

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def make_particles(root: Path, n: int = 6, size: int = 64, seed: int = 0) -> Path:
    """Bright touching disc pairs on a dark noisy ground: images/, masks/ (0/1) and instances/ (ids)."""
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        ids = np.zeros((size, size), np.uint16)
        for k, (cy, cx) in enumerate([(20, 18), (20, 35), (46, 40)]):
            ids[disk((cy + rng.integers(-2, 3), cx), 9, shape=ids.shape)] = k + 1
        image = np.where(ids > 0, 200.0, 40.0) + rng.normal(0, 10, ids.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / "images" / f"p{i}.png")
        Image.fromarray((ids > 0).astype(np.uint8)).save(root / "masks" / f"p{i}.png")
        Image.fromarray(ids).save(root / "instances" / f"p{i}.png")
    return root


def test_instances_train_a_boundary_class_that_export_and_runtime_carry(tmp_path: Path) -> None:
    data, out = make_particles(tmp_path / "data"), tmp_path / "run"
    metrics = train_segmenter(
        {"data": str(data), "classes": "background,particle", "encoder": "scratch", "arch": "resnet18",
         "tile": 64, "batch_size": 4, "steps": 3, "overlays": 1, "out": str(out), "device": "cpu"}
    )  # fmt: skip
    assert metrics["classes"] == ["background", "particle", BOUNDARY_CLASS]
    # Test scores are over the semantic mask predict returns (rim folded into the particle).
    assert list(metrics["per_class"]) == ["background", "particle"]
    assert len(metrics["confusion_matrix"]) == 2
    assert json.loads((out / "classes.json").read_text()) == ["background", "particle", BOUNDARY_CLASS]
    _, meta = load_segmenter(out)
    params = InstanceParams.from_dict(meta["instances"])
    assert params is not None and params.boundary_class == 2
    # The watershed's parameters were chosen on the validation images; the model carries those.
    assert metrics["instances"]["images"] == metrics["n_images"]["val"] > 0
    assert metrics["instances"]["chosen"] == params.to_dict()
    candidates = math.prod(len(v) for v in TUNING_GRID.values())
    assert f"validation images from {candidates} candidates" in (out / "README.md").read_text()
    untuned = train_segmenter(
        {"data": str(data), "classes": "background,particle", "encoder": "scratch", "arch": "resnet18",
         "tile": 64, "batch_size": 4, "steps": 1, "out": str(tmp_path / "untuned"), "device": "cpu",
         "tune_instances": False}
    )  # fmt: skip
    assert "instances" not in untuned
    assert InstanceParams.from_dict(load_segmenter(tmp_path / "untuned")[1]["instances"]) == InstanceParams()

    tags = export_runs(segmenter=out, name="inst", store=tmp_path / "store", version="1")
    stored = resolve(tags["segment"], tmp_path / "store")
    props = {p.key: p.value for p in onnx.load(str(stored.onnx_path)).metadata_props}
    assert InstanceParams.from_dict(props["nanomorph.instances"]) == params
    assert "boundary-watershed" in (stored.path / "README.md").read_text()
    seg = Segmenter(stored)
    assert seg.classes == ["background", "particle"] and seg.instances == params
    image, _ = read_image(data / "images" / "p0.png")
    result = seg.predict(image)
    assert result["probabilities"].shape == (3, 64, 64)
    assert result["mask"].max() <= 1 and result["instances"].dtype == np.int32


def test_instances_off_and_missing_maps(tmp_path: Path) -> None:
    data = make_particles(tmp_path / "data", n=2)
    pairs = find_pairs(data)
    assert instance_params({"instances": "off"}, data, pairs, 2) is None
    assert instance_params({"instances": "auto"}, data, pairs, 2) == InstanceParams(boundary_class=2)
    (data / "instances" / "p1.png").unlink()
    with pytest.raises(ValueError, match="p1"):
        instance_params({"instances": "auto"}, data, pairs, 2)


def test_validation_scores_the_particle_mask_not_the_rim() -> None:
    """A boundary-aware model that finds every particle pixel but draws no rim validates at IoU 1.

    Scoring the rim as a class of its own averaged its IoU (about 0 here, about 0.01 on real EM)
    into the foreground mean, so a perfect particle mask read 0.5 and selection chased rim noise.
    """
    import torch
    from torch import nn

    from nanomorph.contract import Contract, normalise
    from nanomorph.particles import instance_target
    from training.finetune_seg import evaluate

    ids = np.zeros((64, 64), np.int64)
    ids[disk((30, 22), 12, shape=ids.shape)] = 1
    ids[disk((30, 44), 12, shape=ids.shape)] = 2  # touches particle 1
    mask = (ids > 0).astype(np.uint8)
    assert (instance_target(ids, mask, 2) == 2).any()  # the rim the model leaves out

    class Interior(nn.Module):
        """Logits: particle where the frame is bright, background elsewhere, never the rim."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([10 * (1 - x), 10 * x, torch.full_like(x, -10.0)], dim=1)

    contract = Contract.from_dict({**Contract().to_dict(), "tile_size": 32, "tile_overlap": 8})
    frame = normalise(mask.astype(np.float32) * 200 + 20, contract)
    inst = InstanceParams(boundary_class=2)
    scores = evaluate(
        Interior(),
        [frame],
        [mask],
        ["background", "particle", BOUNDARY_CLASS],
        contract,
        torch.device("cpu"),
        inst=inst,
    )
    assert scores["mean_iou_foreground"] == pytest.approx(1.0)
    assert list(scores["per_class"]) == ["background", "particle"]


def test_post_processing_is_chosen_on_validation_images_and_scores_as_predict_runs_it() -> None:
    """Speckle that the default post-processing counts as particles: the tuner finds parameters
    that drop it, and its score is what ``instances_from_probs`` gives with them."""
    from nanomorph.particles import average_precision, instances_from_probs, match_instances
    from training.seg_instances import tune_instances

    rng = np.random.default_rng(0)

    def image(seed: int) -> tuple[np.ndarray, np.ndarray]:
        ids = np.zeros((96, 96), np.int64)
        for k, (cy, cx) in enumerate([(30, 30), (30, 52), (70, 60)]):  # a touching pair and one apart
            ids[disk((cy, cx + seed), 11, shape=ids.shape)] = k + 1
        target = instance_target(ids, (ids > 0).astype(np.uint8), 2)
        probs = np.eye(3, dtype=np.float32)[target].transpose(2, 0, 1)
        for _ in range(6):  # 3 x 3 "particles" on the background: seeds the defaults keep
            y, x = rng.integers(0, 93, 2)
            if not ids[y : y + 3, x : x + 3].any():
                probs[:, y : y + 3, x : x + 3] = np.array([0.0, 1.0, 0.0], np.float32)[:, None, None]
        return probs, ids

    val = [image(s) for s in range(3)]
    tuning = tune_instances(iter(val), InstanceParams(boundary_class=2))
    assert tuning.images == 3 and tuning.particles == 9
    assert tuning.candidates == math.prod(len(v) for v in TUNING_GRID.values())
    assert tuning.ap50_default < 0.75 and tuning.ap50 == pytest.approx(1.0)
    chosen = tuning.params
    assert chosen.boundary_class == 2
    assert chosen.min_area > 9 or (chosen.min_seed_area > 9 and not chosen.keep_unseeded)  # speckle gone

    def ap(params: InstanceParams) -> float:
        scores = [
            average_precision(match_instances(t, instances_from_probs(p, params)), 0.5)["ap"] for p, t in val
        ]
        return float(np.mean(scores))

    assert ap(tuning.params) == pytest.approx(tuning.ap50)
    assert ap(InstanceParams(boundary_class=2)) == pytest.approx(tuning.ap50_default)
    with pytest.raises(ValueError, match="no validation images"):
        tune_instances(iter([]), InstanceParams(boundary_class=2))
