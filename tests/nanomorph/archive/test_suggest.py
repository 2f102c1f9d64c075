"""``nanomorph suggest`` as users run it: real folders, the real CLI, tiny ONNX models.

The tiny embedder sees the normalised mean brightness ``m`` of an image (embedding ∝
``[m, 1 - m, 1, 0]``), so three synthetic "classes" of clearly different brightness are three
well-separated clusters.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanomorph.archive.suggest import k_center_greedy, select, uncertainty_scores
from tests.fixtures.cli import nanomorph

CLASSES = {"dark": 0.08, "grey": 0.4, "bright": 0.92}


def image_with_mean(m: float, size: int = 50) -> np.ndarray:
    img = np.zeros((size, size), dtype=np.uint8)
    img.flat[: round(m * size * size)] = 255
    return img


def make_pool(root: Path, per_class: int = 5) -> dict[str, str]:
    """Unlabeled images of three brightness classes; returns {file name: class}."""
    root.mkdir(parents=True)
    truth = {}
    for k in range(per_class):
        for cls, m in CLASSES.items():
            name = f"u_{cls}_{k}.png"
            Image.fromarray(image_with_mean(m + 0.012 * (k - 2))).save(root / name)
            truth[name] = cls
    return truth


def read_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "suggestions.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_diversity_covers_every_class(tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]) -> None:
    store, tags = tiny_store
    truth = make_pool(tmp_path / "unlabeled")
    out = tmp_path / "out"
    args: list[str | Path] = [
        "--unlabeled",
        tmp_path / "unlabeled",
        "-n",
        "3",
        "--out",
        out,
        "--models",
        store,
    ]
    r = nanomorph("suggest", *args, "--encoder", tags["embed"], "--strategy", "diversity")
    assert r.returncode == 0, r.stderr
    rows = read_rows(out)
    assert [row["rank"] for row in rows] == ["1", "2", "3"]
    names = [Path(row["path"]).name for row in rows]
    assert len(set(names)) == 3 and {truth[n] for n in names} == set(CLASSES)
    assert all(row["reason"] for row in rows)
    sheet = Image.open(out / "suggestions.png")
    assert sheet.size[0] > 3 * 100 and (out / "config.yaml").is_file()

    # With a labeled folder (the dark class), a budget of 2 goes to the two other classes;
    # a labeled file that is also in the pool is never suggested.
    labeled = tmp_path / "labeled" / "dark"
    labeled.mkdir(parents=True)
    for k in range(2):
        Image.fromarray(image_with_mean(0.07 + 0.02 * k)).save(labeled / f"l{k}.png")
    os.link(tmp_path / "unlabeled" / "u_dark_2.png", labeled / "u_dark_2.png")
    r = nanomorph("suggest", *args[:-4], "-n", "2", "--out", tmp_path / "out2", "--models", store,
                  "--encoder", tags["embed"], "--labeled", tmp_path / "labeled")  # fmt: skip
    assert r.returncode == 0, r.stderr
    names = [Path(row["path"]).name for row in read_rows(tmp_path / "out2")]
    assert {truth[n] for n in names} == {"grey", "bright"}

    # OUT inside the pool: a re-run never suggests its own contact sheet; -n above the pool size
    # returns the whole pool once.
    inside = tmp_path / "unlabeled" / "picks"
    for _ in range(2):
        r = nanomorph("suggest", "--unlabeled", tmp_path / "unlabeled", "-n", "50", "--out", inside,
                      "--models", store, "--encoder", tags["embed"])  # fmt: skip
        assert r.returncode == 0, r.stderr
    names = [Path(row["path"]).name for row in read_rows(inside)]
    assert sorted(names) == sorted(truth)


def test_hybrid_and_uncertainty_with_classifier(
    tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]
) -> None:
    store, tags = tiny_store
    make_pool(tmp_path / "unlabeled", per_class=4)
    # Images at the tiny classifier's decision boundaries (means 0.25, 0.75) are the uncertain ones.
    for m in (0.25, 0.75):
        Image.fromarray(image_with_mean(m)).save(tmp_path / "unlabeled" / f"edge_{m}.png")
    # (strategy, n, extra args): hybrid draws 2 from the 4 most uncertain, as far apart as possible.
    for strategy, n, extra in (("uncertainty", "4", []), ("hybrid", "2", ["--pool-factor", "2"])):
        out = tmp_path / strategy
        r = nanomorph("suggest", "--unlabeled", tmp_path / "unlabeled", "-n", n, "--out", out,
                      "--models", store, "--encoder", tags["embed"], "--classifier", tags["classify"],
                      "--strategy", strategy, *extra)  # fmt: skip
        assert r.returncode == 0, r.stderr
        rows = read_rows(out)
        names = [Path(row["path"]).name for row in rows]
        assert len(rows) == int(n) and len(set(names)) == int(n)
        assert {"edge_0.25.png", "edge_0.75.png"} <= set(names)
        assert "uncertainty" in rows[0]["reason"]

    # Asking for uncertainty without a classifier, or a missing folder: one clear line.
    r = nanomorph("suggest", "--unlabeled", tmp_path / "unlabeled", "--out", tmp_path / "x",
                  "--models", store, "--encoder", tags["embed"], "--strategy", "hybrid")  # fmt: skip
    assert r.returncode == 2 and "--classifier" in r.stderr and "Traceback" not in r.stderr
    r = nanomorph("suggest", "--unlabeled", tmp_path / "nope", "--out", tmp_path / "x", "--models", store)
    assert r.returncode == 2 and "nope" in r.stderr


def test_selection_functions() -> None:
    rng = np.random.default_rng(1)
    centres = np.eye(6)[:4] * 5
    x = np.concatenate([c + rng.normal(scale=0.3, size=(20, 6)) for c in centres])
    picks, dists = k_center_greedy(x, 4)
    assert sorted(i // 20 for i in picks) == [0, 1, 2, 3]  # one per cluster
    assert np.isnan(dists[0]) and all(d > 0.5 for d in dists[1:])
    probs = np.array([[0.9, 0.1], [0.5, 0.5], [0.6, 0.4]])
    assert uncertainty_scores(probs, "margin") == pytest.approx([0.2, 1.0, 0.8])
    assert uncertainty_scores(probs, "entropy")[1] == pytest.approx(1.0)
    out = select(x, 80, "hybrid", uncertainty=rng.random(80))
    assert len({p["index"] for p in out}) == 80
