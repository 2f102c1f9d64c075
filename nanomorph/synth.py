"""Synthetic bright-field TEM images with exact masks: the project's bundled default data.

Two kinds of specimen, each with morphology classes that a CNN can tell apart from a few labels
while every image varies (counts, widths, lengths, curvature, contrast, dose):

* ``nanowires``: ``singular``, ``dispersed``, ``bundle``, ``network``, ``phase_separated``.
* ``particles``: ``spheres``, ``rods`` (log-normal size distributions, some aggregation).

Image formation follows the usual bright-field (mass-thickness) approximation: the transmitted
intensity is ``I = I0 * exp(-mu * t)`` with ``t`` the projected thickness of the objects (a
cylinder or capsule of radius ``r`` has chord ``2 * sqrt(r**2 - d**2)`` at distance ``d`` from its
axis), on an amorphous-carbon film with a filtered-noise texture and a low-frequency illumination
gradient; then a Gaussian point-spread, an under-focus Fresnel fringe (a bright halo, see Williams &
Carter, *Transmission Electron Microscopy*, 2nd ed., ch. 27), Poisson shot noise at a per-image dose
and Gaussian read noise, in raw camera counts. Wires follow a worm-like chain: the tangent angle does
a random walk with variance ``step / Lp`` for persistence length ``Lp`` (Kratky & Porod, 1949).

Everything is vectorised numpy/scipy: one Euclidean distance transform renders all the wires of an
image, so ~500 images of 256 px take seconds. Each image has its own seed derived from
``(seed, split, class, index)`` with :class:`numpy.random.SeedSequence`, so the output is the same
bytes on every run and an interrupted run resumes where it stopped.

``nanomorph synth --out DIR`` writes the folders of docs/data-layout.md (docs/architecture.md §1).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy import ndimage

from nanomorph import __version__
from nanomorph.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from nanomorph.config import save_resolved
from nanomorph.progress import Progress

log = logging.getLogger(__name__)

CLASSES: dict[str, list[str]] = {
    "nanowires": ["singular", "dispersed", "bundle", "network", "phase_separated"],
    "particles": ["spheres", "rods"],
}
FORMATS = ("png", "tiff16")
DEFAULT_PIXEL_SIZE_NM = 2.0
MIN_SIZE = 32
SUMMARY_NAME = "synth.json"
CONTACT_SHEET_NAME = "contact_sheet.png"
# Seed-sequence streams: labeled (classification + segmentation) and unlabeled images never share seeds.
_STREAM_LABELED = 0
_STREAM_UNLABELED = 1

Sample = tuple[np.ndarray, np.ndarray, np.ndarray | None]


# --------------------------------------------------------------------------------------------------
# Geometry: worm-like centerlines and their rasterisation
# --------------------------------------------------------------------------------------------------


def _wlc_path(
    rng: np.random.Generator, center: np.ndarray, theta: float, length: float, lp: float, step: float = 0.5
) -> np.ndarray:
    """Centerline of a worm-like chain, (n, 2) float (y, x), centred on ``center``.

    The tangent angle is a Gaussian random walk with variance ``step / lp`` per step (persistence
    length ``lp`` px); ``step`` below 1 px makes the rounded points an 8-connected line.
    """
    n = max(2, int(np.ceil(length / step)))
    angles = theta + np.cumsum(rng.normal(0.0, np.sqrt(step / lp), n))
    steps = step * np.stack([np.sin(angles), np.cos(angles)], axis=1)
    pts = np.cumsum(steps, axis=0)
    return pts - pts[n // 2] + center


def _normals(path: np.ndarray) -> np.ndarray:
    """Unit normals (n, 2) along a centerline, for offsetting parallel wires."""
    tangent = np.gradient(path, axis=0)
    tangent /= np.linalg.norm(tangent, axis=1, keepdims=True) + 1e-9
    return np.stack([-tangent[:, 1], tangent[:, 0]], axis=1)


def _inside(pts: np.ndarray, size: int) -> np.ndarray:
    ij = np.rint(pts).astype(np.int64)
    keep = (ij[:, 0] >= 0) & (ij[:, 0] < size) & (ij[:, 1] >= 0) & (ij[:, 1] < size)
    return ij[keep]


class _Occupancy:
    """Coarse occupancy grid so that wires meant to be separate do not touch (rejection sampling)."""

    def __init__(self, size: int, margin: float, cell: int = 4) -> None:
        self.cell = cell
        self.n = size // cell + 1
        self.grid = np.zeros((self.n, self.n), dtype=bool)
        self.pad = int(np.ceil(margin / cell))

    def _cells(self, ij: np.ndarray) -> np.ndarray:
        return np.unique(ij // self.cell, axis=0)

    def free(self, ij: np.ndarray) -> bool:
        if len(ij) == 0:
            return False
        c = self._cells(ij)
        return not self.grid[c[:, 0], c[:, 1]].any()

    def add(self, ij: np.ndarray) -> None:
        c = self._cells(ij)
        r = np.arange(-self.pad, self.pad + 1)
        yy = np.clip(c[:, 0, None, None] + r[None, :, None], 0, self.n - 1)
        xx = np.clip(c[:, 1, None, None] + r[None, None, :], 0, self.n - 1)
        yy, xx = np.broadcast_arrays(yy, xx)
        self.grid[yy.ravel(), xx.ravel()] = True


def _render_wires(
    paths: list[np.ndarray], radii: np.ndarray, factors: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Projected thickness of all wires with one distance transform.

    Each pixel takes the cylinder chord ``2*sqrt(r^2 - d^2)`` of its nearest centerline, so parallel
    wires in a bundle keep their own profile (visible striations) and crossings stay dark.

    Returns:
        (thickness float32 (H, W) scaled by the per-wire contrast factor, mask bool, nearest wire id).
    """
    ids = np.zeros((size, size), dtype=np.int32)
    for k, path in enumerate(paths, start=1):
        ij = _inside(path, size)
        ids[ij[:, 0], ij[:, 1]] = k
    if not ids.any():
        zero = np.zeros((size, size), dtype=np.float32)
        return zero, zero.astype(bool), ids
    dist, (iy, ix) = ndimage.distance_transform_edt(ids == 0, return_indices=True)
    nearest = ids[iy, ix]
    r = np.concatenate([[0.0], radii])[nearest]
    f = np.concatenate([[0.0], factors])[nearest]
    chord2 = r * r - dist * dist
    mask = chord2 > 0
    thickness = np.where(mask, 2.0 * np.sqrt(np.maximum(chord2, 0.0)) * f, 0.0).astype(np.float32)
    return thickness, mask, nearest


