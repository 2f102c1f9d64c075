"""Particle instances, tables and size distributions on drawn discs and rods with known ids."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from skimage.draw import disk, ellipse

from nanomorph.particles import (
    InstanceParams,
    average_precision,
    connected_instances,
    fold_mask,
    instance_target,
    instances_from_probs,
    lognormal_fit,
    match_instances,
    particle_table,
    seed_floor,
    segment_probs,
    semantic_classes,
    size_distribution_png,
    summarize,
    table_csv,
)

CLASSES = ["background", "particle"]
PARAMS = InstanceParams(boundary_class=2)


def drawing() -> tuple[np.ndarray, dict[int, dict[str, float]]]:
    """Touching discs (a pair and a chain of three), two touching rods, one disc cut by the frame."""
    ids = np.zeros((200, 240), np.int32)
    truth: dict[int, dict[str, float]] = {}

    def put(label: int, rr: np.ndarray, cc: np.ndarray, **facts: float) -> None:
        ids[rr, cc] = label
        truth[label] = facts

    put(1, *disk((40, 40), 15), r=15)
    put(2, *disk((40, 69), 15), r=15)  # touches 1 (centres 29 px apart)
    for k, x in enumerate((120, 141, 162)):  # a chain of three r=11 discs, overlapping by 1 px
        put(3 + k, *disk((40, x), 11, shape=ids.shape), r=11)
    # Rods: ellipses with semi-axes 24 x 7, horizontal and at 30 degrees, their tips touching.
    put(6, *ellipse(120, 60, 7, 24, shape=ids.shape), a=24, b=7, angle=0.0)
    put(7, *ellipse(120, 97, 7, 24, shape=ids.shape, rotation=math.radians(30)), a=24, b=7, angle=30.0)
    put(8, *disk((190, 200), 20, shape=ids.shape), r=20)  # cut by the bottom edge
    return ids, truth


def probs_from(ids: np.ndarray, blur: float = 0.0) -> np.ndarray:
    """What a perfect boundary-aware model would output for ``ids`` (one-hot of the 3-class target)."""
    target = instance_target(ids, (ids > 0).astype(np.uint8), PARAMS.boundary_class, PARAMS.boundary_width)
    p = np.eye(3, dtype=np.float32)[target].transpose(2, 0, 1)
    if blur:
        from scipy.ndimage import gaussian_filter

        p = np.stack([gaussian_filter(c, blur) for c in p])
        p /= p.sum(0, keepdims=True)
    return p


def test_instance_target_puts_a_rim_between_touching_particles() -> None:
    ids, _ = drawing()
    target = instance_target(ids, (ids > 0).astype(np.uint8), 2, width=2)
    assert set(np.unique(target)) == {0, 1, 2}
    # Along the row through the touching pair: rim pixels where 1 meets 2, interior on both sides.
    row = target[40, 20:90]
    contact = 69 - 14 - 20  # first column of disc 2 (skimage's disk is open), relative to the slice
    assert (row[contact - 1 : contact + 1] == 2).all()  # width 2: one rim pixel on each side
    assert row[contact - 2] == 1 and row[contact + 1] == 1
    # The frame edge is not a rim: disc 8 keeps interior on the last row.
    assert target[199, 200] == 1


@pytest.mark.parametrize("blur", [0.0, 1.0])
def test_touching_discs_and_rods_separate(blur: float) -> None:
    ids, truth = drawing()
    probs = probs_from(ids, blur)
    found = instances_from_probs(probs, PARAMS)
    iou = match_instances(ids, found)
    assert found.max() == len(truth)
    assert average_precision(iou, 0.75)["ap"] == 1.0
    # Connected components of the same mask merge the touching ones: what the boundary class fixes.
    merged = connected_instances(fold_mask(probs, PARAMS))
    assert merged.max() == 4  # pair, chain, two rods, cut disc


def test_table_matches_the_drawing() -> None:
    ids, truth = drawing()
    mask, found, classes = segment_probs(probs_from(ids), ["background", "particle", "boundary"], PARAMS)
    assert classes == CLASSES and set(np.unique(mask)) == {0, 1}
    rows = particle_table(found, mask, classes, image="drawn.png")
    by_truth = {int(np.bincount(ids[found == r["id"]]).argmax()): r for r in rows}
    for label, facts in truth.items():
        r = by_truth[label]
        assert r["image"] == "drawn.png" and r["class"] == "particle"
        assert r["area_px"] == int((ids == label).sum())  # every pixel comes back to its particle
        if "r" in facts and label != 8:
            radius = facts["r"]
            assert abs(r["diameter_px"] - 2 * radius) <= 1.0
            assert abs(r["area_px"] - math.pi * radius**2) <= 2 * math.pi * radius  # a pixel's worth
            assert abs(r["aspect_ratio"] - 1.0) < 0.1 and r["circularity"] > 0.85
            assert not r["touches_border"]
        elif "a" in facts:
            a, b = facts["a"], facts["b"]
            assert abs(r["major_axis_px"] - 2 * a) <= 1.0 and abs(r["minor_axis_px"] - 2 * b) <= 1.0
            assert abs(r["aspect_ratio"] - a / b) <= (2 * a + 1) / (2 * b - 1) - a / b
            # 30 degrees counter-clockwise as displayed (skimage's rotation is in (row, col) axes).
            assert (
                min(
                    abs(r["orientation_deg"] - facts["angle"]),
                    180 - abs(r["orientation_deg"] - facts["angle"]),
                )
                < 2
            )
    assert by_truth[8]["touches_border"]
    cx, cy = by_truth[1]["centroid_x_px"], by_truth[1]["centroid_y_px"]
    assert abs(cx - 40) < 0.5 and abs(cy - 40) < 0.5


def test_units_convert_and_border_particles_leave_the_statistics() -> None:
    ids, truth = drawing()
    mask = (ids > 0).astype(np.uint8)
    px = particle_table(ids, mask, CLASSES)
    nm = particle_table(ids, mask, CLASSES, pixel_size=2.5, pixel_unit="nm")
    for a, b in zip(px, nm, strict=True):
        assert a["diameter"] is None and a["unit"] is None
        assert b["unit"] == "nm" and b["pixel_size"] == 2.5
        assert b["diameter"] == pytest.approx(a["diameter_px"] * 2.5, rel=1e-5)
        assert b["area"] == pytest.approx(a["area_px"] * 6.25, rel=1e-5)
        assert b["major_axis"] == pytest.approx(a["major_axis_px"] * 2.5, rel=1e-5)
    s_px, s_nm = summarize(px, ids.shape), summarize(nm, ids.shape, 2.5)
    assert s_px["count"] == len(truth) - 1 and s_px["n_border"] == 1
    assert s_px["unit"] == "px" and s_nm["unit"] == "nm"
    assert s_nm["diameter_median"] == pytest.approx(s_px["diameter_median"] * 2.5, rel=1e-5)
    assert s_px["number_density"] == pytest.approx(7 / (200 * 240), rel=1e-5)
    assert s_nm["number_density"] == pytest.approx(7 / (200 * 240 * 6.25), rel=1e-5)
    assert summarize(px, ids.shape, include_border=True)["count"] == len(truth)
    text = table_csv(nm)
    assert text.splitlines()[0].startswith("image,id,class,area_px,diameter_px")
    assert len(text.splitlines()) == len(truth) + 1
    png = size_distribution_png(nm, "drawn")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_lognormal_fit_recovers_known_parameters() -> None:
    d = np.random.default_rng(0).lognormal(mean=math.log(20), sigma=0.3, size=20000)
    fit = lognormal_fit(d)
    assert fit["geometric_mean"] == pytest.approx(20, rel=0.01)
    assert fit["sigma"] == pytest.approx(0.3, rel=0.02)
    assert lognormal_fit(np.array([5.0]))["mu"] is None


def test_matching_is_one_to_one() -> None:
    truth = np.zeros((10, 20), int)
    truth[:, :10], truth[:, 10:] = 1, 2
    merged = (truth > 0).astype(int)  # one prediction over two particles: IoU 0.5 each, no match
    r = average_precision(match_instances(truth, merged), 0.5)
    assert (r["tp"], r["fp"], r["fn"]) == (0, 1, 2)
    assert average_precision(match_instances(truth, truth * 7), 0.75)["ap"] == 1.0


def test_matching_does_not_depend_on_the_ids_chosen() -> None:
    """Any ids name the same particles: gaps, huge ids (the sort path) and permutations give the
    IoU matrix of ids 1..n in ascending order; negative ids are refused."""
    ids, _ = drawing()
    n = int(ids.max())
    perm = np.random.default_rng(0).permutation(n) + 1
    renamed = np.concatenate([[0], perm])[ids]  # particle i is now perm[i - 1]
    iou = match_instances(ids, renamed)
    assert iou.shape == (n, n) and np.allclose(iou[np.arange(n), perm - 1], 1.0)
    for other in (ids * 1000 + (ids > 0), ids.astype(np.int64) * 10**12):
        assert np.allclose(match_instances(ids, other), np.eye(n))
    with pytest.raises(ValueError, match=">= 0"):
        match_instances(ids, -ids)


def test_params_round_trip_and_semantic_model_falls_back_to_components() -> None:
    assert InstanceParams.from_dict(PARAMS.to_dict()) == PARAMS
    assert InstanceParams.from_dict(None) is None
    with pytest.raises(ValueError, match="unknown instance method"):
        InstanceParams.from_dict({"method": "magic"})
    assert semantic_classes(["background", "particle", "boundary"], PARAMS) == CLASSES
    ids, _ = drawing()
    probs = np.eye(2, dtype=np.float32)[(ids > 0).astype(int)].transpose(2, 0, 1)
    mask, found, classes = segment_probs(probs, CLASSES, None)
    assert classes == CLASSES and found.max() == 4


def test_smoothing_and_unseeded_blobs_follow_the_params() -> None:
    """Single-pixel speckle vanishes with smoothing; a blob too faint to seed stays only when asked."""
    ids, truth = drawing()
    probs = probs_from(ids)
    speckle = [(100, 200), (150, 20), (180, 120), (10, 230)]  # lone "particle" pixels on the background
    for y, x in speckle:
        probs[:, y, x] = (0.0, 1.0, 0.0)
    faint = (slice(150, 160), slice(150, 160))  # foreground, but P(interior) 0.4 < seed threshold 0.5
    probs[:, faint[0], faint[1]] = np.array([0.25, 0.4, 0.35], np.float32)[:, None, None]
    loose = InstanceParams(boundary_class=2, min_seed_area=1, min_area=1)
    assert instances_from_probs(probs, loose).max() == len(truth) + len(speckle) + 1
    smoothed = instances_from_probs(probs, InstanceParams(boundary_class=2, min_area=1, smoothing=1.0))
    assert smoothed.max() == len(truth) + 1  # the faint blob is still there, the speckle is not
    strict = InstanceParams(boundary_class=2, min_area=1, smoothing=1.0, keep_unseeded=False)
    assert instances_from_probs(probs, strict).max() == len(truth)
    # Models stored before these two existed read as they behaved: no smoothing, unseeded kept.
    old = {k: v for k, v in PARAMS.to_dict().items() if k not in ("smoothing", "keep_unseeded")}
    assert InstanceParams.from_dict(old) == PARAMS


def test_seed_floor_is_a_share_of_the_area_weighted_median_seed() -> None:
    seeds = np.zeros((80, 80), np.int64)
    seeds[0:2, 0:2] = 1  # 4 px
    seeds[10:20, 0:10] = 2  # 100 px
    seeds[10:20, 20:30] = 3  # 100 px
    seeds[40:60, 40:60] = 4  # 400 px
    # Seed pixels sorted by seed size: 4, 100, 100 | 400 -> half of the 604 pixels lie in the 400-px seed.
    assert seed_floor(seeds, 4, 0.1) == 40
    assert seed_floor(seeds, 64, 0.1) == 64  # the absolute floor when it is the larger
    assert seed_floor(seeds, 4, 0.0) == 4
    assert seed_floor(np.zeros((5, 5), np.int64), 4, 0.5) == 4  # no seeds


def scaled_frame(radius: int, positions: list[tuple[int, int]], blobs: int) -> tuple[np.ndarray, np.ndarray]:
    """Discs of one radius, plus ``blobs`` 8 x 8 false particles (seeded) on the background."""
    ids = np.zeros((256, 256), np.int64)
    for k, (cy, cx) in enumerate(positions):
        ids[disk((cy, cx), radius, shape=ids.shape)] = k + 1
    probs = probs_from(ids)
    for b in range(blobs):
        probs[:, 240:248, 8 + 20 * b : 16 + 20 * b] = np.array([0.0, 1.0, 0.0], np.float32)[:, None, None]
    return probs, ids


def test_a_seed_floor_relative_to_the_image_serves_every_magnification() -> None:
    """Small particles at one magnification, large ones with 64-px false blobs at another: no
    absolute minimum seed keeps the first and drops the second; a share of the typical seed does."""
    small = scaled_frame(5, [(30 + 30 * i, 40 + 30 * j) for i in range(3) for j in range(3)], blobs=0)
    large = scaled_frame(45, [(60, 60), (60, 170), (170, 110)], blobs=4)
    frames = [small, large]

    def ap(params: InstanceParams) -> float:
        scores = [
            average_precision(match_instances(t, instances_from_probs(p, params)), 0.5)["ap"]
            for p, t in frames
        ]
        return float(np.mean(scores))

    base = InstanceParams(boundary_class=2, keep_unseeded=False)
    for min_seed in (4, 16, 64, 256, 1024):
        assert ap(replace(base, min_seed_area=min_seed)) < 0.9
    assert ap(replace(base, min_seed_fraction=0.1)) == pytest.approx(1.0)
    # Models stored before the fraction existed read as they behaved: no relative floor.
    old = {k: v for k, v in base.to_dict().items() if k != "min_seed_fraction"}
    assert InstanceParams.from_dict(old) == base
