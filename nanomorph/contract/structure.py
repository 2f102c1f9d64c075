"""Where a frame carries structure: burned-in annotation strips and near-uniform tiles (numpy only).

TEM frames often end in a strip with a scale bar and text, and many tiles of a sparse particle
frame are empty support film. Crops of either teach a self-supervised encoder nothing about the
specimen (and a scale bar is an easy shortcut for matching two views), so pretraining samples its
crops from the tiles this module keeps, and tiled classification can skip the rest.

Both tests are measured on the frame itself, not hard-coded positions:

* :func:`annotation_bands`: rows/columns at a frame edge where one exact grey value covers most of
  the line (a flat strip, with or without text on it). Real detector rows never repeat one value
  that often, except where the signal is clipped, and clipped lines carry no structure either.
* :func:`structure_scores`: per tile, the standard deviation of a block-averaged copy (about 16 x 16
  blocks), so pixel noise averages out and particles, wires and edges remain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FLAT_FRACTION = 0.5  # a line is "flat" when one exact value covers at least this fraction of it
MAX_BAND_FRACTION = 0.25  # an annotation strip is at most this share of the frame's side
MIN_STRUCTURE = 0.02  # tiles below this block-std (frame normalised to [0, 1]) are near-uniform
RELATIVE_STRUCTURE = 0.25  # ... and below this fraction of the frame's 90th-percentile tile


@dataclass(frozen=True)
class Bands:
    """Widths (px) of the annotation strips found at each edge of a frame."""

    top: int = 0
    bottom: int = 0
    left: int = 0
    right: int = 0

    def crop(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        return image[self.top : h - self.bottom, self.left : w - self.right]


def _flat_lines(image: np.ndarray) -> np.ndarray:
    """Per row: does its most common exact value cover at least FLAT_FRACTION of it?

    Vectorised over rows: sort each row, then the longest run of equal neighbours is the mode's
    count (one sort of the frame instead of a ``np.unique`` per row)."""
    rows = np.sort(image, axis=1)
    n, w = rows.shape
    # Indices where a new value starts in each row, plus the row ends, as one flat sequence.
    starts = np.ones((n, w + 1), dtype=bool)
    starts[:, 1:w] = rows[:, 1:] != rows[:, :-1]
    flat_idx = np.flatnonzero(starts.ravel())
    run_lengths = np.diff(flat_idx)
    row_of_run = flat_idx[:-1] // (w + 1)
    longest = np.zeros(n, dtype=np.int64)
    np.maximum.at(longest, row_of_run, run_lengths)
    return longest >= FLAT_FRACTION * w


def _edge_band(flat: np.ndarray, max_width: int) -> int:
    """Width of the band of flat lines that starts at index 0: the last flat line within
    ``max_width`` of the edge, so that text rows inside the strip do not end it early, as long as
    most of the band is flat."""
    candidates = np.flatnonzero(flat[:max_width])
    if candidates.size == 0 or candidates[0] > 2:  # the strip must touch the edge
        return 0
    for end in candidates[::-1]:
        if flat[: end + 1].mean() >= 0.5:
            return int(end) + 1
    return 0


def annotation_bands(image: np.ndarray) -> Bands:
    """The burned-in strips (scale bar, text, a uniform margin) at the four edges of ``image``."""
    image = np.asarray(image)
    h, w = image.shape
    rows, cols = _flat_lines(image), _flat_lines(image.T)
    if rows.mean() > 0.5 or cols.mean() > 0.5:  # mostly flat (blank or clipped): no strip stands out
        return Bands()
    top = _edge_band(rows, int(h * MAX_BAND_FRACTION))
    bottom = _edge_band(rows[::-1], int(h * MAX_BAND_FRACTION))
    left = _edge_band(cols, int(w * MAX_BAND_FRACTION))
    right = _edge_band(cols[::-1], int(w * MAX_BAND_FRACTION))
    return Bands(top, bottom, left, right)


def tile_origins(h: int, w: int, tile: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of ``tile``-sized tiles every ``stride`` px, the last ones flush with the
    far edges so the whole frame is covered."""
    ys = list(range(0, max(1, h - tile + 1), stride))
    xs = list(range(0, max(1, w - tile + 1), stride))
    if ys[-1] != max(0, h - tile):
        ys.append(max(0, h - tile))
    if xs[-1] != max(0, w - tile):
        xs.append(max(0, w - tile))
    return [(y, x) for y in ys for x in xs]


def block_std(tile: np.ndarray, blocks: int = 16) -> float:
    """Standard deviation of ``tile`` averaged into about ``blocks`` x ``blocks`` cells."""
    h, w = tile.shape
    by, bx = max(1, h // blocks), max(1, w // blocks)
    hh, ww = (h // by) * by, (w // bx) * bx
    cells = tile[:hh, :ww].reshape(hh // by, by, ww // bx, bx).mean(axis=(1, 3))
    return float(cells.std())


def structure_scores(image: np.ndarray, origins: list[tuple[int, int]], tile: int) -> np.ndarray:
    return np.array([block_std(image[y : y + tile, x : x + tile]) for y, x in origins], dtype=np.float32)


def structured_tiles(image: np.ndarray, tile: int, stride: int | None = None) -> list[tuple[int, int]]:
    """Origins of the ``tile``-px tiles of a normalised frame that lie outside its annotation strips
    and carry structure (block-std above both thresholds). Coordinates are in the full frame.
    Falls back to all tiles of the cropped frame when none pass, so every frame contributes."""
    image = np.asarray(image, dtype=np.float32)
    bands = annotation_bands(image)
    inner = bands.crop(image)
    if min(inner.shape) < tile:  # the strips leave too little: do not trust them
        bands, inner = Bands(), image
    h, w = inner.shape
    origins = tile_origins(h, w, tile, stride or max(1, tile // 2))
    scores = structure_scores(inner, origins, tile)
    threshold = max(MIN_STRUCTURE, RELATIVE_STRUCTURE * float(np.percentile(scores, 90)))
    keep = [o for o, s in zip(origins, scores, strict=False) if s >= threshold] or origins
    return [(y + bands.top, x + bands.left) for y, x in keep]
