"""Morphology numbers from segmentation masks (numpy, scipy and scikit-image only).

Shared by training (segmentation overlays), ``nanomorph predict`` and the service, so it must never
import torch or bentoml. The main entry point is :func:`measure`, which turns an integer class mask
into a JSON-serialisable dict of per-class numbers:

* every foreground class: area fraction, connected domains (8-connectivity), their area and
  equivalent-diameter distributions, and percolation (one domain touching opposite image edges);
* wire-like classes: skeleton length (``skimage.morphology.skeletonize(method="lee")``, Lee, Kashyap
  & Chu 1994, which leaves far fewer corner spurs on thick tilted wires than the default Zhang-Suen
  thinning; diagonal steps counted as sqrt(2)); a corrected length (the 8-connected chain's
  orientation bias divided out, Freeman 1970, plus half a width at each free end) and mean width =
  area / length; local orientation histogram, mean orientation and the nematic order parameter
  S = |<exp(2i theta)>| (de Gennes & Prost, *The Physics of Liquid Crystals*, 1993), weighted by
  length;
* particle-like classes: aspect ratio (major / minor axis of the moment ellipse, as
  ``skimage.measure.regionprops``) and circularity 4 pi A / P^2 with the ``regionprops`` perimeter.

All per-domain numbers are computed for all domains at once with ``np.bincount`` over the label
image instead of looping over ``regionprops`` objects, so a 2048 x 2048 mask takes
about 1.3 s in the worst case (one class covering half the frame in fine, noisy domains).

Orientation convention: degrees in [0, 180), 0 = horizontal (along +x, columns), counter-clockwise as
the image is displayed (row 0 at the top), so 90 = vertical and 45 = rising to the right.

Also here: :func:`overlay` (colour overlay for reports) and :func:`mask_to_png_bytes` /
:func:`png_bytes_to_mask` (lossless mask transport used by the service and the pipelines).
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import ndimage as ndi

__all__ = [
    "N_ORIENTATION_BINS",
    "PALETTE",
    "class_kind",
    "mask_to_png_bytes",
    "measure",
    "overlay",
    "png_bytes_to_mask",
    "unit_key",
]

#: Number of orientation histogram bins over [0, 180) degrees (15 degrees each).
N_ORIENTATION_BINS = 12
#: Half-size of the window used to estimate the local skeleton orientation (11 x 11 pixels).
ORIENTATION_RADIUS = 5

_WIRE_WORDS = ("wire", "fibre", "fiber", "filament", "nanowire", "nanotube", "tube")
_PARTICLE_WORDS = ("particle", "sphere", "rod", "dot")

_SQRT2 = math.sqrt(2.0)
_SKEL_METHOD = "lee"
_STRUCT8 = np.ones((3, 3), dtype=bool)
_STREL4 = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)

# Perimeter weights of skimage.measure.perimeter(neighborhood=4), the one regionprops uses: a border
# pixel's 3x3 code (convolution with _PERIM_KERNEL) says how much contour it carries.
_PERIM_KERNEL = np.array([[10, 2, 10], [2, 1, 2], [10, 2, 10]], dtype=np.int32)
_PERIM_WEIGHTS = np.zeros(50, dtype=np.float64)
_PERIM_WEIGHTS[[5, 7, 15, 17, 25, 27]] = 1.0
_PERIM_WEIGHTS[[21, 33]] = _SQRT2
_PERIM_WEIGHTS[[13, 23]] = (1.0 + _SQRT2) / 2.0

#: Class colours (RGB, 0-255) for overlays; index 0 (background) is never painted. Colour-blind
#: friendly first (Okabe & Ito 2008), then tab10-like colours; cycles for more classes.
PALETTE: np.ndarray = np.array(
    [
        [0, 0, 0],
        [230, 159, 0],
        [86, 180, 233],
        [0, 158, 115],
        [240, 228, 66],
        [0, 114, 178],
        [213, 94, 0],
        [204, 121, 167],
        [214, 39, 40],
        [148, 103, 189],
        [140, 86, 75],
        [188, 189, 34],
        [23, 190, 207],
    ],
    dtype=np.uint8,
)


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------
def unit_key(unit: str) -> str:
    """Make a unit usable in result keys: ``"µm"`` -> ``"um"``, ``"Å"`` -> ``"A"``, others kept ASCII.

    Args:
        unit: Physical unit of one pixel, e.g. ``"nm"``.

    Returns:
        An ASCII identifier fragment (never empty; ``"unit"`` if nothing usable is left).
    """
    u = unit.strip().replace("µ", "u").replace("μ", "u").replace("Å", "A")
    u = re.sub(r"[^0-9A-Za-z]", "", u)
    return u or "unit"


def class_kind(name: str) -> str:
    """Guess what numbers a class needs from its name.

    Args:
        name: Class name, e.g. ``"nanowire"`` or ``"Au particle"``.

    Returns:
        ``"wire"`` for wire/fibre/fiber/filament/nanowire/tube-like names, ``"particle"`` for
        particle/sphere/rod/dot-like names, else ``"both"`` (compute both kinds of numbers).
    """
    low = name.lower()
    if any(w in low for w in _WIRE_WORDS):
        return "wire"
    if any(w in low for w in _PARTICLE_WORDS):
        return "particle"
    return "both"


def _f(x: float | np.floating | None) -> float | None:
    """Python float, or None where the value is undefined (NaN/inf never reach JSON)."""
    if x is None:
        return None
    v = float(x)
    return v if math.isfinite(v) else None


def _distribution(values: np.ndarray, scale: float = 1.0) -> dict[str, Any]:
    """Summary of a 1-D sample: count, mean, std, min, p10, median, p90, max (None when empty)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)] * scale
    if v.size == 0:
        return {k: (0 if k == "count" else None) for k in _DIST_KEYS}
    p10, med, p90 = np.percentile(v, [10, 50, 90])
    return {
        "count": int(v.size),
        "mean": _f(v.mean()),
        "std": _f(v.std()),
        "min": _f(v.min()),
        "p10": _f(p10),
        "median": _f(med),
        "p90": _f(p90),
        "max": _f(v.max()),
    }