def _separate_wires(
    rng: np.random.Generator,
    size: int,
    n: int,
    length: tuple[float, float],
    lp: tuple[float, float],
    r_mean: float,
    margin: float,
    min_inside: float = 0.0,
    edge: float = 0.0,
) -> list[np.ndarray]:
    """``n`` wires that do not touch each other (rejection sampling, bounded tries, at least one).

    ``min_inside`` is the fraction of each wire that must lie in the frame and ``edge`` keeps wire
    centres that fraction of the side away from the border (so that a ``singular`` image never shows
    just a stub at its edge).
    """
    occ = _Occupancy(size, margin=2 * r_mean * 1.3 + margin)
    paths: list[np.ndarray] = []
    tries = 0
    while len(paths) < n and (tries < n * 12 or (not paths and tries < n * 12 + 200)):
        tries += 1
        path = _wlc_path(
            rng,
            rng.uniform(edge, 1.0 - edge, 2) * size,
            rng.uniform(0, 2 * np.pi),
            rng.uniform(*length) * size,
            rng.uniform(*lp),
        )
        ij = _inside(path, size)
        # Points are 0.5 px apart: len(ij) >= length[0] * size means at least half the shortest length.
        if len(ij) < max(length[0] * size, min_inside * len(path)) or not occ.free(ij):
            continue
        occ.add(ij)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# Morphology classes
# --------------------------------------------------------------------------------------------------


def _wire_radii(rng: np.random.Generator, n: int, r_mean: float, cv: float = 0.12) -> np.ndarray:
    return np.clip(rng.normal(r_mean, cv * r_mean, n), 1.1, None)


@dataclass
class _WireLayout:
    """The centre lines of one nanowire image before rendering, and its phase domains if any."""

    paths: list[np.ndarray]
    r_mean: float
    domain: np.ndarray | None = None  # phase_separated: wires are cut at this region's boundary ...
    stray: np.ndarray | None = None  # ... except these (per id of ``_render_wires``' nearest wire)
    matrix: np.ndarray | None = None  # matrix thickness (phase domains); None: no matrix


def _singular_wires(rng: np.random.Generator, size: int, s: float) -> _WireLayout:
    r_mean = rng.uniform(1.8, 4.0)
    n = int(rng.integers(1, 5))
    paths = _separate_wires(
        rng, size, n, (0.35, 0.85), (300, 4000), r_mean, margin=24 * s, min_inside=0.9, edge=0.15
    )
    return _WireLayout(paths, r_mean)


def _dispersed_wires(rng: np.random.Generator, size: int, s: float) -> _WireLayout:
    r_mean = rng.uniform(1.5, 3.2)
    n = max(6, int(rng.integers(14, 36) * s * s))
    return _WireLayout(_separate_wires(rng, size, n, (0.12, 0.32), (200, 3000), r_mean, margin=3), r_mean)


