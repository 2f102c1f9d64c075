"""``finetune-seg`` with ``segmentation/instances/``: boundary class, parameters through export to the runtime."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image
from skimage.draw import disk

from nanomorph.contract import read_image
from nanomorph.particles import BOUNDARY_CLASS, InstanceParams
from nanomorph.runtime import Segmenter
from nanomorph.store import resolve
from training.export import export_runs
from training.finetune_seg import load_segmenter, train_segmenter
from training.seg_data import find_pairs
from training.seg_instances import instance_params

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
