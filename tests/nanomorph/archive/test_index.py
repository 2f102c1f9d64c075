"""``nanomorph index build|query`` as users run them: real files, the real CLI, tiny ONNX models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from nanomorph.archive.index import SimilarityIndex
from tests.fixtures.cli import nanomorph


def bright_fraction(frac: float, size: int = 40) -> np.ndarray:
    """Black image whose top ``frac`` of rows is white: the tiny embedder sees mean brightness ``frac``."""
    img = np.zeros((size, size), dtype=np.uint8)
    img[: max(1, round(frac * size)), :] = 255
    return img


def make_archive(root: Path, fracs: list[float]) -> list[Path]:
    paths = []
    for k, f in enumerate(fracs):
        sub = root / ("a" if k % 2 else "b")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"img_{k:02d}.png"
        Image.fromarray(bright_fraction(f)).save(path)
        paths.append(path)
    return paths


def test_build_query_round_trip_and_resume(tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]) -> None:
    store, tags = tiny_store
    archive = tmp_path / "archive"
    paths = make_archive(archive, [0.1, 0.2, 0.35, 0.5, 0.65, 0.8])
    (archive / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    out = tmp_path / "idx"

    r = nanomorph(
        "index", "build", archive, "--out", out, "--models", store, "--tag", tags["embed"], "--chunk", "2"
    )
    assert r.returncode == 0, r.stderr
    assert "6 added" in r.stdout and "1 unreadable" in r.stdout
    info = json.loads((out / "index.json").read_text())
    assert info["count"] == 6 and info["dim"] == 4 and info["model"] == tags["embed"]
    assert not (out / "parts").exists()
    vectors = np.load(out / "vectors.npy")
    assert vectors.shape == (6, 4) and np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    assert "broken.png" in json.loads((out / "errors.json").read_text())

    # Query with an indexed image: its nearest neighbour is itself, distance ~0.
    r = nanomorph("index", "query", paths[3], "--index", out, "-k", "3", "--json")
    assert r.returncode == 0, r.stderr
    results = json.loads(r.stdout)["results"]
    assert [x["rank"] for x in results] == [1, 2, 3]
    assert Path(results[0]["path"]).resolve() == paths[3].resolve()
    assert results[0]["distance"] < 1e-4
    # Next are the images of the nearest brightness, in order.
    assert {Path(x["path"]).name for x in results[1:]} == {paths[2].name, paths[4].name}
    assert results[1]["distance"] <= results[2]["distance"]

    # The table form prints one row per neighbour.
    r = nanomorph("index", "query", paths[0], "--index", out, "-k", "2")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().splitlines()) == 3 and paths[0].name in r.stdout.splitlines()[1]

    # Resume: a second build embeds nothing new; an added image is the only one embedded.
    r = nanomorph("index", "build", archive, "--out", out, "--models", store, "--tag", tags["embed"])
    assert r.returncode == 0 and "0 added" in r.stdout and "6 already there" in r.stdout
    Image.fromarray(bright_fraction(0.95)).save(archive / "new.png")
    paths[1].unlink()
    r = nanomorph("index", "build", archive, "--out", out, "--models", store, "--tag", tags["embed"])
    assert "1 added" in r.stdout and "1 removed" in r.stdout, r.stdout
    index = SimilarityIndex.load(out)
    assert len(index) == 6 and "new.png" in index.paths and "a/img_01.png" not in index.paths


def test_resume_after_interrupted_build_and_errors(
    tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]
) -> None:
    from nanomorph.archive.index import build_index, load_embedder

    store, tags = tiny_store
    archive = tmp_path / "archive"
    make_archive(archive, [0.1, 0.3, 0.5, 0.7])
    out = tmp_path / "idx"
    embedder = load_embedder(tags["embed"], store)

    calls: list[int] = []

    class Dying:
        """Embeds one chunk, then dies like a killed process."""

        model = embedder.model

        def embed(self, images: list[np.ndarray]) -> np.ndarray:
            if calls:
                raise KeyboardInterrupt
            calls.append(len(images))
            return embedder.embed(images)

    with pytest.raises(KeyboardInterrupt):
        build_index(archive, out, Dying(), tags["embed"], store, chunk=2)
    assert len(list((out / "parts").glob("part-*.json"))) == 1  # the finished chunk survived

    counted: list[int] = []

    class Counting:
        model = embedder.model

        def embed(self, images: list[np.ndarray]) -> np.ndarray:
            counted.append(len(images))
            return embedder.embed(images)

    stats = build_index(archive, out, Counting(), tags["embed"], store, chunk=2)
    assert sum(counted) == 2 and stats["count"] == 4  # only the unfinished chunk was embedded again

    # Another model into the same index is refused with a message naming the file.
    r = nanomorph("index", "build", archive, "--out", out, "--models", store, "--tag", tags["classify"])
    assert r.returncode == 2 and "index.json" in r.stderr and "Traceback" not in r.stderr
    # An empty folder, a folder that is not an index: one clear line each.
    (tmp_path / "empty").mkdir()
    r = nanomorph("index", "build", tmp_path / "empty", "--out", tmp_path / "i2", "--models", store)
    assert r.returncode == 2 and "no supported images" in r.stderr
    r = nanomorph("index", "query", archive / "a" / "img_01.png", "--index", tmp_path)
    assert r.returncode == 2 and "vectors.npy" in r.stderr and "Traceback" not in r.stderr


def test_search_matches_brute_force_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    import nanomorph.archive.index as nmi

    rng = np.random.default_rng(0)
    vecs = nmi.l2_normalise(rng.normal(size=(1000, 16)))
    index = SimilarityIndex(vecs, [f"{i}.png" for i in range(1000)], {})
    monkeypatch.setattr(nmi, "_BLOCK", 97)  # several blocks, a ragged last one
    q = rng.normal(size=(3, 16))
    idx, dist = index.search(q, 7)
    expect = np.argsort(-(nmi.l2_normalise(q) @ vecs.T), axis=1)[:, :7]
    assert np.array_equal(idx, expect)
    assert np.all(np.diff(dist, axis=1) >= 0)
    assert index.query(vecs[5], 1)[0] == {"path": "5.png", "distance": pytest.approx(0, abs=1e-5), "rank": 1}
    index.check_model("m:1")  # no model recorded: nothing to check against
    index.info["model"] = "m:1"
    with pytest.raises(ValueError, match="built with m:1"):
        index.check_model("m:2")
    with pytest.raises(ValueError, match="16-d"):
        index.check_model("m:1", dim=8)


def test_similar_endpoint_on_a_real_server(tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]) -> None:
    """``POST /similar`` answers from the index named by ``NANOMORPH_INDEX``."""
    import httpx

    from tests.fixtures.server import start_server

    store, tags = tiny_store
    paths = make_archive(tmp_path / "archive", [0.1, 0.3, 0.5, 0.7, 0.9])
    out = tmp_path / "idx"
    r = nanomorph(
        "index", "build", tmp_path / "archive", "--out", out, "--models", store, "--tag", tags["embed"]
    )
    assert r.returncode == 0, r.stderr
    with start_server(tmp_path / "srv", store=store, env={"NANOMORPH_INDEX": str(out)}) as server:
        with open(paths[2], "rb") as fh:
            resp = httpx.post(
                server.url + "/similar", files={"image": ("q.png", fh)}, params={"k": 3}, timeout=30
            )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        hits = body["results"]
        assert [h["rank"] for h in hits] == [1, 2, 3]
        assert Path(hits[0]["path"]).resolve() == paths[2].resolve() and hits[0]["distance"] < 1e-4
        assert body["model"] == tags["embed"]
        # Not an image: a 4xx with a reason, not a 500.
        resp = httpx.post(server.url + "/similar", files={"image": ("x.png", b"nope")}, timeout=30)
        assert 400 <= resp.status_code < 500 and resp.json()["reason"]
