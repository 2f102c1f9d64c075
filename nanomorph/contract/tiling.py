"""Overlapping tiles of large frames, and the inverse that stitches per-tile predictions.

TEM frames are 2k-4k pixels: segmentation runs at native resolution on tiles, and neighbouring
tiles overlap so that every output pixel is predicted away from a tile border. Stitching weights
each tile by a smooth window (highest in the centre), so seams do not show.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
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
    Positions must be in :func:`tile_positions` order (rows top to bottom); the work is done by a
    :class:`Stitcher`, the same one that streams predictions of large frames.
    """
    if tile_predictions.ndim != 4:
        raise ValueError(f"untile expects (N, C, t, t), got shape {tile_predictions.shape}")
    if len(positions) != tile_predictions.shape[0]:
        raise ValueError(f"{tile_predictions.shape[0]} tiles but {len(positions)} positions")
    stitcher = Stitcher(out_shape, tile_size, single_tile=len(positions) == 1, keep_probabilities=True)
    stitcher.add(tile_predictions, positions)
    _, probs = stitcher.finish()
    assert probs is not None
    return probs


def tile_chunks(
    image: np.ndarray, tile_size: int, overlap: int, max_tiles: int
) -> Iterator[tuple[np.ndarray, list[tuple[int, int]]]]:
    """Yields ``(tiles float32 (n, 1, t, t), positions)`` of a 2-D image, ``max_tiles`` at a time,
    in :func:`tile_positions` order. Only one chunk of tiles exists at a time (an 8192^2 frame cut
    into 256 px tiles would otherwise be 1,849 tiles = 485 MB at once)."""
    if image.ndim != 2:
        raise ValueError(f"tile_chunks expects (H, W), got shape {image.shape}")
    height, width = image.shape
    padded = _pad_to(image, max(height, tile_size), max(width, tile_size))
    positions = tile_positions((height, width), tile_size, overlap)
    step = max(1, int(max_tiles))
    for i in range(0, len(positions), step):
        part = positions[i : i + step]
        batch = np.empty((len(part), 1, tile_size, tile_size), dtype=np.float32)
        for k, (y, x) in enumerate(part):
            batch[k, 0] = padded[y : y + tile_size, x : x + tile_size]
        yield batch, part


def n_tiles(shape: tuple[int, int], tile_size: int, overlap: int) -> int:
    """How many tiles :func:`tile_positions` cuts an image of ``shape`` into."""
    stride = tile_size - overlap
    h, w = (max(1, math.ceil((max(s, tile_size) - tile_size) / stride) + 1) for s in shape)
    return h * w


