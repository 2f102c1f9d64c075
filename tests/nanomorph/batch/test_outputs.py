"""Files people open: palette masks, calibrated ImageJ label TIFFs, overlays with legend and scale
bar, output names, and the self-contained ``report.html``."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from nanomorph.batch import outputs, report
from nanomorph.contract import read_image
from nanomorph.morphology import PALETTE


def test_output_names_and_suffix_collisions() -> None:
    stems = outputs.output_stems(["a.png", "run2/frame.emd", "run2/frame.tif", "run2/x.y.dm4"])
    assert stems == {
        "a.png": "a",
        "run2/frame.emd": "run2/frame_emd",
        "run2/frame.tif": "run2/frame_tif",
        "run2/x.y.dm4": "run2/x.y",
    }
    assert outputs.mask_file("run2/x.y") == "masks/run2/x.y_mask.png"
    assert outputs.labels_file("a") == "masks/a_labels.tif"
    assert outputs.overlay_file("a") == "overlays/a_overlay.png"


def test_label_tiff_opens_calibrated_in_imagej_terms() -> None:
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:25] = 2
    data = outputs.labels_tiff(mask, ["background", "wire", "particle"], 0.004, "µm")
    with tifffile.TiffFile(io.BytesIO(data)) as tif:
        meta = tif.imagej_metadata or {}
        assert tif.is_imagej and meta["unit"] == "nm"
        assert "class 2 = particle" in meta["Info"]
        lut = np.asarray(meta["LUTs"]).reshape(-1, 3, 256)[0]  # one channel: (3, 256) RGB ramps
        assert tuple(lut[:, 0]) == (0, 0, 0) and tuple(lut[:, 2]) == tuple(PALETTE[2])
        xres = tif.pages[0].tags["XResolution"].value
        assert xres[1] / xres[0] == pytest.approx(4.0, rel=1e-6)  # 4 nm per pixel
        assert np.array_equal(tif.asarray(), mask)
    _, meta2 = read_image(data, name="labels.tif")  # nanomorph reads it back calibrated too
    assert meta2.pixel_size == pytest.approx(4.0) and meta2.pixel_unit == "nm"
    bare = outputs.labels_tiff(mask, ["background", "wire", "particle"], None, None)
    assert read_image(bare, name="bare.tif")[1].pixel_size is None


def _overlay(pixel_size: float | None, unit: str | None = "nm") -> np.ndarray:
    image = np.full((60, 80), 0.5, dtype=np.float32)  # mid grey: the bar's black box and white bar stand out
    mask = np.zeros((60, 80), np.uint8)
    mask[10:20, :] = 1
    mask[40:50, 30:40] = 2
    data = outputs.overlay_png(image, mask, ["background", "wire", "particle"], pixel_size, unit)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_overlay_has_a_legend_and_a_scale_bar_when_calibrated() -> None:
    calibrated, bare = _overlay(0.5), _overlay(None)
    factor = 5  # 80 px wide -> enlarged to 400 for a legible legend
    assert calibrated.shape[1] == 80 * factor and calibrated.shape[0] > 60 * factor  # legend strip below
    legend = calibrated[60 * factor :]
    for colour in (PALETTE[1], PALETTE[2]):  # a swatch of each class colour in the legend
        assert (legend == colour).all(axis=-1).sum() > 50
    corner = slice(60 * factor - 60, 60 * factor), slice(80 * factor - 150, 80 * factor)
    white = (calibrated[corner] == 255).all(axis=-1).sum()
    black = (calibrated[corner] == 0).all(axis=-1).sum()
    assert white > 100 and black > 1000  # the bar + its label on a black box, bottom right
    assert ((bare[corner] == 0) | (bare[corner] == 255)).all(axis=-1).sum() == 0  # no bar
    # A reciprocal unit (diffraction) gets no spatial scale bar.
    assert np.array_equal(_overlay(0.5, "1 / nm"), bare)


def test_nice_scale_bar_lengths() -> None:
    assert [outputs.nice_length(x) for x in (7.3, 19.9, 20.0, 480.0, 0.37)] == [5, 10, 20, 200, 0.2]
    assert [outputs.length_label(x) for x in (50, 2000, 0.5)] == ["50 nm", "2 µm", "5 Å"]


def _write_run(out: Path, task: str, rows: list[dict], errors: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if errors:
        (out / "errors.csv").write_text("path,reason,message,size,mtime_ns\n" + errors)
    card = report.model_card(
        f"nanomorph-{task}:1", task, ["background", "wire"], "ab" * 32, {"accuracy": 0.93}, 0.2
    )
    report.write_model_card(out, card)


def test_report_is_self_contained_and_deterministic(tmp_path: Path) -> None:
    out = tmp_path / "seg"
    rows = []
    for i in range(3):
        stem = f"img{i}"
        png = io.BytesIO()
        Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(png, format="PNG")
        (out / "overlays").mkdir(parents=True, exist_ok=True)
        (out / outputs.overlay_file(stem)).write_bytes(png.getvalue())
        morphology = {
            "classes": {
                "wire": {
                    "area_fraction": 0.1 * (i + 1),
                    "equivalent_diameter_nm": {"median": 3.0 + i},
                }
            }
        }
        rows.append(
            {"path": f"{stem}.tif", "task": "segment", "pixel_size": 0.5, "pixel_unit": "nm",
             "overlay_file": outputs.overlay_file(stem), "morphology": morphology}
        )  # fmt: skip
    _write_run(out, "segment", rows, "notes.txt,unsupported_format,notes.txt: .txt is not supported,5,1\n")
    first = report.write_report(out).read_text()
    assert report.build_report(out) == first  # no timestamps: same results, same bytes
    assert len(re.findall(r'src="data:image/png;base64,', first)) == 3  # the contact sheet, inline
    assert not re.search(r"(src|href)=\"(https?:)?//", first)  # nothing fetched from anywhere
    for text in ("nanomorph-segment:1", "test accuracy", "0.93", "mean area fraction", "0.2",
                 "median domain equivalent diameter per image (nm)", "notes.txt", "unsupported_format"):  # fmt: skip
        assert text in first, text


def test_report_for_classification(tmp_path: Path) -> None:
    rows = [
        {"path": f"{i}.png", "task": "classify", "label": "wire" if i % 3 else "network",
         "confidence": 0.5 + i / 20, "ood_flag": i == 4}
        for i in range(6)
    ]  # fmt: skip
    _write_run(tmp_path, "classify", rows)
    page = report.build_report(tmp_path)
    assert "<h2>Class fractions</h2>" in page and "<td>wire</td><td>4</td>" in page
    assert "1 of 6 images flagged" in page and "<td>4.png</td>" in page
    assert "Files not read</h2><p>None.</p>" in page
