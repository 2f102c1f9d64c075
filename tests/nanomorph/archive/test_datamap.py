"""``nanomorph map`` as users run it: a classification folder in, PNG / HTML / CSV out."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

from nanomorph.archive.datamap import pca_2d, suspects
from tests.fixtures.cli import nanomorph


def image_with_mean(m: float, size: int = 40) -> np.ndarray:
    img = np.zeros((size, size), dtype=np.uint8)
    img.flat[: round(m * size * size)] = 255
    return img


def test_map_writes_png_html_csv_and_flags_a_mislabeled_image(
    tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]
) -> None:
    store, tags = tiny_store
    data = tmp_path / "classification"
    for cls, m in (("dark", 0.1), ("bright", 0.9)):
        (data / cls).mkdir(parents=True)
        for k in range(4):
            Image.fromarray(image_with_mean(m + 0.02 * k)).save(data / cls / f"{cls}_{k}.png")
    Image.fromarray(image_with_mean(0.92)).save(data / "dark" / "oops.png")  # a bright image filed as dark
    out = tmp_path / "maps" / "map.png"
    page = tmp_path / "maps" / "map.html"
    r = nanomorph("map", data, "--models", store, "--tag", tags["embed"], "--out", out, "--html", page)
    assert r.returncode == 0, r.stderr
    assert "PCA" in r.stdout and "2 classes" in r.stdout and "1 suspects" in r.stdout

    png = Image.open(out)
    assert png.mode == "RGB" and png.size[0] >= 600
    pixels = np.asarray(png).reshape(-1, 3)
    # Class colours are drawn (Tableau blue #4e79a7 is the first class, "bright").
    assert (np.abs(pixels.astype(int) - [0x4E, 0x79, 0xA7]).sum(axis=1) == 0).any()

    text = page.read_text()
    assert text.count("data:image/png;base64,") == 9  # one inline thumbnail per image
    assert "http://" not in text.replace('xmlns="http://www.w3.org/2000/svg"', "") and "<script" not in text
    assert "oops.png" in text and "Suspects" in text

    with open(out.with_suffix(".csv"), newline="") as fh:
        rows = {row["path"]: row for row in csv.DictReader(fh)}
    assert len(rows) == 9 and rows["dark/oops.png"]["suspect_nearest_class"] == "bright"
    assert (
        rows["dark/dark_0.png"]["class"] == "dark" and rows["dark/dark_0.png"]["suspect_nearest_class"] == ""
    )
    # Dark and bright images lie on opposite sides of the first principal axis.
    xs = {p: float(row["x"]) for p, row in rows.items()}
    assert np.sign(xs["dark/dark_0.png"]) != np.sign(xs["bright/bright_0.png"])

    r = nanomorph("map", tmp_path / "missing", "--models", store, "--tag", tags["embed"], "--out", out)
    assert r.returncode == 2 and "missing" in r.stderr and "Traceback" not in r.stderr


def test_pca_and_suspects() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)) * np.array([5, 1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    coords, ratios = pca_2d(x)
    assert coords.shape == (50, 2) and ratios[0] > 0.8 > ratios[1]
    assert np.corrcoef(coords[:, 0], x[:, 0])[0, 1] ** 2 > 0.99
    y = np.array([[1.0, 0.0]] * 5 + [[0.0, 1.0]] * 5 + [[0.1, 1.0]])
    labels = ["a"] * 5 + ["b"] * 5 + ["a"]
    found = suspects(y, labels)
    assert [r["index"] for r in found] == [10] and found[0]["nearest"] == "b"


def test_classes_from_folders_or_labels_csv(tmp_path: Path) -> None:
    from nanomorph.archive.datamap import folder_classes

    files = [tmp_path / "a" / "1.png", tmp_path / "b" / "2.png"]
    assert folder_classes(tmp_path, files) == ["a", "b"]
    # A data-set root (unlabeled/ beside classification/<class>/) is not a classification layout.
    mixed = [tmp_path / "unlabeled" / "u.png", tmp_path / "classification" / "a" / "1.png"]
    assert folder_classes(tmp_path, mixed) == [None, None]
    (tmp_path / "labels.csv").write_text("path,label\na/1.png,wire\n")
    assert folder_classes(tmp_path, files) == ["wire", None]