def choose_tile(shape: tuple[int, int], min_tile: int, max_tile: int, overlap: int) -> int:
    """The tile side (a multiple of 32 in ``[min_tile, max_tile]``) that computes the fewest pixels
    for an image of ``shape``; ties go to the larger tile (fewer, larger model calls).

    A fully convolutional model can run on tiles larger than it was trained on: each tile's overlap
    is recomputed, so larger tiles waste less (256 px with 64 overlap computes 1.7x the frame's
    pixels; 512 px 1.3x), but a tile far past the frame's border is padding computed for nothing.
    """
    lo, hi = 32 * math.ceil(min_tile / 32), max(32 * math.ceil(min_tile / 32), 32 * (max_tile // 32))
    best, best_cost = lo, math.inf
    for side in range(lo, hi + 1, 32):
        cost = n_tiles(shape, side, overlap) * side * side
        if cost <= best_cost:
            best, best_cost = side, cost
    return best


def _argmax0(probs: np.ndarray) -> np.ndarray:
    """``np.argmax(probs, axis=0)`` (first maximum on ties), class by class: numpy's argmax over
    the first axis of a (C, H, W) array is ~10x slower than C - 1 vectorised comparisons."""
    best = probs[0].copy()
    index = np.zeros(best.shape, dtype=np.uint16)
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        index[better] = c
        np.maximum(best, probs[c], out=best)
    return index


def mask_dtype(n_classes: int) -> type[np.unsignedinteger]:
    """The dtype of every class-index mask of ``n_classes`` classes: uint8 up to 256, else uint16.

    One rule for the runtime, the service and training. uint16 rather than int32 above 256 classes:
    masks are saved as 8/16-bit PNG and TIFF (:func:`nanomorph.morphology.mask_to_png_bytes`) and
    read back as uint16, and an 8192^2 frame's mask is 128 MiB in uint16 against 256 MiB in int32.
    """
    if not 0 < n_classes <= 1 << 16:
        raise ValueError(f"a class mask holds 1 to 65536 classes, not {n_classes}")
    return np.uint8 if n_classes <= 256 else np.uint16


class Stitcher:
    """Blends tile predictions into the output as they arrive (bounded memory for any frame).

    Tiles must come in :func:`tile_positions` order: rows of tiles top to bottom. Only one row of
    tiles is accumulated at a time, in float64 (``(C + 1) x tile_size x W`` values); when a new row
    starts, the image rows above it can receive no more predictions, so they are divided by their
    blending weight and written out (argmax into the mask, and into ``probabilities`` when kept).
    Peak memory is therefore the output (1 byte per pixel for the mask) plus one band, instead of a
    stack of every tile's probabilities plus a full-frame float64 accumulator.

    Args:
        out_shape: the original (unpadded) image shape (H, W).
        tile_size: tile side.
        single_tile: the image is one tile (no blending: weight 1 everywhere).
        keep_probabilities: also return the blended (C, H, W) float32 probabilities.
    """

    def __init__(
        self,
        out_shape: tuple[int, int],
        tile_size: int,
        *,
        single_tile: bool = False,
        keep_probabilities: bool = False,
    ) -> None:
        self.out_shape = (int(out_shape[0]), int(out_shape[1]))
        self.tile_size = int(tile_size)
        self.height = max(self.out_shape[0], self.tile_size)
        self.width = max(self.out_shape[1], self.tile_size)
        window = blend_window(self.tile_size).astype(np.float64)
        self.window = np.ones_like(window) if single_tile else window
        self.keep_probabilities = keep_probabilities
        self.mask: np.ndarray | None = None
        self.probabilities: np.ndarray | None = None
        self._acc: np.ndarray | None = None  # (C, tile_size, width): rows base .. base + tile_size
        self._weight = np.zeros((self.tile_size, self.width), dtype=np.float64)
        self._base = 0  # first image row held in the band
        self._row: int | None = None  # y of the tile row being accumulated

    def _allocate(self, channels: int) -> None:
        h, w = self.out_shape
        self._acc = np.zeros((channels, self.tile_size, self.width), dtype=np.float64)
        self.mask = np.zeros((h, w), dtype=mask_dtype(channels))
        if self.keep_probabilities:
            self.probabilities = np.zeros((channels, h, w), dtype=np.float32)

    def add(self, predictions: np.ndarray, positions: list[tuple[int, int]]) -> None:
        """Accumulates tile predictions (n, C, t, t) at their top-left ``positions``."""
        if predictions.ndim != 4 or predictions.shape[-2:] != (self.tile_size, self.tile_size):
            raise ValueError(
                f"expected tile predictions (n, C, {self.tile_size}, {self.tile_size}), got {predictions.shape}"
            )
        if len(positions) != predictions.shape[0]:
            raise ValueError(f"{predictions.shape[0]} tiles but {len(positions)} positions")
        if self._acc is None:
            self._allocate(predictions.shape[1])
        assert self._acc is not None
        t = self.tile_size
        for pred, (y, x) in zip(predictions, positions, strict=True):
            if y != self._row:
                if self._row is not None and y < self._row:
                    raise ValueError(f"tiles out of order: row {y} after row {self._row}")
                if y - (self._row or 0) > t:
                    raise ValueError(f"tile row {y} leaves rows without predictions (tile {t})")
                self._flush(y)
                self._row = y
            b = y - self._base
            self._acc[:, b : b + t, x : x + t] += pred * self.window
            self._weight[b : b + t, x : x + t] += self.window

    def _flush(self, upto: int) -> None:
        """Writes out image rows ``[base, upto)`` and shifts the band to start at ``upto``."""
        assert self._acc is not None
        n = min(upto, self.height) - self._base
        if n <= 0:
            return
        self._emit(n)
        keep = self.tile_size - n
        if keep > 0:
            self._acc[:, :keep] = self._acc[:, n:]
            self._weight[:keep] = self._weight[n:]
        self._acc[:, max(keep, 0) :] = 0.0
        self._weight[max(keep, 0) :] = 0.0
        self._base += n

    def _emit(self, n: int) -> None:
        assert self._acc is not None and self.mask is not None
        top, bottom = self._base, min(self._base + n, self.out_shape[0])
        if bottom <= top:
            return
        rows = bottom - top
        w = self.out_shape[1]
        probs = self._acc[:, :rows, :w] / self._weight[:rows, :w]
        self.mask[top:bottom] = _argmax0(probs)
        if self.probabilities is not None:
            self.probabilities[:, top:bottom] = probs

    def finish(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Writes out the last band; returns ``(mask, probabilities or None)`` and frees the band."""
        if self._acc is None or self.mask is None:
            raise ValueError("no tile predictions were added")
        self._emit(self.height - self._base)
        self._acc = None
        return self.mask, self.probabilities
