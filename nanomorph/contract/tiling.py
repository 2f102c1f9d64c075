"""Overlapping tiles of large frames, and the inverse that stitches per-tile predictions.

TEM frames are 2k-4k pixels: segmentation runs at native resolution on tiles, and neighbouring
tiles overlap so that every output pixel is predicted away from a tile border. Stitching weights
each tile by a smooth window (highest in the centre), so seams do not show.
"""

from __future__ import annotations

from typing import Literal

import numpy as np


def _starts(length: int, tile_size: int, stride: int) -> list[int]:
    if length <= tile_size:
        return [0]
    starts = list(range(0, length - tile_size + 1, stride))
    if starts[-1] != length - tile_size:
        starts.append(length - tile_size)  # the last tile ends on the border
    return starts


def tile_positions(shape: tuple[int, int], tile_size: int, overlap: int) -> list[tuple[int, int]]:
    """Top-left corners of the tiles covering an image of ``shape`` (after padding to ``tile_size``)."""
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size), got {overlap}")
    height, width = max(shape[0], tile_size), max(shape[1], tile_size)
    stride = tile_size - overlap
    return [(y, x) for y in _starts(height, tile_size, stride) for x in _starts(width, tile_size, stride)]


def _pad_to(image: np.ndarray, height: int, width: int) -> np.ndarray:
    pad_h, pad_w = height - image.shape[-2], width - image.shape[-1]
    if pad_h == 0 and pad_w == 0:
        return image
    pad = [(0, 0)] * (image.ndim - 2) + [(0, pad_h), (0, pad_w)]
    # Reflection keeps texture statistics at the border; it needs the pad to be smaller than the image.
    mode: Literal["reflect", "symmetric"] = (
        "reflect" if pad_h < image.shape[-2] and pad_w < image.shape[-1] else "symmetric"
    )
    return np.pad(image, pad, mode=mode)


def tile(
    image: np.ndarray, tile_size: int, overlap: int
) -> tuple[np.ndarray, list[tuple[int, int]], tuple[int, int]]:
    """Cuts ``image`` ((H, W) or (C, H, W)) into overlapping square tiles.

    Images smaller than a tile are padded (reflected) up to ``tile_size``.

    Returns:
        ``(tiles, positions, padded_shape)``: tiles of shape (N, [C,] tile_size, tile_size), their
        top-left corners in the padded image, and the padded (H, W).
    """
    if image.ndim not in (2, 3):
        raise ValueError(f"tile expects (H, W) or (C, H, W), got shape {image.shape}")
    height, width = image.shape[-2:]
    padded = _pad_to(image, max(height, tile_size), max(width, tile_size))
    positions = tile_positions((height, width), tile_size, overlap)
    tiles = np.stack([padded[..., y : y + tile_size, x : x + tile_size] for y, x in positions])
    return tiles, positions, (padded.shape[-2], padded.shape[-1])


def blend_window(tile_size: int) -> np.ndarray:
    """2-D weight window: a raised cosine with a floor, so borders count little but never zero."""
    ramp = np.hanning(tile_size + 2)[1:-1].astype(np.float32)
    window = np.outer(ramp, ramp)
    return np.maximum(window, 1e-3).astype(np.float32)


def untile(
    tile_predictions: np.ndarray,
    positions: list[tuple[int, int]],
    out_shape: tuple[int, int],
    tile_size: int,
) -> np.ndarray:
    """Stitches per-tile predictions (N, C, t, t) into one (C, H, W) map with smooth blending.

    ``out_shape`` is the original (unpadded) image shape; padding added by :func:`tile` is cropped.
    """
    if tile_predictions.ndim != 4:
        raise ValueError(f"untile expects (N, C, t, t), got shape {tile_predictions.shape}")
    if len(positions) != tile_predictions.shape[0]:
        raise ValueError(f"{tile_predictions.shape[0]} tiles but {len(positions)} positions")
    channels = tile_predictions.shape[1]
    height, width = max(out_shape[0], tile_size), max(out_shape[1], tile_size)
    # float64 accumulators: with float32, heavily overlapping tiles drift by several ulp, and
    # identical predictions would no longer stitch back to exactly themselves.
    acc = np.zeros((channels, height, width), dtype=np.float64)
    weight = np.zeros((height, width), dtype=np.float64)
    window = blend_window(tile_size).astype(np.float64)
    if len(positions) == 1:
        window = np.ones_like(window)  # a single tile needs no blending
    for pred, (y, x) in zip(tile_predictions, positions, strict=True):
        acc[:, y : y + tile_size, x : x + tile_size] += pred * window
        weight[y : y + tile_size, x : x + tile_size] += window
    acc = acc[:, : out_shape[0], : out_shape[1]]
    acc /= weight[: out_shape[0], : out_shape[1]]
    return acc.astype(np.float32)
