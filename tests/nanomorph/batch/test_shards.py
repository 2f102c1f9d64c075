"""The shard partition and ``merge`` on hand-built shard folders (the end-to-end run with real
processes is in test_pipelines.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from nanomorph.batch import shards


def test_parse_shard() -> None:
    assert shards.parse_shard("0/1") == (0, 1) and shards.parse_shard(" 3 / 8 ") == (3, 8)
    assert shards.parse_shard(None) is None
    for bad in ("8/8", "-1/4", "1/0", "a/b", "1-4"):
        with pytest.raises(ValueError, match="--shard"):
            shards.parse_shard(bad)


def test_partition_is_complete_disjoint_and_independent_of_other_files() -> None:
    rels = [f"s{i // 10}/f{i:04d}.dm4" for i in range(1000)]
    parts = [shards.select(rels, i, 7, key=str) for i in range(7)]
    assert sorted(sum(parts, [])) == sorted(rels) and sum(map(len, parts)) == len(rels)
    assert min(map(len, parts)) > 100  # roughly balanced (1000 / 7 = 143)
    # A file's shard depends on its path only: adding files moves nobody.
    more = shards.select([*rels, "new/a.tif", "new/b.tif"], 3, 7, key=str)
    assert [r for r in more if r in rels] == parts[3]
    assert shards.shard_dir(Path("o"), 3, 16).name == "shard-03-of-16"


def _shard(root: Path, index: int, count: int, rels: list[str]) -> Path:
    folder = root / shards.shard_dir(root, index, count).name
    (folder / "masks").mkdir(parents=True)
    rows = [{"path": r, "task": "segment", "mask_file": f"masks/{r}_mask.png"} for r in rels]
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for r in rels:
        (folder / "masks" / f"{r}_mask.png").write_bytes(r.encode())
    with open(folder / "objects.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "particle", "area_nm2"])
        for r in rels:
            w.writerows([[r, 1, 10.0], [r, 2, 20.0]])
    (folder / "model.json").write_text('{"tag": "m:1"}\n')
    return folder


def test_merge_joins_rows_files_and_per_batch_tables(tmp_path: Path) -> None:
    rels = [f"img{i}" for i in range(12)]
    by_shard = {i: [r for r in rels if shards.shard_of(r, 3) == i] for i in range(3)}
    for i, mine in by_shard.items():
        _shard(tmp_path, i, 3, mine)
    counts = shards.merge(tmp_path)
    assert counts == {"shards": 3, "of": 3, "rows": 12, "errors": 0}
    merged = [json.loads(line)["path"] for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert merged == sorted(rels)
    assert all((tmp_path / "masks" / f"{r}_mask.png").read_bytes() == r.encode() for r in rels)
    with open(tmp_path / "objects.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [(t["path"], t["particle"]) for t in table] == [(r, p) for r in sorted(rels) for p in ("1", "2")]
    assert (tmp_path / "report.html").is_file() and (tmp_path / "results.csv").is_file()


def test_merge_refuses_what_does_not_fit(tmp_path: Path) -> None:
    rels = [f"img{i}" for i in range(6)]
    wrong = [r for r in rels if shards.shard_of(r, 2) == 1]
    _shard(tmp_path, 0, 2, wrong)  # rows of shard 1 in shard 0's folder
    _shard(tmp_path, 1, 2, wrong)
    with pytest.raises(ValueError, match="does not belong to shard 0/2"):
        shards.merge(tmp_path)
    with pytest.raises(ValueError, match="no shard-I-of-N folders"):
        shards.merge(tmp_path / "shard-0-of-2")
    _shard(tmp_path, 0, 3, [])
    with pytest.raises(ValueError, match="different N"):
        shards.merge(tmp_path)
