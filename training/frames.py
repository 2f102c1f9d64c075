"""Classification of large frames at the encoder's scale, training side.

The numbers (tiling, skipping, aggregation) live in :mod:`nanomorph.contract.frames`, shared with
the ONNX runtime and the service. This module decides the tiling a run uses — by default the
pretraining scale of ``--encoder RUN`` (its ``crop_size`` native pixels per ``image_size`` input),
overridable by flags — and maps between frames (what K counts and what is evaluated) and the
model inputs (tiles) they are cut into.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nanomorph.config import load_yaml
from nanomorph.contract import Contract, aggregate_embeddings, aggregate_probabilities

log = logging.getLogger("nanomorph.frames")

# finetune-cls / study options that set the classification tiling (None: the encoder's default).
TILING_KEYS = ("cls_tile", "cls_stride", "cls_pixel_size", "cls_min_std")


def pretraining_tile(backbone: str | Path) -> int:
    """The native crop side a pretraining run fed its encoder (``crop_size`` in its config.yaml), or 0.

    Only a crop *smaller* than the frames makes tiling meaningful; a run without config.yaml (a
    bare backbone file) gives 0.
    """
    path = Path(backbone)
    file = path / "backbone.safetensors" if path.is_dir() else path
    if file.is_file() and file.suffix == ".safetensors":  # nanomorph pretrain records its crop there
        from training.backbones import read_metadata

        try:
            crop_meta = int(read_metadata(file).get("crop_size") or 0)
        except (OSError, ValueError):
            crop_meta = 0
        if crop_meta >= 8:
            return crop_meta
    run = path if path.is_dir() else path.parent
    config = run / "config.yaml"
    if not config.is_file():
        return 0
    try:
        cfg = load_yaml(config)
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); no default classification tiling", config, exc)
        return 0
    crop = cfg.get("crop_size") or 0
    return int(crop) if cfg.get("command", "pretrain") == "pretrain" and int(crop) >= 8 else 0


def resolve_tiling(contract: Contract, source: str | None, options: dict[str, Any] | None = None) -> Contract:
    """The contract with its classification tiling settled.

    Order: explicit options (``cls_tile`` 0 disables tiling) > the encoder's own contract >
    the pretraining run's ``crop_size`` (``source`` is the backbone file of ``--encoder RUN``).
    """
    opts = {k: v for k, v in (options or {}).items() if k in TILING_KEYS and v is not None}
    changes: dict[str, Any] = {}
    if "cls_tile" in opts:
        changes["cls_tile"] = int(opts["cls_tile"])
    elif not contract.cls_tiling and source and source != "scratch":
        tile = pretraining_tile(source)
        if tile:
            log.info(
                "classifying frames in %d-px tiles (the encoder's pretraining crop; --cls-tile 0 disables)",
                tile,
            )
            changes["cls_tile"] = tile
    for key in ("cls_stride", "cls_pixel_size", "cls_min_std"):
        if key in opts:
            changes[key] = type(getattr(contract, key))(opts[key])
    if not changes.get("cls_tile", contract.cls_tile):
        # tiling off: the other tiling fields mean nothing and stay at their defaults
        changes.update(cls_tile=0, cls_stride=0, cls_pixel_size=0.0, cls_min_std=0.0)
    elif changes.get("cls_stride", contract.cls_stride) > changes.get("cls_tile", contract.cls_tile):
        changes["cls_stride"] = 0
    return dataclasses.replace(contract, **changes) if changes else contract


def tiling_summary(contract: Contract) -> str:
    """One line for logs and model cards."""
    if not contract.cls_tiling:
        return f"whole image resized to {contract.image_size} px"
    stride = contract.cls_stride or contract.cls_tile
    phys = f" at {contract.cls_pixel_size:g} nm/px" if contract.cls_pixel_size else ""
    skip = f", tiles with std < {contract.cls_min_std:g} skipped" if contract.cls_min_std else ""
    return (
        f"frames larger than {contract.cls_tile} px: {contract.cls_tile}-px tiles{phys} every {stride} px, "
        f"each resized to {contract.image_size} px ({contract.cls_scale:g} native px per model px), "
        f"{contract.cls_aggregate} of tile probabilities{skip}"
    )


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def frame_probabilities(
    probs_rows: np.ndarray,
    frame_of: np.ndarray,
    keep: np.ndarray,
    frames: Sequence[int] | np.ndarray,
    how: str = "mean",
) -> np.ndarray:
    """Per-input probabilities of the rows of ``frames`` (in ``frame_of`` order) -> (n_frames, C).

    ``probs_rows`` holds the rows of exactly those frames, in the order of :func:`rows_of`.
    """
    rows_frames = frame_of[rows_of(frame_of, frames)]
    out = []
    for f in frames:
        sel = rows_frames == f
        out.append(aggregate_probabilities(probs_rows[sel], keep[frame_of == f], how))
    return np.stack(out) if out else np.zeros((0, probs_rows.shape[1]), np.float32)


def frame_embeddings(
    emb_rows: np.ndarray, frame_of: np.ndarray, keep: np.ndarray, frames: Sequence[int] | np.ndarray
) -> np.ndarray:
    """Per-input embeddings of the rows of ``frames`` -> one unit vector per frame (as the runtime)."""
    rows_frames = frame_of[rows_of(frame_of, frames)]
    return np.stack([aggregate_embeddings(emb_rows[rows_frames == f], keep[frame_of == f]) for f in frames])


def rows_of(
    frame_of: np.ndarray, frames: Sequence[int] | np.ndarray, keep: np.ndarray | None = None
) -> np.ndarray:
    """Row indices (sorted) of the inputs of ``frames``; with ``keep``, structure-less tiles dropped."""
    mask = np.isin(frame_of, np.asarray(frames, dtype=np.int64))
    if keep is not None:
        mask &= keep
    return np.flatnonzero(mask)