def _network_wires(rng: np.random.Generator, size: int, s: float) -> _WireLayout:
    r_mean = rng.uniform(1.4, 3.0)
    n = max(8, int(rng.integers(10, 24) * max(s, 0.6)))
    lp = rng.uniform(150, 1500)
    paths: list[np.ndarray] = []
    for k in range(n):
        length = rng.uniform(0.7, 1.4) * size
        if k > 0 and rng.random() < 0.5:
            # Branch from a point on an existing wire: junctions make the mesh connected.
            host = paths[int(rng.integers(len(paths)))]
            start = host[int(rng.integers(len(host)))]
            path = _wlc_path(rng, start, rng.uniform(0, 2 * np.pi), length, lp)
            path = path - path[0] + start
        else:
            path = _wlc_path(rng, rng.uniform(0, size, 2), rng.uniform(0, 2 * np.pi), length, lp)
        paths.append(path)
    return _WireLayout(paths, r_mean)


def _bundle_wires(rng: np.random.Generator, size: int, s: float) -> _WireLayout:
    r_mean = rng.uniform(1.3, 2.4)
    n_bundles = int(rng.integers(1, 4))
    paths: list[np.ndarray] = []
    for _ in range(n_bundles):
        # Fewer wires per bundle in small frames, so a bundle still fits in the field of view.
        m = max(3, int(rng.integers(4, 13) * min(1.0, max(s, 0.5))))
        gap = rng.uniform(0.0, 1.2)
        axis = _wlc_path(
            rng,
            rng.uniform(0.2, 0.8, 2) * size,
            rng.uniform(0, 2 * np.pi),
            rng.uniform(0.6, 1.3) * size,
            rng.uniform(800, 5000),
        )
        normal = _normals(axis)
        offsets = (np.arange(m) - (m - 1) / 2) * (2 * r_mean + gap)
        for off in offsets:
            a, b = np.sort(rng.uniform(0, 1, 2))
            a, b = a * 0.35, 0.65 + b * 0.35  # staggered wire ends along the bundle
            lo, hi = int(a * len(axis)), int(b * len(axis))
            jitter = rng.normal(0, 0.25)  # slight lateral disorder in the packing
            paths.append(axis[lo:hi] + normal[lo:hi] * (off + jitter))
    # A few stray wires between the bundles.
    for _ in range(int(rng.integers(0, 3))):
        paths.append(_wlc_path(rng, rng.uniform(0, size, 2), rng.uniform(0, 2 * np.pi), 0.25 * size, 800))
    return _WireLayout(paths, r_mean)


def _phase_separated_wires(rng: np.random.Generator, size: int, s: float) -> _WireLayout:
    r_mean = rng.uniform(1.4, 2.8)
    # Wire-rich domains from a thresholded smooth random field (spinodal-like pattern).
    field = ndimage.gaussian_filter(
        rng.normal(size=(size, size)), rng.uniform(0.07, 0.14) * size, mode="wrap"
    )
    domain = field > np.quantile(field, 1.0 - rng.uniform(0.3, 0.55))
    n = max(20, int(rng.integers(70, 140) * s * s))
    n_stray = int(rng.integers(0, 4))
    paths = []
    rich = np.argwhere(domain)
    for _ in range(n):
        center = rich[int(rng.integers(len(rich)))] + rng.uniform(-0.5, 0.5, 2)
        paths.append(_wlc_path(rng, center, rng.uniform(0, 2 * np.pi), rng.uniform(0.08, 0.22) * size, 400))
    for _ in range(n_stray):
        paths.append(
            _wlc_path(
                rng, rng.uniform(0, size, 2), rng.uniform(0, 2 * np.pi), rng.uniform(0.1, 0.2) * size, 800
            )
        )
    stray = np.concatenate([[False], np.zeros(n, bool), np.ones(n_stray, bool)])
    # The wire-rich phase also carries more matrix (slightly darker domains, soft edges).
    matrix = ndimage.gaussian_filter(domain.astype(np.float32), 2.0) * rng.uniform(0.3, 1.2)
    return _WireLayout(paths, r_mean, domain, stray, matrix)


_WIRE_LAYOUTS = {
    "singular": _singular_wires,
    "dispersed": _dispersed_wires,
    "network": _network_wires,
    "bundle": _bundle_wires,
    "phase_separated": _phase_separated_wires,
}


