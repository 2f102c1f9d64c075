"""Morphology numbers from drawn shapes with known answers, overlays and mask PNG transport."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage as ndi
from skimage.draw import disk, polygon
from skimage.measure import regionprops

from nanomorph.morphology import (
    N_ORIENTATION_BINS,
    PALETTE,
    _distance_to_background,
    class_kind,
    mask_to_png_bytes,
    measure,
    overlay,
    png_bytes_to_mask,
)


def draw_bar(
    mask: np.ndarray,
    centre: tuple[float, float],
    length: float,
    width: float,
    angle_deg: float,
    value: int = 1,
) -> None:
    """Fill a rotated rectangle; angle counter-clockwise from +x as displayed (row 0 at top)."""
    cy, cx = centre
    t = math.radians(angle_deg)
    ux, uy = math.cos(t), -math.sin(t)  # along the bar, in (col, row)
    vx, vy = -uy, ux  # across the bar
    corners = [
        (cx + sa * ux * length / 2 + sb * vx * width / 2, cy + sa * uy * length / 2 + sb * vy * width / 2)
        for sa, sb in ((-1, -1), (1, -1), (1, 1), (-1, 1))
    ]
    rr, cc = polygon([p[1] for p in corners], [p[0] for p in corners], shape=mask.shape)
    mask[rr, cc] = value


def assert_plain_json(obj: Any, path: str = "result") -> None:
    """Only builtin JSON types (no numpy scalars, not even float64 which json accepts)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            assert type(k) is str, f"{path}: key {k!r}"
            assert_plain_json(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            assert_plain_json(v, f"{path}[{i}]")
    else:
        assert obj is None or type(obj) in (str, int, float, bool), f"{path}: {type(obj)}"
        if type(obj) is float:
            assert math.isfinite(obj), path


def test_disk_area_diameter_circularity() -> None:
    mask = np.zeros((96, 96), np.uint8)
    mask[disk((48, 48), 20, shape=mask.shape)] = 1
    res = measure(mask, ["background", "particle"])["classes"]["particle"]
    assert res["kind"] == "particle" and "nematic_order" not in res
    assert res["n_domains"] == 1
    assert res["area_px"] == pytest.approx(math.pi * 20**2, rel=0.02)
    assert res["area_fraction"] == pytest.approx(res["area_px"] / 96**2)
    assert res["equivalent_diameter_px"]["mean"] == pytest.approx(40.0, rel=0.02)
    assert res["circularity"]["median"] == pytest.approx(1.0, abs=0.08)
    assert res["aspect_ratio"]["median"] == pytest.approx(1.0, abs=0.03)
    assert res["percolates"] is False and res["percolation_direction"] is None


def test_particle_shapes_match_regionprops() -> None:
    """The vectorised per-domain numbers equal skimage regionprops on random blobs and ellipses."""
    rng = np.random.default_rng(3)
    blobs = ndi.gaussian_filter(rng.random((128, 128)), 3) > 0.55
    mask = blobs.astype(np.uint8)
    draw_bar(mask, (64, 64), 40, 10, 30)  # aspect ~4 bar merged in somewhere
    res = measure(mask, ["bg", "dot"])["classes"]["dot"]
    labels, n = ndi.label(mask, np.ones((3, 3)))
    props = regionprops(labels)
    assert res["n_domains"] == n == len(props)
    ar = [p.axis_major_length / p.axis_minor_length for p in props if p.axis_minor_length > 1e-9]
    circ = [min(4 * math.pi * p.area / p.perimeter**2, 1.0) for p in props if p.perimeter > 0]
    assert res["aspect_ratio"]["count"] == len(ar)
    assert res["aspect_ratio"]["mean"] == pytest.approx(float(np.mean(ar)), rel=1e-9)
    assert res["aspect_ratio"]["max"] == pytest.approx(max(ar), rel=1e-9)
    assert res["circularity"]["median"] == pytest.approx(float(np.median(circ)), rel=1e-9)
    assert res["domain_area_px"]["p90"] == pytest.approx(float(np.percentile([p.area for p in props], 90)))


def test_bar_length_width_orientation() -> None:
    mask = np.zeros((64, 160), np.uint8)
    mask[28:36, 30:130] = 1  # 100 x 8 horizontal bar
    res = measure(mask, ["bg", "nanowire"])["classes"]["nanowire"]
    assert res["kind"] == "wire" and "circularity" not in res
    assert res["length_px"] == pytest.approx(100.0, rel=0.05)
    assert res["skeleton_length_px"] == pytest.approx(100.0, rel=0.10)  # raw thinning stops short of the ends
    assert res["mean_width_px"] == pytest.approx(8.0, rel=0.15)
    assert res["domain_length_px"]["count"] == 1
    assert res["nematic_order"] > 0.98
    assert min(res["mean_orientation_deg"], 180 - res["mean_orientation_deg"]) < 3.0
    hist = res["orientation_hist"]
    assert len(hist["bin_edges_deg"]) == N_ORIENTATION_BINS + 1 and hist["bin_edges_deg"][-1] == 180.0
    assert sum(hist["length_fraction"]) == pytest.approx(1.0)
    assert hist["length_fraction"][0] + hist["length_fraction"][-1] > 0.9


@pytest.mark.parametrize("flip", [False, True])
def test_horizontal_wire_orientation_is_below_180(flip: bool) -> None:
    """A horizontal wire with side branches fits to an angle a rounding error below 0; the mean
    must fold to 0, not to 180.0 (outside the documented [0, 180))."""
    mask = np.zeros((40, 140), np.uint8)
    mask[15:18, 5:130] = 1
    mask[14:24, 40:42] = 1  # a branch below the wire (rows grow downwards)
    if flip:
        mask = mask[::-1].copy()
    res = measure(mask, ["bg", "nanowire"])["classes"]["nanowire"]
    assert 0.0 <= res["mean_orientation_deg"] < 180.0
    assert min(res["mean_orientation_deg"], 180.0 - res["mean_orientation_deg"]) < 1.0


def test_orientation_stays_in_range_for_many_horizontal_wires() -> None:
    rng = np.random.default_rng(0)
    for _ in range(40):
        mask = np.zeros((40, 140), np.uint8)
        mask[15 : 15 + rng.integers(1, 9), 5:130] = 1
        for _ in range(rng.integers(0, 3)):
            x = rng.integers(10, 120)
            mask[14:24, x : x + 2] = 1
        res = measure(mask, ["bg", "nanowire"])["classes"]["nanowire"]
        assert 0.0 <= res["mean_orientation_deg"] < 180.0


@pytest.mark.parametrize("angle", [15.0, 30.0, 45.0, 75.0])
def test_thick_tilted_bar(angle: float) -> None:
    """Tilted wide bars: no corner spurs, chain bias removed, so length and width stay accurate."""
    mask = np.zeros((200, 200), np.uint8)
    draw_bar(mask, (100, 100), 120, 16, angle)
    res = measure(mask, ["bg", "wire"])["classes"]["wire"]
    assert res["length_px"] == pytest.approx(120.0, rel=0.05)
    assert res["mean_width_px"] == pytest.approx(16.0, rel=0.15)
    assert res["nematic_order"] > 0.98
    assert abs(res["mean_orientation_deg"] - angle) < 2.0


@pytest.mark.parametrize("angle", [30.0, 120.0])
def test_parallel_bars_are_aligned(angle: float) -> None:
    mask = np.zeros((200, 200), np.uint8)
    t = math.radians(angle)
    normal = (math.cos(t), math.sin(t))  # (row, col) offset across the bars
    for k in range(-2, 3):
        draw_bar(mask, (100 + 25 * k * normal[0], 100 + 25 * k * normal[1]), 90, 5, angle)
    res = measure(mask, ["bg", "fibre"])["classes"]["fibre"]
    assert res["n_domains"] == 5
    assert res["nematic_order"] > 0.95
    diff = abs(res["mean_orientation_deg"] - angle) % 180
    assert min(diff, 180 - diff) < 4.0
    assert res["length_px"] == pytest.approx(5 * 90, rel=0.06)


def test_random_bars_are_isotropic() -> None:
    rng = np.random.default_rng(0)
    mask = np.zeros((256, 256), np.uint8)
    for _ in range(30):
        draw_bar(mask, tuple(rng.uniform(30, 226, 2)), 40, 4, rng.uniform(0, 180))
    res = measure(mask, ["bg", "filament"])["classes"]["filament"]
    assert res["nematic_order"] < 0.4
    assert max(res["orientation_hist"]["length_fraction"]) < 0.35


def test_percolation() -> None:
    classes = ["bg", "band", "bar"]
    mask = np.zeros((64, 64), np.uint8)
    mask[10:16, :] = 1  # spans left to right
    mask[40:46, 20:40] = 2  # short
    res = measure(mask, classes)["classes"]
    assert res["band"]["percolates"] is True and res["band"]["percolation_direction"] == "horizontal"
    assert res["bar"]["percolates"] is False and res["bar"]["percolation_direction"] is None

    vertical = np.zeros((64, 64), np.uint8)
    vertical[:, 5:9] = 1
    assert measure(vertical, classes)["classes"]["band"]["percolation_direction"] == "vertical"
    cross = vertical.copy()
    cross[30:34, :] = 1
    assert measure(cross, classes)["classes"]["band"]["percolation_direction"] == "both"

    # Two domains, one touching each side, do not percolate: it takes ONE connected domain.
    split = np.zeros((64, 64), np.uint8)
    split[10:16, :30] = 1
    split[10:16, 34:] = 1
    res = measure(split, classes)["classes"]["band"]
    assert res["n_domains"] == 2 and res["percolates"] is False


def test_eight_connectivity() -> None:
    mask = np.zeros((16, 16), np.uint8)
    mask[2, 2] = mask[3, 3] = mask[4, 4] = 1  # diagonal chain = one domain
    mask[10, 10] = 1
    assert measure(mask, ["bg", "x"])["classes"]["x"]["n_domains"] == 2


def test_physical_units_scale() -> None:
    mask = np.zeros((64, 96), np.uint8)
    mask[20:28, 10:80] = 1
    mask[disk((48, 48), 8, shape=mask.shape)] = 2
    classes = ["bg", "wire", "particle"]
    px = measure(mask, classes)
    nm = measure(mask, classes, pixel_size=2.5, pixel_unit="nm")
    w_px, w_nm = px["classes"]["wire"], nm["classes"]["wire"]
    assert "area_nm2" not in w_px
    assert w_nm["area_px"] == w_px["area_px"] == 8 * 70
    assert w_nm["area_nm2"] == pytest.approx(w_px["area_px"] * 2.5**2)
    assert w_nm["length_nm"] == pytest.approx(w_px["length_px"] * 2.5)
    assert w_nm["mean_width_nm"] == pytest.approx(w_px["mean_width_px"] * 2.5)
    p_nm = nm["classes"]["particle"]
    assert p_nm["domain_area_nm2"]["mean"] == pytest.approx(p_nm["domain_area_px"]["mean"] * 6.25)
    assert p_nm["equivalent_diameter_nm"]["p90"] == pytest.approx(p_nm["equivalent_diameter_px"]["p90"] * 2.5)
    assert nm["summary"] == {**nm["summary"], "shape": [64, 96], "pixel_size": 2.5, "pixel_unit": "nm"}

    um = measure(mask, classes, pixel_size=0.0025, pixel_unit="µm")
    assert um["classes"]["wire"]["area_um2"] == pytest.approx(w_nm["area_nm2"] * 1e-6)
    assert um["summary"]["pixel_unit"] == "µm" and um["summary"]["unit_key"] == "um"


def test_empty_mask_is_zeros_and_none() -> None:
    mask = np.zeros((32, 32), np.uint16)
    result = measure(mask, ["bg", "matrix"], pixel_size=1.0)
    json.dumps(result, allow_nan=False)
    assert_plain_json(result)
    res = result["classes"]["matrix"]
    assert res["kind"] == "both"  # unknown name: both kinds of numbers
    assert res["area_px"] == 0 and res["area_fraction"] == 0 and res["n_domains"] == 0
    assert res["domain_area_px"]["count"] == 0 and res["domain_area_px"]["mean"] is None
    assert res["length_px"] == 0 and res["mean_width_px"] is None
    assert res["nematic_order"] is None and res["mean_orientation_deg"] is None
    assert res["circularity"]["count"] == 0 and res["percolates"] is False


def test_result_is_plain_json(tmp_path) -> None:
    rng = np.random.default_rng(1)
    mask = np.zeros((64, 64), np.int64)
    for _ in range(6):
        draw_bar(mask, tuple(rng.uniform(10, 54, 2)), 20, 3, rng.uniform(0, 180), value=1)
    for _ in range(5):
        mask[disk(tuple(rng.uniform(5, 59, 2)), rng.uniform(1, 5), shape=mask.shape)] = 2
    mask[0, 0] = 3  # a single pixel: perimeter 0, minor axis 0 -> excluded, never NaN
    result = measure(mask, ["bg", "wire", "dot", "speck"], pixel_size=0.7, pixel_unit="Å")
    assert_plain_json(result)
    out = tmp_path / "morphology.json"
    out.write_text(json.dumps(result, allow_nan=False))
    assert json.loads(out.read_text()) == result
    assert result["classes"]["speck"]["circularity"]["count"] == 0
    assert "area_A2" in result["classes"]["speck"]
    fractions = [c["area_fraction"] for c in result["classes"].values()]
    assert sum(fractions) + result["summary"]["background_fraction"] == pytest.approx(1.0)


def test_class_kinds_heuristic_and_explicit() -> None:
    assert class_kind("Ag nanowire") == "wire" and class_kind("Fiber") == "wire"
    assert class_kind("nanorod") == "particle" and class_kind("quantum_dot") == "particle"
    assert class_kind("matrix") == "both"
    mask = np.zeros((32, 32), np.uint8)
    mask[5:10, 5:25] = 1
    mask[20:25, 5:25] = 2
    res = measure(mask, ["bg", "a", "b"], wire_classes={"a"})["classes"]
    assert res["a"]["kind"] == "wire" and "nematic_order" in res["a"] and "circularity" not in res["a"]
    assert res["b"]["kind"] == "basic" and "nematic_order" not in res["b"] and "circularity" not in res["b"]
    with pytest.raises(ValueError, match="unknown class names"):
        measure(mask, ["bg", "a", "b"], particle_classes={"c"})


def test_end_distance_matches_edt() -> None:
    rng = np.random.default_rng(2)
    binary = ndi.gaussian_filter(rng.random((64, 64)), 2) > 0.45
    rows, cols = np.nonzero(binary)
    expected = ndi.distance_transform_edt(binary)[rows, cols]
    assert np.allclose(_distance_to_background(binary, rows, cols), expected)


def test_import_stays_light() -> None:
    """The service and the client import this module: no torch, no bentoml."""
    code = (
        "import sys, nanomorph.morphology; print(sorted({'torch', 'bentoml', 'training'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_bad_input_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="2-D"):
        measure(np.zeros((2, 8, 8), np.uint8), ["bg", "x"])
    with pytest.raises(ValueError, match="class index 3"):
        measure(np.full((8, 8), 3, np.uint8), ["bg", "x"])
    with pytest.raises(ValueError, match="integer"):
        measure(np.full((8, 8), 0.5), ["bg", "x"])
    with pytest.raises(ValueError, match="negative"):
        measure(np.full((8, 8), -1), ["bg", "x"])
    with pytest.raises(ValueError, match="unique"):
        measure(np.zeros((8, 8), np.uint8), ["bg", "x", "x"])
    with pytest.raises(ValueError, match="pixel_size"):
        measure(np.zeros((8, 8), np.uint8), ["bg", "x"], pixel_size=0.0)


def test_overlay_colours_foreground_only() -> None:
    image = np.tile(np.linspace(0, 1, 32, dtype=np.float32), (32, 1))
    mask = np.zeros((32, 32), np.uint8)
    mask[4:12, 4:12] = 1
    mask[20:28, 20:28] = 2
    rgb = overlay(image, mask, n_classes=3)
    assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
    grey = np.rint(image * 255).astype(np.uint8)
    bg = mask == 0
    for ch in range(3):
        assert np.array_equal(rgb[..., ch][bg], grey[bg])
    c1, c2 = rgb[8, 8].astype(int), rgb[24, 24].astype(int)
    assert np.ptp(c1) > 20 and np.ptp(c2) > 20  # coloured, not grey
    assert np.abs(c1 - c2).sum() > 40  # different classes, different colours
    assert np.array_equal(overlay(image, mask, 3, alpha=0.0), np.repeat(grey[..., None], 3, axis=2))
    with pytest.raises(ValueError, match="shape"):
        overlay(image, mask[:16], 3)
    with pytest.raises(ValueError, match="class index"):
        overlay(image, mask, 2)


def test_mask_png_roundtrip(tmp_path) -> None:
    rng = np.random.default_rng(0)
    small = rng.integers(0, 5, (24, 40)).astype(np.int64)
    data = mask_to_png_bytes(small)
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[24] == 8  # IHDR bit depth
    path = tmp_path / "mask.png"
    path.write_bytes(data)
    with Image.open(path) as im:  # an ordinary PNG other tools can read
        assert np.array_equal(np.asarray(im), small)
    back = png_bytes_to_mask(path.read_bytes())
    assert back.dtype == np.uint8 and np.array_equal(back, small)

    many = rng.integers(0, 300, (16, 16)).astype(np.int32)
    data16 = mask_to_png_bytes(many)
    assert data16[24] == 16
    back16 = png_bytes_to_mask(data16)
    assert back16.dtype == np.uint16 and np.array_equal(back16, many)

    with pytest.raises(ValueError, match="not a readable image"):
        png_bytes_to_mask(b"definitely not a png")
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 255
    buf = tmp_path / "colour.png"
    Image.fromarray(colour).save(buf)
    with pytest.raises(ValueError, match="colour"):
        png_bytes_to_mask(buf.read_bytes())
    with pytest.raises(ValueError, match="16-bit"):
        mask_to_png_bytes(np.full((4, 4), 70000))


def test_mask_png_is_a_palette_image_viewers_show_in_class_colours() -> None:
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 2:6] = 1
    mask[5, :] = 2
    with Image.open(io.BytesIO(mask_to_png_bytes(mask))) as im:
        assert im.mode == "P"
        assert np.array_equal(np.asarray(im), mask)  # the indices, as every reader sees them
        rgb = np.asarray(im.convert("RGB"))
    assert (rgb[0, 0] == 0).all()
    assert tuple(rgb[2, 2]) == tuple(PALETTE[1]) and tuple(rgb[5, 0]) == tuple(PALETTE[2])
