"""Classifying large frames at the encoder's scale: tiles in, one frame label out.

A self-supervised encoder pretrained on native-resolution crops of ``crop_size`` pixels, each
resized to ``image_size``, has only ever seen structure at ``crop_size / image_size`` native pixels
per model pixel. Shrinking a 2048-px frame whole to ``image_size`` shows it particles 8-16x smaller
than it learned. So, with ``Contract.cls_tile`` set, a frame larger than a tile is normalised once
(percentiles of the whole frame), cut into ``cls_tile`` tiles every ``cls_stride`` pixels, and each
tile is resized to ``image_size``; the frame's class probabilities are the mean of its tiles'.

Training (``finetune-cls``, ``study``) and inference (:class:`nanomorph.runtime.Classifier`, the
service's ``/classify``, ``predict``) call exactly these functions with the contract stored in the
model, so they tile, skip and aggregate identically. A frame no larger than a tile in both
directions is classified whole, as without tiling (:func:`~nanomorph.contract.to_model_input`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nanomorph.contract.tiling import tile
from nanomorph.contract.transform import Contract, normalise, resize, to_model_input


@dataclass
class FrameTiles:
    """The model inputs of one frame.

    Attributes:
        x: float32 (N, 1, S, S), the tiles resized to the model's input (N = 1: the whole frame).
        boxes: per tile ``(y, x, height, width)`` in the frame's native pixels (clipped to the frame).
        keep: bool (N,), tiles that count (the others carry no structure; see ``cls_min_std``).
        side: native tile side used (0 = the whole frame was resized, no tiling).
    """

    x: np.ndarray
    boxes: list[tuple[int, int, int, int]]
    keep: np.ndarray
    side: int

    @property
    def tiled(self) -> bool:
        return self.side > 0


def tile_geometry(
    contract: Contract, shape: tuple[int, int], pixel_size: float | None = None
) -> tuple[int, int]:
    """``(tile side, stride)`` in native pixels for a frame of ``shape``; ``(0, 0)`` = whole frame.

    With ``contract.cls_pixel_size`` and a known ``pixel_size`` (nm/px), the tile spans the same nm
    as ``cls_tile`` pixels did at ``cls_pixel_size``: the image is resampled to the encoder's nm
    per model pixel by the one resize of each tile.
    """
    if not contract.cls_tiling:
        return 0, 0
    side, stride = float(contract.cls_tile), float(contract.cls_stride or contract.cls_tile)
    if contract.cls_pixel_size > 0 and pixel_size is not None and np.isfinite(pixel_size) and pixel_size > 0:
        factor = contract.cls_pixel_size / float(pixel_size)
        side, stride = side * factor, stride * factor
    side_px = max(8, int(round(side)))
    stride_px = min(side_px, max(1, int(round(stride))))
    if shape[0] <= side_px and shape[1] <= side_px:
        return 0, 0  # no larger than one tile: classified whole, exactly as without tiling
    return side_px, stride_px


def frame_tiles(image: np.ndarray, contract: Contract, pixel_size: float | None = None) -> FrameTiles:
    """Raw 2-D frame -> its classification inputs (:class:`FrameTiles`) under ``contract``."""
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"classification takes one 2-D image, got shape {img.shape}")
    side, stride = tile_geometry(contract, (img.shape[0], img.shape[1]), pixel_size)
    if not side:
        x = to_model_input(img, contract)[None]
        return FrameTiles(x, [(0, 0, img.shape[0], img.shape[1])], np.ones(1, dtype=bool), 0)
    norm = normalise(img, contract)
    # A side shorter than a tile is reflected up to it (nanomorph.contract.tile), as segmentation does.
    tiles, positions, _ = tile(norm, side, side - stride)
    size = contract.image_size
    x = np.empty((len(tiles), 1, size, size), dtype=np.float32)
    for i, t in enumerate(tiles):
        x[i, 0] = resize(t, size)
    boxes = [(y, x0, min(side, img.shape[0] - y), min(side, img.shape[1] - x0)) for y, x0 in positions]
    return FrameTiles(x, boxes, structured(tiles, contract.cls_min_std), side)


def structured(tiles: np.ndarray, min_std: float) -> np.ndarray:
    """Tiles (N, t, t) of a normalised frame whose intensity std reaches ``min_std``.

    When none does (a blank frame), all count: a frame always gets a label.
    """
    if min_std <= 0:
        return np.ones(len(tiles), dtype=bool)
    keep = tiles.reshape(len(tiles), -1).astype(np.float64).std(axis=1) >= min_std
    return keep if keep.any() else np.ones(len(tiles), dtype=bool)


def aggregate_probabilities(
    probs: np.ndarray, keep: np.ndarray | None = None, how: str = "mean"
) -> np.ndarray:
    """Per-tile class probabilities (N, C) -> the frame's (C,), float32, summing to 1."""
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or not len(p):
        raise ValueError(f"aggregate_probabilities expects (N>0, C) probabilities, got shape {p.shape}")
    if keep is not None:
        p = p[np.asarray(keep, dtype=bool)] if np.any(keep) else p
    if how != "mean":
        raise ValueError(f"unknown aggregation {how!r}")
    out = p.mean(axis=0)
    return (out / out.sum()).astype(np.float32)


def aggregate_embeddings(embeddings: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Per-tile embeddings (N, D) -> the frame's: the L2-normalised mean of the unit tile vectors."""
    e = np.asarray(embeddings, dtype=np.float64)
    if keep is not None and np.any(keep):
        e = e[np.asarray(keep, dtype=bool)]
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    mean = e.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)


def nm_per_px(meta: object) -> float | None:
    """The pixel size of an :class:`~nanomorph.contract.ImageMeta` in nm, or None when uncalibrated
    or not a length (what :func:`tile_geometry` takes)."""
    size = getattr(meta, "pixel_size", None)
    if size is None or getattr(meta, "pixel_unit", None) != "nm":
        return None
    size = float(size)
    return size if np.isfinite(size) and size > 0 else None