def _nanowires(rng: np.random.Generator, cls: str, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Thickness, semantic mask and matrix thickness (phase domains) for a nanowire class."""
    if cls not in _WIRE_LAYOUTS:
        raise ValueError(f"unknown nanowires class {cls!r}; choose from {CLASSES['nanowires']}")
    layout = _WIRE_LAYOUTS[cls](rng, size, size / 256.0)
    radii = _wire_radii(rng, len(layout.paths), layout.r_mean)
    factors = rng.uniform(0.85, 1.15, len(layout.paths))
    thickness, mask, nearest = _render_wires(layout.paths, radii, factors, size)
    if layout.domain is not None and layout.stray is not None:
        # Wires are confined to their domains: cut at the boundary, except the stray ones.
        keep = layout.domain | layout.stray[nearest]
        thickness = np.where(keep, thickness, 0.0).astype(np.float32)
        mask &= keep
    matrix = np.zeros((size, size), dtype=np.float32) if layout.matrix is None else layout.matrix
    return thickness, mask, matrix


def _capsule(
    yy: np.ndarray, xx: np.ndarray, c: np.ndarray, theta: float, half: float, r: float
) -> np.ndarray:
    """Chord through a capsule (sphere if ``half`` is 0) lying flat: ``2*sqrt(r^2 - d^2)``."""
    u = np.array([np.sin(theta), np.cos(theta)])
    py, px = yy - c[0], xx - c[1]
    along = np.clip(py * u[0] + px * u[1], -half, half)
    d2 = (py - along * u[0]) ** 2 + (px - along * u[1]) ** 2
    return 2.0 * np.sqrt(np.maximum(r * r - d2, 0.0))


def _particles(rng: np.random.Generator, cls: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Thickness and instance ids (uint16) for ``spheres`` or ``rods``."""
    if cls == "spheres":
        r_med = rng.uniform(4.0, 11.0)
        cv = rng.uniform(0.08, 0.3)
        coverage = rng.uniform(0.05, 0.22)
        n = int(np.clip(coverage * size * size / (np.pi * r_med**2), 3, 200))
        radii = r_med * rng.lognormal(0.0, cv, n)
        halves = np.zeros(n)
    elif cls == "rods":
        r_med = rng.uniform(2.2, 4.5)
        aspect = rng.uniform(2.8, 7.0)
        coverage = rng.uniform(0.04, 0.16)
        n = int(np.clip(coverage * size * size / (4 * r_med * r_med * aspect), 3, 200))
        radii = r_med * rng.lognormal(0.0, 0.15, n)
        halves = radii * np.clip(aspect * rng.lognormal(0.0, 0.25, n) - 1.0, 1.5, None)
    else:
        raise ValueError(f"unknown particles class {cls!r}; choose from {CLASSES['particles']}")
    p_agg = rng.uniform(0.1, 0.7)
    thickness = np.zeros((size, size), dtype=np.float32)
    best = np.zeros((size, size), dtype=np.float32)
    inst = np.zeros((size, size), dtype=np.uint16)
    # Placed particles as chains of axis points with radii, for the overlap test.
    pts = np.zeros((0, 2))
    pr = np.zeros(0)
    placed: list[tuple[np.ndarray, float, float, float]] = []
    for i in range(n):
        r, half = float(radii[i]), float(halves[i])
        for _ in range(20):
            if placed and rng.random() < p_agg:
                cj, tj, hj, rj = placed[int(rng.integers(len(placed)))]
                uj = np.array([np.sin(tj), np.cos(tj)])
                nj = np.array([-uj[1], uj[0]])
                if half == 0:  # spheres: touch a neighbour at a random angle
                    a = rng.uniform(0, 2 * np.pi)
                    c = cj + (r + rj) * rng.uniform(0.9, 1.02) * np.array([np.sin(a), np.cos(a)])
                    theta = 0.0
                elif rng.random() < 0.7:  # rods side by side
                    theta = tj + rng.normal(0, 0.12)
                    side = 1 if rng.random() < 0.5 else -1
                    c = cj + side * nj * (r + rj) * rng.uniform(0.95, 1.05) + uj * rng.uniform(-hj, hj) * 0.5
                else:  # rods end to end
                    theta = tj + rng.normal(0, 0.3)
                    side = 1 if rng.random() < 0.5 else -1
                    c = cj + side * uj * (hj + half + r + rj) * rng.uniform(0.95, 1.05)
            else:
                c = rng.uniform(0, size, 2)
                theta = rng.uniform(0, np.pi)
            u = np.array([np.sin(theta), np.cos(theta)])
            k = 1 + int(np.ceil(2 * half / max(r, 1.0)))
            axis_pts = c + np.linspace(-half, half, k)[:, None] * u
            if len(pts):
                d = np.linalg.norm(axis_pts[:, None, :] - pts[None, :, :], axis=2)
                if (d < 0.85 * (r + pr[None, :])).any():
                    continue
            break
        else:
            continue
        placed.append((c, theta, half, r))
        pts = np.concatenate([pts, axis_pts])
        pr = np.concatenate([pr, np.full(k, r)])
        ext = half + r + 1
        y0, y1 = max(0, int(c[0] - ext)), min(size, int(np.ceil(c[0] + ext)) + 1)
        x0, x1 = max(0, int(c[1] - ext)), min(size, int(np.ceil(c[1] + ext)) + 1)
        if y0 >= y1 or x0 >= x1:
            continue
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float64)
        # Diffraction (Bragg) contrast: each crystal is darker or lighter depending on its orientation.
        t = (_capsule(yy, xx, c, theta, half, r) * rng.uniform(0.7, 1.5)).astype(np.float32)
        region = (slice(y0, y1), slice(x0, x1))
        thickness[region] += t
        win = t > best[region]
        inst[region][win] = len(placed)
        best[region] = np.maximum(best[region], t)
    # Relabel to consecutive ids (a particle entirely outside the frame leaves a gap).
    ids = np.unique(inst)
    ids = ids[ids > 0]
    lut = np.zeros(int(inst.max()) + 1, dtype=np.uint16)
    lut[ids] = np.arange(1, len(ids) + 1, dtype=np.uint16)
    return thickness, lut[inst]


