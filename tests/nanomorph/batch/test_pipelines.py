"""``nanomorph predict`` / ``client`` / ``watch`` as users run them: real CLIs, files, a real server."""

from __future__ import annotations

import csv
import filecmp
import io
import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from tests.fixtures.cli import nanomorph, nanomorph_argv, process_env
from tests.fixtures.emfiles import emi_bytes, fei_tiff_bytes, ome_tiff_bytes, ser_bytes
from tests.fixtures.server import Server, free_port

REPO = Path(__file__).resolve().parents[3]


def dark_speck(size: int = 40) -> np.ndarray:
    img = np.full((size, size + 6), 12, dtype=np.uint8)
    img[8:14, 10:16] = 240
    return img


def make_inputs(root: Path) -> Path:
    """Two PNGs (dark -> singular, bright -> network), a 16-bit TIFF in a subfolder, a corrupt file."""
    root.mkdir(parents=True)
    Image.fromarray(dark_speck()).save(root / "dark.png")
    Image.fromarray(255 - dark_speck()).save(root / "bright.png")
    (root / "run2").mkdir()
    wires = np.zeros((48, 80), dtype=np.uint16)
    wires[20:26, :] = 50000  # one horizontal bright wire
    tifffile.imwrite(root / "run2" / "wire.tif", wires)
    (root / "run2" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def errors(out: Path) -> list[dict[str, str]]:
    with open(out / "errors.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def same_tree(a: Path, b: Path) -> None:
    """Every output file identical, byte for byte (config.yaml differs by design)."""
    files_a = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name != "config.yaml")
    files_b = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name != "config.yaml")
    assert files_a == files_b
    _, mismatch, errs = filecmp.cmpfiles(a, b, [str(p) for p in files_a], shallow=False)
    assert not mismatch and not errs, mismatch + errs


@pytest.mark.parametrize("task", ["classify", "segment", "embed"])
def test_predict_and_client_write_identical_results(
    task: str, tmp_path: Path, tiny_store: tuple[Path, dict[str, str]], default_server: Server
) -> None:
    data = make_inputs(tmp_path / "in")
    local, served = tmp_path / "local", tmp_path / "served"
    p = nanomorph("predict", "--models", tiny_store[0], "--task", task, data, "--out", local)
    assert p.returncode == 0, p.stderr
    c = nanomorph(
        "client", "--url", default_server.url, "--task", task, data, "--out", served, "--concurrency", "3"
    )
    assert c.returncode == 0, c.stderr
    same_tree(local, served)  # report.html and model.json included
    assert json.loads((local / "model.json").read_text())["tag"] == f"nanomorph-{task}:1"
    assert "run2/broken.png" in (local / "report.html").read_text()

    by_path = {r["path"]: r for r in rows(local)}
    assert sorted(by_path) == ["bright.png", "dark.png", "run2/wire.tif"]
    assert [(e["path"], e["reason"]) for e in errors(local)] == [("run2/broken.png", "corrupt")]
    assert "run2/broken.png" in errors(local)[0]["message"]
    header = (local / "results.csv").read_text().splitlines()[0].split(",")
    assert header[:3] == ["path", "task", "model"]
    if task == "classify":
        assert by_path["dark.png"]["label"] == "singular" and by_path["bright.png"]["label"] == "network"
        assert "probabilities.network" in header
    elif task == "embed":
        vec = np.load(local / by_path["dark.png"]["embedding_file"])
        assert vec.dtype == np.float32 and vec.shape == (4,) and abs(np.linalg.norm(vec) - 1) < 1e-5
    else:
        wire = by_path["run2/wire.tif"]
        assert wire["mask_file"] == "masks/run2/wire_mask.png"
        assert wire["labels_file"] == "masks/run2/wire_labels.tif"
        assert wire["overlay_file"] == "overlays/run2/wire_overlay.png"
        with Image.open(local / wire["mask_file"]) as im:  # a palette PNG: indices, shown in colour
            assert im.mode == "P"
            mask = np.array(im)
        assert mask.shape == (48, 80) and (mask[20:26] == 1).all() and (mask[:18] == 0).all()
        assert np.array_equal(tifffile.imread(local / wire["labels_file"]), mask)
        assert (local / wire["overlay_file"]).is_file()
        assert wire["morphology"]["classes"]["wire"]["area_fraction"] == pytest.approx(6 / 48)
        assert "wire.area_fraction" in header


