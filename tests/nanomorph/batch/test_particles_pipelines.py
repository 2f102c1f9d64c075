"""particles.csv from ``predict`` / ``client`` with a boundary-aware model, and a resumed folder job."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.draw import disk

from nanomorph.client import NanomorphClient
from nanomorph.particles import COLUMNS, table_csv
from tests.fixtures.cli import nanomorph
from tests.fixtures.server import Server, start_server
from tests.fixtures.tiny_models import build_tiny_store
from tests.nanomorph.batch.test_pipelines import same_tree

# The tiny segment model with classes (background, boundary, particle): bright pixels are particle
# interior, the boundary channel is flat, so the watershed path runs end to end.
INSTANCES = {"method": "boundary-watershed", "boundary_class": 1, "boundary_width": 2,
             "seed_threshold": 0.5, "min_seed_area": 4, "min_area": 8}  # fmt: skip


@pytest.fixture(scope="module")
def inst_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inst_store")
    build_tiny_store(root, seg_classes=("background", "boundary", "particle"), seg_instances=INSTANCES)
    return root


@pytest.fixture(scope="module")
def inst_server(tmp_path_factory: pytest.TempPathFactory, inst_store: Path) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("inst_server"), store=inst_store, timeout=240)
    try:
        yield srv
    finally:
        srv.stop()


def discs(path: Path, centres: list[tuple[int, int, int]], size: int = 72) -> None:
    img = np.full((size, size), 20, np.uint8)
    for cy, cx, r in centres:
        img[disk((cy, cx), r, shape=img.shape)] = 230
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def make_folder(root: Path) -> Path:
    discs(root / "a.png", [(20, 20, 8), (20, 50, 10), (55, 30, 6)])
    discs(root / "sub" / "b.png", [(36, 36, 12), (5, 60, 7)])  # the second cut by the frame
    return root


def particle_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "particles.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_service_and_predict_give_the_same_particle_table(
    tmp_path: Path, inst_store: Path, inst_server: Server
) -> None:
    data = make_folder(tmp_path / "in")
    local, served = tmp_path / "local", tmp_path / "served"
    p = nanomorph(
        "predict", "--models", inst_store, "--task", "segment", data, "--out", local, "--pixel-size", "0.5"
    )
    assert p.returncode == 0, p.stderr
    c = nanomorph(
        "client", "--url", inst_server.url, "--task", "segment", data, "--out", served, "--pixel-size", "0.5"
    )
    assert c.returncode == 0, c.stderr
    same_tree(local, served)  # particles.csv, particles/*.csv and the pictures included

    rows = particle_rows(local)
    assert list(rows[0]) == list(COLUMNS)
    assert [(r["image"], r["id"]) for r in rows] == [("a.png", "1"), ("a.png", "2"), ("a.png", "3"),
                                                     ("sub/b.png", "1"), ("sub/b.png", "2")]  # fmt: skip
    by = {(r["image"], r["id"]): r for r in rows}
    # ids in raster order of each particle's first pixel: the r=10 disc (top row 11) is 1.
    assert abs(float(by[("a.png", "1")]["diameter_px"]) - 20) <= 1
    assert by[("a.png", "1")]["unit"] == "nm" and abs(float(by[("a.png", "1")]["diameter"]) - 10) <= 0.5
    assert by[("sub/b.png", "1")]["touches_border"] == "True"  # ids in raster order: the cut disc is first
    assert (local / "particles.png").is_file() and (local / "particles" / "a_particles.png").is_file()
    # The summary is in results.csv; the border particle is left out of the count.
    with open(local / "results.csv", newline="") as fh:
        summary = {r["path"]: r for r in csv.DictReader(fh)}
    assert (
        summary["sub/b.png"]["particles.count"] == "1" and summary["sub/b.png"]["particles.n_border"] == "1"
    )

    # The service's own answer (?particles=true) is the same table.
    with NanomorphClient(inst_server.url) as client:
        body = client.segment(data / "a.png", pixel_size=0.5, particles=True)
    assert [e["name"] for e in body["legend"]] == ["background", "particle"]
    answer = table_csv([{**r, "image": "a.png"} for r in body["particles"]])
    assert answer == (local / "particles" / "a_particles.csv").read_text()
    assert body["particle_summary"]["count"] == 3


def test_folder_job_resumes_without_duplicate_particle_rows(tmp_path: Path, inst_store: Path) -> None:
    data = make_folder(tmp_path / "in")
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    (data / "sub" / "b.png").rename(tmp_path / "b.png")  # first run: only a.png
    assert (
        nanomorph("predict", "--models", inst_store, "--task", "segment", data, "--out", out).returncode == 0
    )
    assert len(particle_rows(out)) == 3
    (tmp_path / "b.png").rename(data / "sub" / "b.png")
    again = nanomorph("predict", "--models", inst_store, "--task", "segment", data, "--out", out)
    assert again.returncode == 0 and "1 images to do" in again.stderr
    done = nanomorph("predict", "--models", inst_store, "--task", "segment", data, "--out", out)
    assert done.returncode == 0 and "nothing new" in done.stderr
    rows = particle_rows(out)
    assert len(rows) == 5 and len({(r["image"], r["id"]) for r in rows}) == 5
    assert (
        nanomorph("predict", "--models", inst_store, "--task", "segment", data, "--out", fresh).returncode
        == 0
    )
    assert (out / "particles.csv").read_text() == (fresh / "particles.csv").read_text()
