"""Instance-aware targets for ``finetune-seg``: ``DATA/instances/<stem>.png`` -> a boundary class.

When the data folder has ``instances/`` (uint16 particle ids, 0 = background, same stems as
``masks/``), the U-Net learns one more class, ``boundary`` (the rim of each particle, see
:func:`nanomorph.particles.instance_target`), and the saved segmenter carries the post-processing
parameters (:class:`nanomorph.particles.InstanceParams`) that export writes into the ONNX metadata.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from nanomorph.contract import Contract
from nanomorph.particles import (
    InstanceParams,
    average_precision,
    drop_small,
    finish_instances,
    grow_seeds,
    instance_evidence,
    instance_target,
    match_instances,
    seed_floor,
    seed_labels,
)
from training.seg_data import SegPair, load_pair, read_index_image, resolve_data_dir

INSTANCE_SUFFIXES = (".png", ".tif", ".tiff")


def instance_file(data: str | Path, pair: SegPair) -> Path | None:
    """``DATA/instances/<stem>.png|tif`` of a pair, None when there is none."""
    folder = resolve_data_dir(data) / "instances"
    for suffix in INSTANCE_SUFFIXES:
        path = folder / f"{pair.stem}{suffix}"
        if path.is_file():
            return path
    return None


def read_instances(path: Path) -> np.ndarray:
    """An instance-id map as int64 (H, W); a ValueError naming the file when it is not one."""
    arr = read_index_image(path, "instance map")
    if arr.ndim != 2 or arr.dtype.kind not in "uib":
        raise ValueError(f"instance map {path}: expected integer ids (H, W), got {arr.dtype} {arr.shape}")
    if arr.dtype.kind == "i" and arr.min() < 0:
        raise ValueError(f"instance map {path}: negative ids")
    return arr.astype(np.int64)


def instance_params(
    cfg: dict[str, Any], data: str | Path, pairs: list[SegPair], n_semantic: int
) -> InstanceParams | None:
    """Instance training settings, or None (``--instances off`` or no ``instances/`` folder).

    Raises:
        ValueError: ``instances/`` exists but a pair has no instance map (named).
    """
    mode = str(cfg["instances"]).lower()  # the default lives in configs/finetune-seg.yaml
    if mode == "off" or not (resolve_data_dir(data) / "instances").is_dir():
        if mode not in ("auto", "off", "on"):
            raise ValueError(f"--instances must be auto, on or off, got {mode!r}")
        if mode == "on":
            raise ValueError(f"--instances on: {resolve_data_dir(data)}/instances does not exist")
        return None
    for pair in pairs:
        if instance_file(data, pair) is None:
            raise ValueError(
                f"image {pair.image} has no instance map {resolve_data_dir(data)}/instances/{pair.stem}.png"
            )
    return InstanceParams(boundary_class=n_semantic)


def target_mask(data: str | Path, pair: SegPair, mask: np.ndarray, inst: InstanceParams | None) -> np.ndarray:
    """The training target of a pair: the class mask, or with ``inst`` the mask with particle rims."""
    if inst is None:
        return mask
    path = instance_file(data, pair)
    assert path is not None  # checked by instance_params
    ids = read_instances(path)
    if ids.shape != mask.shape:
        raise ValueError(f"instance map {path} has shape {ids.shape}, its mask {pair.mask} {mask.shape}")
    return instance_target(ids, mask, inst.boundary_class, inst.boundary_width)


def load_target_pair(
    data: str | Path, pair: SegPair, contract: Contract, n_semantic: int, inst: InstanceParams | None
) -> tuple[np.ndarray, np.ndarray]:
    """``load_pair`` with the instance-aware target."""
    image, mask = load_pair(pair, contract, n_semantic)
    return image, target_mask(data, pair, mask, inst)


# ------------------------------------------------------------------- post-processing choice
#: What ``finetune-seg`` tries on its validation images (every combination; see tune_instances).
#: Areas in native px, from specks to particles ~50 px across: on EMPS (particles ~30-250 px across)
#: an 800-step U-Net's choice sat at the largest areas of the grid twice as the grid grew (64 / 128,
#: then 256 / 512 px), so it reaches to 1024 / 2048.
#: ``min_seed_fraction`` (a floor relative to each image's typical seed) joined on 2026-12-01: on EMPS the
#: best absolute floor (256 px) dropped every particle of the frames with 15-30 px particles.
#: Each entry's first value is InstanceParams' default (what models used before tuning).
TUNING_GRID: dict[str, tuple[Any, ...]] = {  # keys in _score_combos' loop order
    "smoothing": (0.0, 1.0, 2.0),
    "seed_threshold": (0.5, 0.7, 0.9),
    "min_seed_area": (4, 16, 64, 256, 1024),
    "min_seed_fraction": (0.0, 0.05, 0.1, 0.2),
    "keep_unseeded": (True, False),
    "min_area": (8, 32, 128, 512, 2048),
}


@dataclass
class InstanceTuning:
    """The validation-chosen post-processing and how it scored (mean AP@0.5 over the images)."""

    params: InstanceParams
    images: int
    particles: int  # in the validation instance maps: few of them make the choice a guess
    candidates: int
    ap50: float
    ap50_default: float  # the parameters models used before tuning (InstanceParams' defaults)

    def to_dict(self) -> dict[str, Any]:
        return {
            "chosen": self.params.to_dict(), "images": self.images, "particles": self.particles,
            "candidates": self.candidates,
            "val_ap50": round(self.ap50, 4), "val_ap50_default": round(self.ap50_default, 4),
        }  # fmt: skip


def tune_instances(pairs: Iterable[tuple[np.ndarray, np.ndarray]], base: InstanceParams) -> InstanceTuning:
    """Chooses the post-processing with the best mean AP@0.5 on ``(probs, instance ids)`` pairs.

    Every combination of :data:`TUNING_GRID` is scored on every pair, one image at a time (nothing
    is kept but the sums). The watershed, the costly step, runs once per (smoothing, seed threshold,
    seed floor): size rules (absolute and relative minimum seed) that keep the same seeds share it and
    its scores; the rest are cheap filters of it. The defaults
    are the grid's first combination, so their score comes with the rest and ties keep them. The
    steps are :func:`nanomorph.particles.instances_from_probs`' own, so the score is what
    ``predict`` and the service get with the chosen parameters.
    """
    combos = list(itertools.product(*TUNING_GRID.values()))
    totals = dict.fromkeys(combos, 0.0)
    n, particles = 0, 0
    for probs, truth in pairs:
        n += 1
        particles += len(np.unique(truth)) - int((truth == 0).any())
        for combo, ap in _score_combos(probs, truth, base.boundary_class).items():
            totals[combo] += ap
    if n == 0:
        raise ValueError("no validation images with instance maps to choose the post-processing on")
    best = max(combos, key=lambda c: totals[c])  # max keeps the first of equals
    params = replace(base, **dict(zip(TUNING_GRID, best, strict=True)))
    default = tuple(getattr(InstanceParams(), name) for name in TUNING_GRID)
    return InstanceTuning(params, n, particles, len(combos), totals[best] / n, totals[default] / n)


def _score_combos(probs: np.ndarray, truth: np.ndarray, boundary_class: int) -> dict[tuple[Any, ...], float]:
    """AP@0.5 of every combination of :data:`TUNING_GRID` on one image, keyed in its order."""
    grid = TUNING_GRID
    scores = {}
    for smoothing in grid["smoothing"]:
        fg, inner, rim = instance_evidence(probs, boundary_class, smoothing)
        for threshold in grid["seed_threshold"]:
            seeds = seed_labels(fg, inner, threshold)
            # Size rules that keep the same seeds (the same floor) share one watershed and its scores.
            by_floor: dict[int, dict[tuple[bool, int], float]] = {}
            for min_seed, fraction in itertools.product(grid["min_seed_area"], grid["min_seed_fraction"]):
                floor = seed_floor(seeds, min_seed, fraction)
                if floor not in by_floor:
                    grown = grow_seeds(fg, rim, drop_small(seeds, floor))
                    by_floor[floor] = {
                        (keep, min_area): _ap50(truth, finish_instances(fg, grown, keep, min_area))
                        for keep, min_area in itertools.product(grid["keep_unseeded"], grid["min_area"])
                    }
                for (keep, min_area), ap in by_floor[floor].items():
                    scores[(smoothing, threshold, min_seed, fraction, keep, min_area)] = ap
    return scores


def _ap50(truth: np.ndarray, pred: np.ndarray) -> float:
    return average_precision(match_instances(truth, pred), 0.5)["ap"]