def test_rerun_resumes_and_skips_done_and_bad_files(
    tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]
) -> None:
    data = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    assert nanomorph("predict", "--models", tiny_store[0], data, "--out", out).returncode == 0
    assert len(rows(out)) == 3
    # A run killed mid-write leaves a partial last line; the next run drops it and carries on.
    with open(out / "results.jsonl", "a") as fh:
        fh.write('{"path": "half')
    again = nanomorph("predict", "--models", tiny_store[0], data, "--out", out)
    assert again.returncode == 0, again.stderr
    assert "nothing new" in again.stderr
    assert len(rows(out)) == 3
    # One new image: only it is processed.
    Image.fromarray(dark_speck(32)).save(data / "run2" / "new.png")
    third = nanomorph("predict", "--models", tiny_store[0], data, "--out", out)
    assert third.returncode == 0 and "1 images to do" in third.stderr
    assert [r["path"] for r in rows(out)][-1] == "run2/new.png" and len(rows(out)) == 4
    # The corrupt file is still listed, not retried; a fixed file is retried by itself.
    assert [e["path"] for e in errors(out)] == ["run2/broken.png"]
    Image.fromarray(dark_speck(24)).save(data / "run2" / "broken.png")
    fourth = nanomorph("predict", "--models", tiny_store[0], data, "--out", out)
    assert fourth.returncode == 0 and len(rows(out)) == 5 and errors(out) == []
    # A folder of classify results is not silently mixed with segment results.
    mixed = nanomorph("predict", "--models", tiny_store[0], "--task", "segment", data, "--out", out)
    assert mixed.returncode == 2 and "classify results" in mixed.stderr