# --------------------------------------------------------------------------------------------------
# Image formation
# --------------------------------------------------------------------------------------------------


def _microscope(rng: np.random.Generator, thickness: np.ndarray, mu: float) -> np.ndarray:
    """Bright-field image formation in raw camera counts (float32)."""
    size = thickness.shape[0]
    # Amorphous carbon film: band-limited thickness noise, plus a few faint contamination blobs.
    film = ndimage.gaussian_filter(rng.normal(size=thickness.shape), rng.uniform(0.8, 2.5))
    film *= rng.uniform(0.02, 0.06) / (film.std() + 1e-9)
    blobs = np.zeros_like(thickness)
    for _ in range(int(rng.integers(0, 5))):
        y, x = rng.integers(0, size, 2)
        blobs[y, x] = 1.0
    blobs = ndimage.gaussian_filter(blobs, rng.uniform(2, 6)) * rng.uniform(20, 80)
    transmission = np.exp(-mu * thickness - film - 0.1 * blobs)
    # Illumination: slow gradient across the field (tilted / off-centre beam).
    g = np.linspace(-1.0, 1.0, size)
    gy, gx = np.meshgrid(g, g, indexing="ij")
    a, b, q = rng.uniform(-0.12, 0.12, 3)
    cy, cx = rng.uniform(-1, 1, 2)
    illum = 1.0 + a * gy + b * gx - abs(q) * ((gy - cy) ** 2 + (gx - cx) ** 2) / 4
    image = illum * transmission
    # Optics: Gaussian PSF, then an under-focus Fresnel fringe (unsharp-mask-like bright halo).
    sigma = rng.uniform(0.5, 1.4)
    image = ndimage.gaussian_filter(image, sigma)
    fringe = rng.uniform(0.0, 0.6)
    image = image + fringe * (image - ndimage.gaussian_filter(image, 2.5 * sigma))
    # Detector: shot noise at this image's dose, gain, offset, read noise.
    dose = np.exp(rng.uniform(np.log(50.0), np.log(500.0)))  # e-/px at full transmission, log-uniform
    electrons = rng.poisson(np.clip(image, 0, None) * dose)
    gain = rng.uniform(2.0, 8.0)
    counts = 100.0 + gain * electrons + rng.normal(0.0, rng.uniform(1.0, 6.0), image.shape)
    return np.clip(counts, 0, 65535).astype(np.float32)


