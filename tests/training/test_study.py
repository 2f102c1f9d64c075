"""`nanomorph study cls|seg` end to end: every cell in results.csv, resume skips finished cells."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.cli import nanomorph
from tests.fixtures.images import write_shapes
from tests.training.cls_helpers import ARCH, cli, one_thread, write_encoder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True, scope="module")
def _torch_one_thread() -> Iterator[None]:
    yield from one_thread()


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_study_cls_grid_resume_and_shared_splits(tmp_path: Path) -> None:
    data = write_shapes(tmp_path / "classification", n_per_class=7)
    encoder = write_encoder(tmp_path / "pre" / "backbone.safetensors")
    out = tmp_path / "study"
    args = ["study", "cls", "--data", str(data), "--encoders", f"ssl={encoder}", "--labels-per-class", "1,all",
            "--repeats", "2", "--modes", "linear,finetune", "--steps", "2", "--scratch-steps", "2",
            "--eval-every", "1", "--batch-size", "4", "--out", str(out)]  # fmt: skip
    proc = cli(*args)
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out / "results.csv")
    cells = {(r["encoder"], r["mode"], r["labels"], r["repeat"]) for r in rows}
    expected = {(e, m, k, str(r)) for e in ("ssl", "scratch") for m in ("linear", "finetune")
                for k in ("1", "all") for r in range(2)}  # fmt: skip
    assert cells == expected and len(rows) == len(expected) == 16
    for r in rows:
        for key in ("accuracy", "balanced_accuracy", "macro_f1"):
            assert 0.0 <= float(r[key]) <= 1.0
    summary = (out / "summary.md").read_text()
    assert "| ssl | linear |" in summary and "| scratch | finetune |" in summary and "±" in summary
    assert "## label-free quality signals" in summary and "| ssl | not measured |" in summary
    with Image.open(out / "curve.png") as im:
        assert im.format == "PNG" and im.width > 300

    # Same fixed test split per repeat; the same labeled images for every encoder and mode.
    details = {p.stem: json.loads(p.read_text()) for p in (out / "cells").glob("*.json")}
    for rep in range(2):
        tests = {tuple(d["split"]["test"]) for k, d in details.items() if k.endswith(f"_r{rep}")}
        assert len(tests) == 1
        for lab in ("1", "all"):
            trains = {tuple(details[f"{e}_{m}_{lab}_r{rep}"]["split"]["train"])
                      for e in ("ssl", "scratch") for m in ("linear", "finetune")}  # fmt: skip
            assert len(trains) == 1
            train = set(next(iter(trains)))
            assert not train & set(next(iter(tests)))
    r0, r1 = (set(details[f"ssl_linear_all_r{r}"]["split"]["test"]) for r in range(2))
    assert r0 != r1  # each repeat draws its own test split

    # Resume: a rerun computes nothing; cells lost from the csv (a killed run) are redone and the
    # others kept.
    before = (out / "results.csv").read_text()
    stamps = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert nanomorph(*args).returncode == 0
    assert (out / "results.csv").read_text() == before
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps
    lines = before.splitlines()
    (out / "results.csv").write_text("\n".join(lines[:-3]) + "\n" + lines[-3][:10])  # cut mid-line
    assert nanomorph(*args).returncode == 0
    after = _rows(out / "results.csv")
    assert len(after) == 16  # the broken line is gone
    assert {(r["encoder"], r["mode"], r["labels"], r["repeat"]) for r in after} == expected
    assert after[:13] == rows[:13]  # untouched cells were not recomputed
    redone = {p.name for p in (out / "cells").glob("*.json") if p.stat().st_mtime_ns != stamps[p.name]}
    assert len(redone) == 3

    # The same folder with other split settings is refused (its cells would not be comparable).
    config_before = (out / "config.yaml").read_text()
    refused = nanomorph(*args[:-2], "--seed", "5", "--out", str(out))
    assert refused.returncode == 2
    assert "other settings" in refused.stderr
    assert (out / "config.yaml").read_text() == config_before


def test_study_cls_label_count_too_large_names_the_class(tmp_path: Path) -> None:
    data = write_shapes(tmp_path / "classification", n_per_class=5)
    run = nanomorph("study", "cls", "--data", str(data), "--arch", ARCH, "--image-size", "32",
                    "--labels-per-class", "2,8", "--repeats", "1", "--out", str(tmp_path / "s"))  # fmt: skip
    assert run.returncode == 2
    assert "class 'bar' has only 3 image(s) outside the test split, fewer than the 8" in run.stderr
    assert not (tmp_path / "s" / "results.csv").exists()


def test_study_seg_writes_every_cell(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    for sub in ("images", "masks"):
        (tmp_path / "seg" / sub).mkdir(parents=True)
    for i in range(4):
        mask = np.zeros((64, 64), np.uint8)
        for cy, cx in rng.integers(8, 56, (3, 2)):
            mask[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 1
        img = 50 + 150 * mask + rng.normal(0, 10, mask.shape)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
            tmp_path / "seg" / "images" / f"im{i}.png"
        )
        Image.fromarray(mask).save(tmp_path / "seg" / "masks" / f"im{i}.png")
    out = tmp_path / "study"
    proc = cli("study", "seg", "--data", str(tmp_path / "seg"), "--classes", "background,particle",
               "--labeled-images", "1,2", "--repeats", "1", "--modes", "finetune", "--arch", ARCH, "--tile", "32",
               "--seg-steps", "1", "--batch-size", "2", "--out", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = _rows(out / "results.csv")
    assert [(r["encoder"], r["labels"]) for r in rows] == [("scratch", "1"), ("scratch", "2")]
    for r in rows:
        assert 0.0 <= float(r["mean_iou_foreground"]) <= 1.0 and r["iou_particle"] != ""
    assert (out / "summary.md").is_file() and (out / "curve.png").is_file()


def test_quality_table_puts_the_signals_beside_accuracy() -> None:
    from types import SimpleNamespace

    from training.study import quality_table

    signals = {"verdict": "learned: effective rank 35 of 512", "end": {"effective_rank": 35.2, "alignment": 0.29,
               "uniformity": -1.07, "embedding_dim": 512}}  # fmt: skip
    specs = {
        "ssl": SimpleNamespace(meta={"quality": json.dumps(signals)}),
        "scratch": SimpleNamespace(meta={}),
    }
    rows = [
        {"encoder": "ssl", "mode": "linear", "labels": lab, "repeat": "0", "balanced_accuracy": acc}
        for lab, acc in (("1", "0.5"), ("8", "0.75"))
    ]
    table = quality_table(specs, rows)
    assert "| ssl | learned | 35 | 0.290 | -1.070 | 0.750 (8) |" in table
    assert "| scratch | not measured | – | – | – | – |" in table