_DIST_KEYS = ("count", "mean", "std", "min", "p10", "median", "p90", "max")


def _bbox(binary: np.ndarray) -> tuple[slice, slice] | None:
    """Bounding box of the True pixels with a 1-pixel margin where the image allows (None if empty)."""
    rows = np.flatnonzero(binary.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(binary.any(axis=0))
    h, w = binary.shape
    return (
        slice(max(rows[0] - 1, 0), min(rows[-1] + 2, h)),
        slice(max(cols[0] - 1, 0), min(cols[-1] + 2, w)),
    )


# --------------------------------------------------------------------------------------------------
# per-class pieces
# --------------------------------------------------------------------------------------------------
def _percolation(labels: np.ndarray) -> tuple[bool, str | None]:
    """Whether one domain touches both left and right, or both top and bottom edges.

    The label image must cover the whole frame (not a crop), otherwise edges are wrong.
    """
    left, right = set(np.unique(labels[:, 0])), set(np.unique(labels[:, -1]))
    top, bottom = set(np.unique(labels[0, :])), set(np.unique(labels[-1, :]))
    horizontal = bool((left & right) - {0})
    vertical = bool((top & bottom) - {0})
    if horizontal and vertical:
        return True, "both"
    if horizontal:
        return True, "horizontal"
    if vertical:
        return True, "vertical"
    return False, None


def _particle_shape(labels: np.ndarray, n: int, areas: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Aspect ratio and circularity of every domain, vectorised over labels.

    Matches ``regionprops``: axis lengths are 4 * sqrt(eigenvalues of the pixel-coordinate
    covariance); perimeter is ``skimage.measure.perimeter(neighborhood=4)``. Domains of one class never
    touch (they are 8-connected components), so one convolution over the whole class serves them all.

    Returns:
        (aspect_ratio, circularity), each (n,) float64 with NaN where undefined (minor axis 0, or
        perimeter 0 for single pixels). Circularity is clipped to 1: on small digital shapes the
        discrete perimeter can underestimate the true one.
    """
    # Moments over the foreground pixels only (labels > 0), in float64 crop coordinates.
    fg = np.flatnonzero(labels)
    lab = labels.ravel()[fg]
    rr, cc = np.divmod(fg, labels.shape[1])
    rr, cc = rr.astype(np.float64), cc.astype(np.float64)
    m00 = areas.astype(np.float64)

    def per_label(values: np.ndarray) -> np.ndarray:
        return np.bincount(lab, values, minlength=n + 1)[1:] / m00

    mean_r, mean_c = per_label(rr), per_label(cc)
    crr = per_label(rr * rr) - mean_r**2
    ccc = per_label(cc * cc) - mean_c**2
    crc = per_label(rr * cc) - mean_r * mean_c
    half_tr = (crr + ccc) / 2.0
    disc = np.sqrt(((crr - ccc) / 2.0) ** 2 + crc**2)
    l1 = np.clip(half_tr + disc, 0.0, None)
    l2 = np.clip(half_tr - disc, 0.0, None)
    major, minor = 4.0 * np.sqrt(l1), 4.0 * np.sqrt(l2)
    with np.errstate(divide="ignore", invalid="ignore"):
        aspect = np.where(minor > 1e-9, major / np.where(minor > 1e-9, minor, 1.0), np.nan)

    binary = (labels > 0).astype(np.uint8)
    eroded = ndi.binary_erosion(binary, _STREL4, border_value=0)
    border = binary - eroded.astype(np.uint8)
    code = ndi.convolve(border.astype(np.int32), _PERIM_KERNEL, mode="constant", cval=0)
    contrib = _PERIM_WEIGHTS[np.clip(code, 0, 49)] * border
    perimeter = np.bincount(labels.ravel(), contrib.ravel(), minlength=n + 1)[1:]
    with np.errstate(divide="ignore", invalid="ignore"):
        circ = np.where(
            perimeter > 0, 4.0 * np.pi * m00 / np.where(perimeter > 0, perimeter, 1.0) ** 2, np.nan
        )
    circ = np.minimum(circ, 1.0)
    return aspect, circ


def _skeleton_graph(skel: np.ndarray) -> tuple[tuple[np.ndarray, np.ndarray], np.ndarray, np.ndarray]:
    """Length carried by each skeleton pixel and its degree in the skeleton graph.

    Horizontal/vertical neighbours are joined by steps of 1, diagonal ones by sqrt(2), except that a
    diagonal step is dropped where an L-shaped pair of unit steps already joins the two pixels (so a
    staircase corner is not counted twice). Each step's length is split between its two pixels.
    Works on the K skeleton pixels only (8 gathers of K), not on the whole frame.

    Returns:
        (coords, weight, degree): ``coords = np.nonzero(skel)``; weight (K,) float64 with
        ``weight.sum()`` the skeleton length; degree (K,) int.
    """
    rr, cc = np.nonzero(skel)
    pad = np.pad(skel.astype(bool), 1)
    pr, pc = rr + 1, cc + 1

    def nb(dr: int, dc: int) -> np.ndarray:
        return pad[pr + dr, pc + dc]

    n_orth = nb(0, 1).astype(np.int32) + nb(0, -1) + nb(1, 0) + nb(-1, 0)
    n_diag = np.zeros(rr.shape, dtype=np.int32)
    for dr in (-1, 1):
        for dc in (-1, 1):
            n_diag += nb(dr, dc) & ~nb(dr, 0) & ~nb(0, dc)
    weight = 0.5 * (n_orth + _SQRT2 * n_diag)
    return (rr, cc), weight, n_orth + n_diag


def _local_orientation(
    skel: np.ndarray, coords: tuple[np.ndarray, np.ndarray], radius: int = ORIENTATION_RADIUS
) -> np.ndarray:
    """Local orientation of the given skeleton pixels, in radians in [0, pi).

    Principal axis (a local line fit) of the skeleton pixels within the (2r+1)^2 window around each
    skeleton pixel. The K x (2r+1)^2 occupancy matrix is gathered once and its moments taken with one
    small matrix product, so the cost scales with the skeleton, not the frame.

    Returns:
        (K,) angles, counter-clockwise from +x as displayed (y up).
    """
    size = 2 * radius + 1
    pad = np.pad(skel.astype(np.float32), radius)
    width = pad.shape[1]
    dr, dc = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    dr, dc = dr.ravel().astype(np.float32), dc.ravel().astype(np.float32)
    offsets = (dr * width + dc).astype(np.int64)
    base = (coords[0] + radius) * width + (coords[1] + radius)
    out = np.empty((base.size, 6), dtype=np.float64)
    kernel = np.stack([np.ones(size * size, np.float32), dr, dc, dr * dr, dc * dc, dr * dc], axis=1)
    # Chunked so the (chunk x window) gather stays small on long skeletons.
    chunk = 65536
    flat = pad.ravel()
    for i in range(0, base.size, chunk):
        occ = flat[base[i : i + chunk, None] + offsets[None, :]]
        out[i : i + chunk] = occ @ kernel
    n, sr, sc, srr, scc, src = out.T
    crr = srr / n - (sr / n) ** 2
    ccc = scc / n - (sc / n) ** 2
    crc = src / n - (sr / n) * (sc / n)
    # Axis angle in (x = col, y = row-down) coordinates; flip the sign to get y up (as displayed).
    theta_down = 0.5 * np.arctan2(2.0 * crc, ccc - crr)
    return _fold(-theta_down, np.pi)


def _fold(x: Any, period: float) -> Any:
    """``x`` modulo ``period`` in [0, period).

    ``np.mod`` rounds a tiny negative value (-1e-15 from a near-horizontal fit) up to ``period``
    itself, which is outside the half-open range; that value is the same direction as 0.
    """
    v = np.mod(x, period)
    return np.where(v >= period, 0.0, v)


def _distance_to_background(binary: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Euclidean distance from a few foreground pixels to the nearest background pixel.

    Same as ``ndi.distance_transform_edt(binary)[rows, cols]`` (pixels outside the array are not
    background), but with a k-d tree over the background pixels touching the foreground, which is
    much cheaper than a full transform when only the skeleton ends are needed.
    """
    from scipy.spatial import cKDTree

    outer = ndi.binary_dilation(binary, _STRUCT8) & ~binary
    pts = np.argwhere(outer)
    if pts.size == 0:  # the class fills the whole crop: no boundary to measure against
        return np.zeros(rows.shape, dtype=np.float64)
    dist, _ = cKDTree(pts).query(np.stack([rows, cols], axis=1))
    return np.asarray(dist, dtype=np.float64)


def _wire_numbers(
    binary: np.ndarray, labels: np.ndarray, n: int
) -> tuple[dict[str, Any], np.ndarray, float, float]:
    """Skeleton length, per-domain lengths and orientation statistics of one class (cropped arrays).

    Returns:
        (numbers, domain_lengths, skeleton_length, length): numbers holds the unit-free entries,
        domain_lengths the end-corrected length of each domain (n,), skeleton_length the raw length
        and length the end-corrected total.
    """
    from skimage.morphology import skeletonize  # local: keeps `import nanomorph.morphology` light

    skel = skeletonize(binary, method=_SKEL_METHOD)
    coords, weight, deg = _skeleton_graph(skel)
    skel_len = float(weight.sum())
    edges = np.linspace(0.0, 180.0, N_ORIENTATION_BINS + 1)
    if skel_len > 0:
        theta = _local_orientation(skel, coords)
        # An 8-connected chain at angle phi from the nearest axis (0..45 deg) is longer than the line
        # it digitises by cos(phi) + (sqrt(2) - 1) sin(phi) (up to +8% at 22.5 deg); divide it out.
        phi = np.abs(np.mod(theta + np.pi / 4, np.pi / 2) - np.pi / 4)
        true_len = weight / (np.cos(phi) + (_SQRT2 - 1.0) * np.sin(phi))
        wsum = float(true_len.sum())
        hist, _ = np.histogram(np.degrees(theta), bins=edges, weights=true_len)
        z = np.sum(true_len * np.exp(2j * theta)) / wsum
        order = _f(abs(z))
        mean_orient = _f(_fold(np.degrees(np.angle(z)) / 2.0, 180.0)) if abs(z) > 1e-12 else None
        fractions = [float(x) for x in hist / wsum]
    else:
        true_len = weight.copy()
        order, mean_orient, fractions = None, None, [0.0] * N_ORIENTATION_BINS
    # The thinned line stops about half a width short of each free end; add back the distance from
    # an end pixel to the boundary (EDT minus half a pixel), so length ~ true length and width = A/L.
    # An isolated skeleton pixel (a blob) is two ends.
    ends = deg <= 1
    if ends.any():
        dist = _distance_to_background(binary, coords[0][ends], coords[1][ends])
        true_len[ends] += (2 - deg[ends]) * np.maximum(dist - 0.5, 0.0)
    domain_len = np.bincount(labels[coords], true_len, minlength=n + 1)[1:]
    length = float(true_len.sum())
    numbers = {
        "orientation_hist": {
            "bin_edges_deg": [float(e) for e in edges],
            "length_fraction": fractions,
        },
        "mean_orientation_deg": mean_orient,
        "nematic_order": order,
    }
    return numbers, domain_len, skel_len, length


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------
def _check_mask(mask: np.ndarray, n_classes: int | None = None) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {m.shape}")
    if m.dtype == bool:
        m = m.astype(np.uint8)
    if not np.issubdtype(m.dtype, np.integer):
        if not np.issubdtype(m.dtype, np.floating) or not np.all(np.isfinite(m)) or np.any(m != np.round(m)):
            raise ValueError(f"mask must hold integer class indices, got dtype {m.dtype}")
        m = m.astype(np.int64)
    if m.size == 0:
        raise ValueError(f"mask is empty (shape {m.shape})")
    lo, hi = int(m.min()), int(m.max())
    if lo < 0:
        raise ValueError(f"mask has negative class index {lo}")
    if n_classes is not None and hi >= n_classes:
        raise ValueError(f"mask has class index {hi} but only {n_classes} classes are known")
    return m


def measure(
    mask: np.ndarray,
    classes: list[str],
    pixel_size: float | None = None,
    pixel_unit: str = "nm",
    wire_classes: set[str] | None = None,
    particle_classes: set[str] | None = None,
) -> dict[str, Any]:
    """Morphology numbers of every foreground class of a segmentation mask.

    Args:
        mask: (H, W) integer class index per pixel; 0 is background.
        classes: Class names in index order, ``classes[0]`` being the background.
        pixel_size: Physical size of one pixel (e.g. from ``ImageMeta.pixel_size``); when given,
            every length/area also appears in physical units.
        pixel_unit: Unit of ``pixel_size``; used in key names via :func:`unit_key` (``"µm"`` ->
            ``"um"``), e.g. ``area_nm2``, ``length_nm``.
        wire_classes: Names to treat as wire-like. When both this and ``particle_classes`` are None,
            :func:`class_kind` guesses from the names (and unknown names get both kinds of numbers);
            when either is given, a class gets wire/particle numbers only if listed.
        particle_classes: Names to treat as particle-like (see ``wire_classes``).

    Returns:
        ``{"summary": {...}, "classes": {name: {...}}}``, JSON-serialisable with ``allow_nan=False``:
        only Python scalars, lists, dicts and None (None where a number is undefined). Per class:
        ``kind``, ``area_px``, ``area_fraction``, ``n_domains``, ``domain_area_px`` and
        ``equivalent_diameter_px`` distributions, ``percolates``, ``percolation_direction``
        (``"horizontal"`` | ``"vertical"`` | ``"both"`` | None); wire-like: ``skeleton_length_px``
        (raw chain length of the thinned line, diagonal steps sqrt(2)), ``length_px`` (chain
        orientation bias removed, plus half a width at each free end: within a few % of the drawn
        length for bars at any angle),
        ``mean_width_px`` (= area / length_px), ``domain_length_px`` distribution,
        ``orientation_hist``, ``mean_orientation_deg``, ``nematic_order``; particle-like:
        ``aspect_ratio``, ``circularity`` distributions. Pixel values (``*_px``: pixel counts for areas,
        pixels for lengths) are always there; with ``pixel_size`` each has a physical twin
        ``*_<unit>`` for lengths and ``*_<unit>2`` for areas (``area_nm2``, ``length_nm``).

    Raises:
        ValueError: mask not 2-D / not integer / index out of range, bad pixel size, or class names
            in ``wire_classes``/``particle_classes`` that are not in ``classes``.
    """
    m = _check_mask(mask, _checked_classes(classes))
    pixel_size = _checked_pixel_size(pixel_size)
    kinds = _class_kinds(classes, wire_classes, particle_classes)
    units = _Units(pixel_size, unit_key(pixel_unit))
    h, w = m.shape
    total = float(h * w)
    counts = np.bincount(m.ravel(), minlength=len(classes))
    out_classes = {
        name: _measure_class(m, idx, kinds[name], int(counts[idx]), units)
        for idx, name in enumerate(classes)
        if idx != 0
    }
    summary = {
        "shape": [int(h), int(w)],
        "n_pixels": int(h * w),
        "pixel_size": pixel_size,
        "pixel_unit": pixel_unit if pixel_size is not None else None,
        "unit_key": units.unit if pixel_size is not None else None,
        "classes": [str(c) for c in classes],
        "background": str(classes[0]),
        "background_fraction": float(counts[0]) / total,
        "orientation_convention": "degrees in [0, 180), 0 = horizontal, counter-clockwise as displayed",
    }
    return {"summary": summary, "classes": out_classes}


def _checked_classes(classes: list[str]) -> int:
    """The number of classes, after checking the names (background first, unique)."""
    if not classes:
        raise ValueError("classes must list at least the background class (index 0)")
    if len(set(classes)) != len(classes):
        raise ValueError(f"class names must be unique, got {classes}")
    return len(classes)


def _checked_pixel_size(pixel_size: float | None) -> float | None:
    if pixel_size is None:
        return None
    pixel_size = float(pixel_size)
    if not math.isfinite(pixel_size) or pixel_size <= 0:
        raise ValueError(f"pixel_size must be a positive finite number, got {pixel_size}")
    return pixel_size


def _class_kinds(
    classes: list[str], wire_classes: set[str] | None, particle_classes: set[str] | None
) -> dict[str, str]:
    """Foreground class name -> ``"wire"`` | ``"particle"`` | ``"both"`` | ``"basic"``: from the
    given sets when either is given (unlisted classes are ``"basic"``), else guessed from the name
    by :func:`class_kind`."""
    foreground = classes[1:]
    if wire_classes is None and particle_classes is None:
        return {name: class_kind(name) for name in foreground}
    wires, parts = set(wire_classes or ()), set(particle_classes or ())
    unknown = (wires | parts) - set(foreground)
    if unknown:
        raise ValueError(f"unknown class names {sorted(unknown)}; known foreground classes: {foreground}")
    kinds = {(True, True): "both", (True, False): "wire", (False, True): "particle", (False, False): "basic"}
    return {name: kinds[(name in wires, name in parts)] for name in foreground}


@dataclass(frozen=True)
class _Units:
    """Writes each number in pixels (``key_px``) and, with a pixel size, its physical twin
    (``key_<unit>`` for lengths, ``key_<unit>2`` for areas)."""

    pixel_size: float | None
    unit: str

    def put(self, d: dict[str, Any], key: str, value_px: float | None, power: int = 1) -> None:
        suffix = "2" if power == 2 else ""
        d[f"{key}_px"] = _f(value_px)
        if self.pixel_size is not None:
            d[f"{key}_{self.unit}{suffix}"] = _f(
                None if value_px is None else value_px * self.pixel_size**power
            )

    def put_dist(self, d: dict[str, Any], key: str, values: np.ndarray, power: int = 1) -> None:
        suffix = "2" if power == 2 else ""
        d[f"{key}_px"] = _distribution(values)
        if self.pixel_size is not None:
            d[f"{key}_{self.unit}{suffix}"] = _distribution(values, self.pixel_size**power)


def _class_domains(
    m: np.ndarray, idx: int, area: int
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, bool, str | None]:
    """``(binary crop, domain labels, n domains, domain areas, percolates, direction)`` of class
    ``idx``. Domains are labelled on the class's bounding box (fast on sparse masks); percolation
    then only counts crop edges that are also frame edges."""
    box = _bbox(m == idx) if area else None
    if box is None:
        empty = np.zeros((1, 1), dtype=np.int32)
        return np.zeros((1, 1), dtype=bool), empty, 0, np.zeros(0), False, None
    binary = m[box] == idx
    labels, n = ndi.label(binary, structure=_STRUCT8)
    dom_areas = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(np.float64)
    percolates, direction = _percolation_cropped(labels, box, m.shape)
    return binary, labels, n, dom_areas, percolates, direction


def _measure_class(m: np.ndarray, idx: int, kind: str, area: int, units: _Units) -> dict[str, Any]:
    """The numbers of one foreground class (see :func:`measure`)."""
    res: dict[str, Any] = {"kind": kind}
    units.put(res, "area", float(area), 2)
    res["area_fraction"] = area / float(m.size)
    binary, labels, n, dom_areas, percolates, direction = _class_domains(m, idx, area)
    res["n_domains"] = int(n)
    units.put_dist(res, "domain_area", dom_areas, 2)
    units.put_dist(res, "equivalent_diameter", np.sqrt(4.0 * dom_areas / np.pi))
    res["percolates"] = percolates
    res["percolation_direction"] = direction
    if kind in ("wire", "both"):
        wire, dom_len, skel_len, length = _wire_numbers(binary, labels, n)
        units.put(res, "skeleton_length", skel_len)
        units.put(res, "length", length)
        units.put(res, "mean_width", area / length if length > 0 else None)
        units.put_dist(res, "domain_length", dom_len)
        res.update(wire)
    if kind in ("particle", "both"):
        if n:
            aspect, circ = _particle_shape(labels, n, dom_areas)
        else:
            aspect, circ = np.zeros(0), np.zeros(0)
        res["aspect_ratio"] = _distribution(aspect)
        res["circularity"] = _distribution(circ)
    return res


def _percolation_cropped(
    labels: np.ndarray, box: tuple[slice, slice], shape: tuple[int, int]
) -> tuple[bool, str | None]:
    """Percolation from a label crop: edges of the crop count only where they are frame edges."""
    h, w = shape
    rs, cs = box
    zero_r = np.zeros(labels.shape[0], dtype=labels.dtype)
    zero_c = np.zeros(labels.shape[1], dtype=labels.dtype)
    left = labels[:, 0] if cs.start == 0 else zero_r
    right = labels[:, -1] if cs.stop == w else zero_r
    top = labels[0, :] if rs.start == 0 else zero_c
    bottom = labels[-1, :] if rs.stop == h else zero_c
    edges = np.zeros((labels.shape[0] + 2, labels.shape[1] + 2), dtype=labels.dtype)
    edges[1:-1, 0], edges[1:-1, -1] = left, right
    edges[0, 1:-1], edges[-1, 1:-1] = top, bottom
    return _percolation(edges)


def overlay(image01: np.ndarray, mask: np.ndarray, n_classes: int, alpha: float = 0.45) -> np.ndarray:
    """Colour overlay of a class mask on a greyscale image, for reports and run folders.

    Args:
        image01: (H, W) image, already normalised to [0, 1] (e.g. ``contract.normalise``); values
            outside are clipped and non-finite ones shown black.
        mask: (H, W) integer class mask, 0 = background (left unpainted).
        n_classes: Number of classes including background; mask values must be below it.
        alpha: Opacity of the class colour over the image, in [0, 1].

    Returns:
        (H, W, 3) uint8 RGB image.

    Raises:
        ValueError: shapes differ, wrong dimensionality, alpha out of range or class index too big.
    """
    img = np.asarray(image01, dtype=np.float64)
    if img.ndim != 2:
        raise ValueError(f"image must be 2-D (H, W), got shape {img.shape}")
    m = _check_mask(mask, n_classes)
    if m.shape != img.shape:
        raise ValueError(f"mask shape {m.shape} does not match image shape {img.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    grey = np.clip(np.nan_to_num(img, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0) * 255.0
    rgb = np.repeat(grey[..., None], 3, axis=2)
    # Cycle the palette (skipping background) for more classes than colours.
    idx = np.where(m == 0, 0, (m - 1) % (len(PALETTE) - 1) + 1)
    colours = PALETTE[idx].astype(np.float64)
    fg = (m > 0)[..., None]
    rgb = np.where(fg, (1.0 - alpha) * rgb + alpha * colours, rgb)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def palette_256() -> np.ndarray:
    """(256, 3) uint8 colour of each class index: 0 black, then :data:`PALETTE` cycled as in
    :func:`overlay`."""
    idx = np.arange(256)
    return PALETTE[np.where(idx == 0, 0, (idx - 1) % (len(PALETTE) - 1) + 1)].astype(np.uint8)


def mask_to_png_bytes(mask: np.ndarray) -> bytes:
    """Encode a class mask losslessly as PNG: 8-bit palette when all values < 256, else 16-bit grey.

    The palette PNG stores the class index per pixel (what every PNG reader returns as the array)
    and colours it like :func:`overlay` in any image viewer; a plain 0/1 grey PNG looks black.

    Args:
        mask: (H, W) non-negative integer mask with values < 65536.

    Returns:
        PNG file bytes.

    Raises:
        ValueError: not 2-D, not integer, negative or too-large values.
    """
    from PIL import Image

    m = _check_mask(mask)
    hi = int(m.max())
    if hi > 65535:
        raise ValueError(f"mask value {hi} does not fit a 16-bit PNG")
    if hi < 256:
        img = Image.fromarray(m.astype(np.uint8))
        img.putpalette(palette_256().tobytes())  # L -> P: same indices, shown in colour
    else:
        img = Image.fromarray(m.astype(np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def png_bytes_to_mask(data: bytes) -> np.ndarray:
    """Decode a PNG (or other Pillow-readable) class mask written by :func:`mask_to_png_bytes`.

    Args:
        data: Image file bytes. Greyscale 8/16-bit and palette images are read as indices; RGB(A)
            is accepted only when all colour channels are equal (a grey mask saved as colour).

    Returns:
        (H, W) uint8 or uint16 array of class indices.

    Raises:
        ValueError: the bytes are not a readable image, or are a real colour image.
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            mode = img.mode
            arr = np.asarray(img)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"mask bytes are not a readable image: {exc}") from exc
    if arr.ndim == 3:
        colour = arr[..., :3] if arr.shape[-1] >= 3 else arr[..., :1]  # drop alpha (RGBA, LA)
        if not np.all(colour == colour[..., :1]):
            raise ValueError(f"mask is a colour ({mode}) image; expected one integer class index per pixel")
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"mask pixels must be integers, got {arr.dtype} ({mode})")
    if arr.dtype in (np.uint8, np.uint16):
        return np.ascontiguousarray(arr)
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) > 65535):
        raise ValueError(f"mask values out of range [0, 65535] ({mode})")
    return arr.astype(np.uint8 if (arr.size == 0 or int(arr.max()) < 256) else np.uint16)