def render_sample(kind: str, cls: str, size: int, rng: np.random.Generator) -> Sample:
    """Renders one synthetic bright-field TEM image in memory.

    Args:
        kind: ``"nanowires"`` or ``"particles"`` (keys of :data:`CLASSES`).
        cls: a class of that kind.
        size: side of the square image in pixels (>= 32).
        rng: random generator; the same generator state gives the same image.

    Returns:
        ``(image, semantic, instances)``: image float32 (H, W) in raw camera counts (dark objects
        on a brighter background, roughly 100..6000 counts); semantic uint8 mask (0 background, 1
        wire/particle); instance ids uint16 (0 background, 1..n) for particles, ``None`` for wires.

    Raises:
        ValueError: unknown kind or class, or size below 32.
    """
    if kind not in CLASSES:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(CLASSES)}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be at least {MIN_SIZE} px, got {size}")
    if kind == "nanowires":
        thickness, mask, matrix = _nanowires(rng, cls, size)
        # Wire contrast: centre transmission of a typical wire between 0.3 and 0.7.
        r_ref = float(thickness.max()) / 2 if thickness.any() else 2.0
        mu = -np.log(rng.uniform(0.3, 0.7)) / (2 * r_ref)
        image = _microscope(rng, thickness + matrix / max(mu, 1e-6) * 0.15, mu)
        return image, mask.astype(np.uint8), None
    thickness, inst = _particles(rng, cls, size)
    # Particles (e.g. metal) absorb more: centre transmission 0.12 .. 0.5.
    r_ref = float(np.percentile(thickness[thickness > 0], 90)) / 2 if thickness.any() else 4.0
    mu = -np.log(rng.uniform(0.12, 0.5)) / (2 * r_ref)
    image = _microscope(rng, thickness, mu)
    return image, (inst > 0).astype(np.uint8), inst


# --------------------------------------------------------------------------------------------------
# Writing files
# --------------------------------------------------------------------------------------------------


def _rng_for(seed: int, stream: int, *key: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, stream, *key]))


def _labeled_stem(seed: int, kind: str, cls: str, j: int) -> str:
    """A stable stem that hides the class (sorted order mixes the classes)."""
    return "s_" + hashlib.sha1(f"{seed}/{kind}/{cls}/{j}".encode()).hexdigest()[:12]


def _to_uint8(image: np.ndarray) -> np.ndarray:
    """Linear map of raw counts to 8 bits, clipping only the extreme 0.01 % tails (file encoding,
    not model preprocessing: the model side uses ``nanomorph.contract.normalise``)."""
    lo, hi = np.percentile(image, [0.01, 99.99])
    scaled = (image - lo) / max(float(hi - lo), 1e-6)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def _png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def write_image(path: Path, image: np.ndarray, fmt: str, pixel_size_nm: float) -> None:
    """Writes raw counts as 8-bit PNG or as 16-bit TIFF carrying the pixel size.

    The TIFF is ImageJ-flavoured: ``XResolution``/``YResolution`` = pixels per nm and the ImageJ
    description ``unit=nm``, which Fiji, tifffile (``imagej_metadata``) and the contract reader read.
    """
    if fmt == "png":
        atomic_write_bytes(path, _png_bytes(_to_uint8(image)))
    elif fmt == "tiff16":
        import tifffile

        arr = np.clip(np.rint(image), 0, 65535).astype(np.uint16)
        res = 1.0 / pixel_size_nm
        with atomic_path(path) as tmp:
            tifffile.imwrite(tmp, arr, imagej=True, resolution=(res, res), metadata={"unit": "nm"})
    else:
        raise ValueError(f"unknown format {fmt!r}; choose from {FORMATS}")


def write_mask(path: Path, mask: np.ndarray) -> None:
    """Integer mask PNG (uint8 semantic classes, uint16 instance ids)."""
    atomic_write_bytes(path, _png_bytes(mask))


def _link_or_copy(src: Path, dst: Path) -> str:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:  # other file system, or links not supported
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return "copy"