def test_exit_codes_and_clear_errors(tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.tif").write_bytes(b"II*\x00garbage")
    run = nanomorph("predict", "--models", tiny_store[0], bad, "--out", tmp_path / "o1")
    assert run.returncode == 1 and errors(tmp_path / "o1")[0]["path"] == "a.tif"
    missing = nanomorph("predict", "--models", tiny_store[0], tmp_path / "nope", "--out", tmp_path / "o2")
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
    dead = nanomorph(
        "client", "--url", f"http://127.0.0.1:{free_port()}", bad, "--out", tmp_path / "o3", "--wait", "1"
    )
    assert dead.returncode == 2 and "not ready" in dead.stderr and "Traceback" not in dead.stderr


def _tiff_bytes() -> bytes:
    buf = io.BytesIO()
    img = np.full((64, 64), 1000, dtype=np.uint16)
    img[10:20, 10:20] = 60000
    tifffile.imwrite(buf, img)
    return buf.getvalue()


def _wait_rows(out: Path, n: int, timeout: float) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (out / "results.jsonl").is_file() and len(rows(out)) >= n:
            return rows(out)
        time.sleep(0.1)
    raise AssertionError(f"no {n} rows in {out} after {timeout} s")


def test_watch_processes_a_file_written_in_two_chunks_exactly_once(
    tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]
) -> None:
    watched, out = tmp_path / "incoming", tmp_path / "out"
    watched.mkdir()
    args: list[str | Path] = [
        "watch",
        watched,
        "--models",
        tiny_store[0],
        "--out",
        out,
        "--interval",
        "0.1",
        "--stable-seconds",
        "1.0",
    ]
    proc = subprocess.Popen(  # a real process: it is stopped with SIGTERM
        nanomorph_argv(*args),
        cwd=REPO,
        env=process_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(1.5)  # let it start and scan the empty folder
        data = _tiff_bytes()
        target = watched / "frame_001.tif"
        with open(target, "wb") as fh:  # the camera writes half, pauses, writes the rest
            fh.write(data[: len(data) // 2])
            fh.flush()
            time.sleep(0.5)
            fh.write(data[len(data) // 2 :])
        found = _wait_rows(out, 1, timeout=20)
        time.sleep(0.5)  # several more scans: it must not be picked up again
        proc.send_signal(signal.SIGTERM)
        log, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, log
    assert [r["path"] for r in rows(out)] == ["frame_001.tif"] and found[0]["shape"] == [64, 64]
    assert not (out / "errors.csv").exists(), "the half-written file was read"
    assert json.loads((out / "watch_state.json").read_text())["files"]["frame_001.tif"]["status"] == "ok"
    # Restarted: nothing is processed twice; a new file is.
    (watched / "frame_002.tif").write_bytes(data)
    again = nanomorph(*args, "--once")
    assert again.returncode == 0, again.stderr
    assert [r["path"] for r in rows(out)] == ["frame_001.tif", "frame_002.tif"]
    assert (out / "results.csv").read_text().count("frame_00") == 2


def test_watch_once_through_the_server(tmp_path: Path, default_server: Server) -> None:
    watched, out = tmp_path / "incoming", tmp_path / "out"
    watched.mkdir()
    Image.fromarray(dark_speck()).save(watched / "a.png")
    Image.fromarray(255 - dark_speck()).save(watched / "b.png")
    args: list[str | Path] = [
        "watch",
        watched,
        "--url",
        default_server.url,
        "--out",
        out,
        "--once",
        "--interval",
        "0.1",
    ]
    first = nanomorph(*args, "--stable-seconds", "0")
    assert first.returncode == 0, first.stderr
    assert {r["path"]: r["label"] for r in rows(out)} == {"a.png": "singular", "b.png": "network"}
    assert nanomorph(*args).returncode == 0 and len(rows(out)) == 2


def test_every_file_in_a_folder_is_read_or_listed_in_errors(
    tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]
) -> None:
    data = tmp_path / "in"
    (data / "tia").mkdir(parents=True)
    wire = np.zeros((48, 80), dtype=np.uint16)
    wire[20:26, :] = 50000
    (data / "sem.tif").write_bytes(fei_tiff_bytes(wire, 1.5e-9))
    (data / "ome.tif").write_bytes(ome_tiff_bytes(wire, 0.002, "µm"))
    (data / "tia" / "wire_1.ser").write_bytes(ser_bytes(wire, 4e-10))
    (data / "tia" / "wire.emi").write_bytes(emi_bytes("TEM Imaging"))  # read with the .ser
    (data / "tia" / "wire_1.tif").write_bytes(fei_tiff_bytes(wire, 4e-10))  # same stem, other suffix
    (data / "notes.txt").write_text("beam current 1 nA")
    (data / "orphan.emi").write_bytes(emi_bytes())
    out = tmp_path / "out"
    run = nanomorph("predict", "--models", tiny_store[0], "--task", "segment", data, "--out", out)
    assert run.returncode == 0, run.stderr
    by_path = {r["path"]: r for r in rows(out)}
    assert sorted(by_path) == ["ome.tif", "sem.tif", "tia/wire_1.ser", "tia/wire_1.tif"]
    assert {p: (r["pixel_size"], r["pixel_unit"]) for p, r in by_path.items()} == {
        "ome.tif": (2.0, "nm"),
        "sem.tif": (1.5, "nm"),
        "tia/wire_1.ser": (0.4, "nm"),
        "tia/wire_1.tif": (0.4, "nm"),
    }
    assert by_path["tia/wire_1.ser"]["mask_file"] == "masks/tia/wire_1_ser_mask.png"
    assert by_path["tia/wire_1.tif"]["mask_file"] == "masks/tia/wire_1_tif_mask.png"
    assert [(e["path"], e["reason"]) for e in errors(out)] == [
        ("notes.txt", "unsupported_format"),
        ("orphan.emi", "unsupported_format"),
    ]
    assert ".txt is not a supported image format" in errors(out)[0]["message"]
    # Every length in the rows and the label TIFFs is in nm, as Fiji reads the TIFF.
    with tifffile.TiffFile(out / by_path["sem.tif"]["labels_file"]) as tif:
        assert (tif.imagej_metadata or {})["unit"] == "nm"
        num, den = tif.pages[0].tags["XResolution"].value
        assert den / num == pytest.approx(1.5)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "notes.txt" in page


def _files(root: Path) -> dict[str, bytes]:
    """Every output file under ``root`` but the shard folders and config.yaml, with its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "config.yaml" and not p.relative_to(root).parts[0].startswith("shard-")
    }


def test_shards_in_separate_processes_merge_into_the_unsharded_results(
    tmp_path: Path, tiny_store: tuple[Path, dict[str, str]]
) -> None:
    data = make_inputs(tmp_path / "in")
    for i in range(6):
        Image.fromarray(dark_speck(24 + 4 * i) if i % 2 else 255 - dark_speck(24 + 4 * i)).save(
            data / f"f{i}.png"
        )
    (data / "notes.txt").write_text("not an image")
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    common = ["--models", str(tiny_store[0]), "--task", "segment", str(data)]
    assert nanomorph("predict", *common, "--out", whole).returncode == 0
    procs = [
        subprocess.Popen(
            nanomorph_argv("predict", *common, "--out", sharded, "--shard", f"{i}/3"),
            cwd=REPO,
            env=process_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for i in range(3)
    ]
    for proc in procs:
        log, _ = proc.communicate(timeout=120)
        assert proc.returncode in (0, 1), log  # 1: a shard whose only files were unreadable
    parts = sorted(p.name for p in sharded.iterdir())
    assert parts == ["shard-0-of-3", "shard-1-of-3", "shard-2-of-3"]
    counts = [len(rows(sharded / p)) if (sharded / p / "results.jsonl").exists() else 0 for p in parts]
    assert sum(counts) == len(rows(whole)) == 9 and max(counts) < 9
    # Resumable per shard: the same array task run again has nothing left to do.
    again = nanomorph("predict", *common, "--out", sharded, "--shard", "1/3")
    assert again.returncode == 0 and "nothing new" in again.stderr
    merged = nanomorph("merge", sharded)
    assert merged.returncode == 0, merged.stderr
    assert rows(sharded) == rows(whole)  # row for row, in the same order
    mine, theirs = _files(sharded), _files(whole)
    assert sorted(mine) == sorted(theirs)
    assert [k for k in mine if mine[k] != theirs[k]] == []  # csv, errors, masks, report: byte for byte
    # An unfinished shard (here: one row short) is refused unless asked for; rerun, it completes.
    biggest = sharded / parts[counts.index(max(counts))] / "results.jsonl"
    full = biggest.read_text()
    biggest.write_text("".join(full.splitlines(keepends=True)[:-1]))
    unfinished = nanomorph("merge", sharded)
    assert unfinished.returncode == 2 and "1 files not done" in unfinished.stderr
    biggest.write_text(full)
    # A missing shard is refused unless asked for.
    (sharded / "shard-2-of-3").rename(tmp_path / "away")
    refused = nanomorph("merge", sharded)
    assert refused.returncode == 2 and "shards 2 of 3 are missing" in refused.stderr
    assert nanomorph("merge", sharded, "--partial").returncode == 0
    bad = nanomorph("predict", *common, "--out", sharded, "--shard", "3/3")
    assert bad.returncode == 2 and "0 <= I < N" in bad.stderr