def generate(
    kind: str,
    n_per_class: int,
    size: int,
    seed: int,
    out_dir: str | Path,
    fmt: str = "png",
    pixel_size_nm: float = DEFAULT_PIXEL_SIZE_NM,
    n_unlabeled: int | None = None,
    contact_sheet: bool = True,
) -> dict[str, Any]:
    """Writes a synthetic data set in the layout of docs/data-layout.md and returns its summary.

    Layout under ``out_dir``: ``unlabeled/u_NNNNNN.<ext>`` (separate renders, never the labeled
    images), ``classification/<class>/<stem>.<ext>``, ``segmentation/images/<stem>.<ext>`` (hard
    links to the classification files, or copies where links fail), ``segmentation/masks/<stem>.png``
    (uint8, 0 background / 1 object), ``segmentation/instances/<stem>.png`` (uint16, particles only),
    ``synth.json`` and ``contact_sheet.png``. Files already there are skipped, so an interrupted
    run resumes and a repeated run does no work; the bytes depend only on the arguments.

    Args:
        kind: ``"nanowires"`` or ``"particles"``.
        n_per_class: labeled images per class.
        size: image side in pixels (>= 32).
        seed: master seed.
        out_dir: output folder.
        fmt: ``"png"`` (8-bit) or ``"tiff16"`` (16-bit raw counts with the pixel size in metadata).
        pixel_size_nm: pixel size written into TIFF metadata and the summary.
        n_unlabeled: unlabeled images (classes mixed); default ``n_per_class * number of classes``.
        contact_sheet: also write ``contact_sheet.png``.

    Returns:
        The summary also written to ``out_dir/synth.json``.

    Raises:
        ValueError: bad arguments, or ``out_dir`` holds a data set made with other settings.
    """
    _check_generate_args(kind, fmt, size, n_per_class, n_unlabeled, pixel_size_nm)
    classes = CLASSES[kind]
    n_unl = n_per_class * len(classes) if n_unlabeled is None else n_unlabeled
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    identity = {"kind": kind, "size": size, "seed": seed, "format": fmt, "pixel_size_nm": pixel_size_nm}
    summary_path = out / SUMMARY_NAME
    previous = _previous_summary(summary_path, identity)
    out.mkdir(parents=True, exist_ok=True)
    job = _SynthJob(out, kind, size, seed, fmt, pixel_size_nm)
    t0 = time.perf_counter()
    progress = Progress(n_per_class * len(classes) + n_unl, f"synth {kind}", interval_s=None, logger=log)
    written, skipped, link_mode = _write_labeled(
        job, n_per_class, progress, str(previous.get("segmentation_images", "hardlink"))
    )
    more, already = _write_unlabeled(job, n_unl, progress)
    written, skipped = written + more, skipped + already
    progress.close()
    seconds = time.perf_counter() - t0
    if contact_sheet and n_per_class > 0:
        make_contact_sheet(out, classes, out / CONTACT_SHEET_NAME)
    summary: dict[str, Any] = {
        "generator": f"nanomorph.synth {__version__}",
        "args": {**identity, "n_per_class": n_per_class, "n_unlabeled": n_unl},
        "classes": classes,
        "counts": {
            "classification": {c: _count(out / "classification" / c) for c in classes},
            "segmentation": _count(out / "segmentation" / "images"),
            "unlabeled": _count(out / "unlabeled"),
        },
        "written": written,
        "skipped": skipped,
        "seconds": round(seconds, 3),
        "images_per_second": round(written / seconds, 1) if written and seconds > 0 else None,
        "segmentation_images": link_mode,
        "masks": {"semantic": {"0": "background", "1": "wire" if kind == "nanowires" else "particle"}},
        "instances": kind == "particles",
    }
    atomic_write_text(summary_path, json.dumps(summary, indent=2) + "\n")
    return summary


def _check_generate_args(
    kind: str, fmt: str, size: int, n_per_class: int, n_unlabeled: int | None, pixel_size_nm: float
) -> None:
    if kind not in CLASSES:
        raise ValueError(f"unknown kind {kind!r}; choose from {sorted(CLASSES)}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose from {', '.join(FORMATS)}")
    if size < MIN_SIZE:
        raise ValueError(f"--size must be at least {MIN_SIZE} px, got {size}")
    if n_per_class < 0 or (n_unlabeled is not None and n_unlabeled < 0):
        raise ValueError("image counts must be >= 0")
    if not pixel_size_nm > 0:
        raise ValueError(f"--pixel-size must be > 0 nm, got {pixel_size_nm}")


def _previous_summary(summary_path: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The summary of the data set already in the folder (``{}`` if none); refuses one made with
    other settings (``identity``), so that a folder never mixes two data sets."""
    if not summary_path.is_file():
        return {}
    try:
        previous = json.loads(summary_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ValueError(f"{summary_path}: not valid JSON ({exc}); delete it to start over") from exc
    if not isinstance(previous, dict) or not isinstance(previous.get("args"), dict):
        raise ValueError(f"{summary_path}: not a nanomorph synth summary; delete it to start over")
    old = {k: previous["args"].get(k) for k in identity}
    if old != identity:
        diff = ", ".join(f"{k} {old[k]!r} -> {identity[k]!r}" for k in identity if old[k] != identity[k])
        raise ValueError(
            f"{summary_path}: this folder holds a data set made with other settings ({diff}); "
            "use another --out or delete the folder"
        )
    return previous


@dataclass(frozen=True)
class _SynthJob:
    """What decides the bytes of every file of one data set (and where they go)."""

    out: Path
    kind: str
    size: int
    seed: int
    fmt: str
    pixel_size_nm: float

    @property
    def ext(self) -> str:
        return "png" if self.fmt == "png" else "tif"


def _write_labeled(
    job: _SynthJob, n_per_class: int, progress: Progress, link_mode: str
) -> tuple[int, int, str]:
    """The labeled images with their masks (files already there are skipped):
    ``(written, skipped, how segmentation images were made: "hardlink" | "copy")``."""
    written = skipped = 0
    out, ext = job.out, job.ext
    for ci, cls in enumerate(CLASSES[job.kind]):
        for j in range(n_per_class):
            stem = _labeled_stem(job.seed, job.kind, cls, j)
            cls_path = out / "classification" / cls / f"{stem}.{ext}"
            seg_img = out / "segmentation" / "images" / f"{stem}.{ext}"
            mask_path = out / "segmentation" / "masks" / f"{stem}.png"
            inst_path = out / "segmentation" / "instances" / f"{stem}.png"
            needed = [cls_path, seg_img, mask_path] + ([inst_path] if job.kind == "particles" else [])
            if all(p.is_file() for p in needed):
                skipped += 1
            else:
                rng = _rng_for(job.seed, _STREAM_LABELED, ci, j)
                image, semantic, inst = render_sample(job.kind, cls, job.size, rng)
                write_mask(mask_path, semantic)
                if inst is not None:
                    write_mask(inst_path, inst)
                write_image(cls_path, image, job.fmt, job.pixel_size_nm)
                # The segmentation image is the same file (hard link): same pixels, half the disk.
                if _link_or_copy(cls_path, seg_img) == "copy":
                    link_mode = "copy"
                written += 1
            progress.update()
    return written, skipped, link_mode


def _write_unlabeled(job: _SynthJob, n_unlabeled: int, progress: Progress) -> tuple[int, int]:
    """Separate renders of random classes (files already there are skipped): ``(written, skipped)``."""
    written = skipped = 0
    classes = CLASSES[job.kind]
    for j in range(n_unlabeled):
        path = job.out / "unlabeled" / f"u_{j:06d}.{job.ext}"
        if path.is_file():
            skipped += 1
        else:
            rng = _rng_for(job.seed, _STREAM_UNLABELED, j)
            cls = classes[int(rng.integers(len(classes)))]
            image, _, _ = render_sample(job.kind, cls, job.size, rng)
            write_image(path, image, job.fmt, job.pixel_size_nm)
            written += 1
        progress.update()
    return written, skipped


def _count(folder: Path) -> int:
    return (
        sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
        if folder.is_dir()
        else 0
    )


# --------------------------------------------------------------------------------------------------
# Contact sheet (Pillow only)
# --------------------------------------------------------------------------------------------------


def _display(path: Path) -> np.ndarray:
    from nanomorph.contract import Contract, normalise, read_image

    image, _ = read_image(path)
    return np.rint(normalise(image, Contract()) * 255).astype(np.uint8)


def make_contact_sheet(
    root: str | Path,
    classes: Iterable[str],
    dest: str | Path,
    per_class: int = 6,
    thumb: int = 128,
) -> Path:
    """A grid of ``per_class`` images per class from ``root/classification``, one labelled row each.

    Args:
        root: data set folder (holding ``classification/<class>/``).
        classes: rows, in order.
        dest: output PNG.
        per_class: images per row.
        thumb: thumbnail side in pixels.

    Returns:
        ``dest``.
    """
    root, dest = Path(root), Path(dest)
    classes = list(classes)
    label_w, pad = 120, 4
    width = label_w + per_class * (thumb + pad) + pad
    height = len(classes) * (thumb + pad) + pad
    sheet = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for row, cls in enumerate(classes):
        y = pad + row * (thumb + pad)
        draw.text((6, y + thumb // 2 - 6), cls, fill=0, font=font)
        files = sorted(p for p in (root / "classification" / cls).glob("*") if not p.name.startswith("."))
        for col, path in enumerate(files[:per_class]):
            im = Image.fromarray(_display(path)).resize((thumb, thumb), Image.Resampling.LANCZOS)
            sheet.paste(im, (label_w + pad + col * (thumb + pad), y))
    atomic_write_bytes(dest, _png_bytes(np.asarray(sheet)))
    return dest


# --------------------------------------------------------------------------------------------------
# the command (nanomorph.cli.synth calls run)
# --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """Runs ``nanomorph synth``; prints a one-line summary."""
    if args.out is None:
        raise ValueError("--out is required (the folder to write the data set into)")
    summary = generate(
        kind=args.kind,
        n_per_class=args.n_per_class,
        size=args.size,
        seed=args.seed,
        out_dir=args.out,
        fmt=args.format,
        pixel_size_nm=args.pixel_size,
        n_unlabeled=args.n_unlabeled,
        contact_sheet=args.contact_sheet,
    )
    save_resolved(args, args.out)
    counts = summary["counts"]
    print(
        f"synth {args.kind}: {sum(counts['classification'].values())} labeled "
        f"({', '.join(f'{c} {n}' for c, n in counts['classification'].items())}), "
        f"{counts['unlabeled']} unlabeled in {args.out} "
        f"(written {summary['written']}, skipped {summary['skipped']}, {summary['seconds']:.1f} s)"
    )
    return 0
