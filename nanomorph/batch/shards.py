"""Archives on a cluster: ``nanomorph predict --shard I/N`` and ``nanomorph merge``.

A shard is the set of files whose relative path hashes to ``I`` modulo ``N`` (the first 8 bytes
of its SHA-256, big endian). The partition depends on nothing but the path and ``N``: every array
task computes it alone from the same sorted listing, a file added to the archive while tasks are
queued lands in exactly one shard (a block split of the sorted list would shift every later
file). The price is a binomial spread of shard sizes: 10^5 files in 16 shards put at most 2 %
more than the mean in one shard, 10^6 files 0.7 % (computed on synthetic archive paths).

Shard ``I`` of ``N`` writes a complete pipeline output folder ``OUT/shard-I-of-N/`` (results,
errors, masks, overlays, report), so it resumes like any ``predict`` run: rerun the same array
task and it skips what is done. ``nanomorph merge OUT`` then joins ``OUT/shard-*-of-N/`` into
``OUT`` itself: ``results.jsonl`` (rows in listing order), ``results.csv``, ``errors.csv``, every
per-image file (hard links where the file system allows, else copies), ``model.json`` and a
``report.html`` over everything. Merging refuses missing shards (unless ``--partial``), shards of
different ``N``, models or tasks, rows that are in the wrong shard, and shards that are not
finished: from the ``config.yaml`` each shard wrote, the input folder is listed again and every
file of the shard must have a row or an ``errors.csv`` line.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import os
import re
import shutil
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

from nanomorph.atomic import atomic_write_text

log = logging.getLogger(__name__)

_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")
_DIR = re.compile(r"^shard-(\d+)-of-(\d+)$")
#: Files of a pipeline folder that merge rebuilds rather than copies.
BOOKKEEPING = {
    "results.jsonl",
    "results.csv",
    "errors.csv",
    "config.yaml",
    "report.html",
    "model.json",
    "watch_state.json",
    "particles.csv",  # rebuilt with results.csv from the per-image particles/ tables
    "particles.png",
}
T = TypeVar("T")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (array task ids start at 0); None for None."""
    if text is None or text == "":
        return None
    match = _SPEC.match(str(text))
    if not match:
        raise ValueError(f"--shard must look like I/N (e.g. 0/8), got {text!r}")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text}: need N >= 1 and 0 <= I < N")
    return index, count


def shard_of(rel: str, count: int) -> int:
    """The shard (0-based) of a relative path (``/`` separators) among ``count``."""
    digest = hashlib.sha256(rel.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % count


def select(items: list[T], index: int, count: int, key: Any = lambda it: it.rel) -> list[T]:
    """The items of shard ``index`` of ``count``, order kept."""
    return [it for it in items if shard_of(key(it), count) == index]


def shard_dir(out: Path, index: int, count: int) -> Path:
    width = len(str(count - 1))
    return out / f"shard-{index:0{width}d}-of-{count}"


def find_shards(out: Path) -> tuple[int, dict[int, Path]]:
    """``(N, {I: folder})`` of the shard folders under ``out``.

    Raises:
        ValueError: none found, or folders of different N.
    """
    found: dict[int, dict[int, Path]] = {}
    for child in sorted(out.iterdir()) if out.is_dir() else []:
        match = _DIR.match(child.name)
        if match and child.is_dir():
            found.setdefault(int(match.group(2)), {})[int(match.group(1))] = child
    if not found:
        raise ValueError(f"{out}: no shard-I-of-N folders (written by `nanomorph predict --shard I/N`)")
    if len(found) > 1:
        raise ValueError(f"{out}: shard folders of different N ({sorted(found)}); merge one N at a time")
    count, shards = next(iter(found.items()))
    return count, shards


# ------------------------------------------------------------------------------------------- merge


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            # A shard killed mid-write: its last partial line is dropped by its own next run too.
            log.warning("%s: line %d is incomplete; ignored (rerun that shard to finish it)", path, n)
    return rows


def _read_errors(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as fh:
        return [dict(r) for r in csv.DictReader(fh) if r.get("path")]


def _place(src: Path, dest: Path) -> None:
    """``dest`` becomes ``src``'s content: a hard link when possible (no copy of 10^5 masks)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.merge-tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dest)


def merge(out: Path, dest: Path | None = None, partial: bool = False) -> dict[str, int]:
    """Merges ``out/shard-*-of-N/`` into ``dest`` (default ``out``); returns counts.

    Raises:
        ValueError: missing shards (without ``partial``), mixed tasks/models, misplaced or
            duplicated rows, or two shards holding different files under one name.
    """
    from nanomorph.batch.pipelines import ERROR_COLUMNS, ResultWriter

    dest = dest or out
    count, shards = find_shards(out)
    missing = [i for i in range(count) if i not in shards]
    if missing and not partial:
        raise ValueError(
            f"{out}: shards {', '.join(map(str, missing))} of {count} are missing; run them first "
            "(or merge what is there with --partial)"
        )
    if not partial:
        _check_finished(shards, count)
    rows: dict[str, dict[str, Any]] = {}
    errors: dict[str, dict[str, str]] = {}
    tasks, cards = set(), {}
    placed: dict[str, list[Path]] = {}
    for index, folder in sorted(shards.items()):
        for row in _read_jsonl(folder / "results.jsonl"):
            rel = str(row["path"])
            if shard_of(rel, count) != index:
                raise ValueError(f"{folder}: {rel} does not belong to shard {index}/{count}")
            if rel in rows:
                raise ValueError(f"{rel} has results in two shards")
            rows[rel] = row
            tasks.add(row.get("task"))
        for err in _read_errors(folder / "errors.csv"):
            errors[err["path"]] = err
        card_path = folder / "model.json"
        if card_path.is_file():
            cards[folder.name] = card_path.read_text(encoding="utf-8")
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            rel_file = path.relative_to(folder).as_posix()
            if rel_file in BOOKKEEPING or path.name.startswith("."):
                continue
            placed.setdefault(rel_file, []).append(path)
    if len(tasks) > 1:
        raise ValueError(f"{out}: shards hold results of different tasks ({sorted(map(str, tasks))})")
    if len(set(cards.values())) > 1:
        raise ValueError(
            f"{out}: shards ran different models ({', '.join(sorted(cards))}); see their model.json"
        )
    for rel in rows:
        errors.pop(rel, None)  # a file fixed and redone: its old error is gone
    dest.mkdir(parents=True, exist_ok=True)
    for rel_file, paths in placed.items():
        if len(paths) == 1 or all(p.read_bytes() == paths[0].read_bytes() for p in paths[1:]):
            _place(paths[0], dest / rel_file)
        elif rel_file.endswith(".csv"):
            _merge_csv(paths, dest / rel_file)  # a per-batch table (one row per image or object)
        else:
            raise ValueError(f"{rel_file} differs between shards ({', '.join(str(p.parent) for p in paths)})")
    ordered = sorted(rows.values(), key=lambda r: PurePosixPath(str(r["path"])).parts)
    atomic_write_text(
        dest / "results.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered)
    )
    _write_errors(dest / "errors.csv", [errors[k] for k in sorted(errors)], ERROR_COLUMNS)
    if cards:
        atomic_write_text(dest / "model.json", next(iter(cards.values())))
    task = next(iter(tasks)) if tasks else "classify"
    ResultWriter(dest, str(task)).close()  # results.csv from results.jsonl, as every run writes it
    from nanomorph.batch.report import write_report

    write_report(dest)
    return {"shards": len(shards), "of": count, "rows": len(ordered), "errors": len(errors)}


def _merge_csv(paths: list[Path], dest: Path) -> None:
    """One table from the shards' tables of the same name: same header required; rows sorted by
    their ``path`` column in listing order (stable, so a file's rows keep their order)."""
    header: list[str] | None = None
    rows: list[dict[str, str]] = []
    for path in paths:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            if header is None:
                header = list(reader.fieldnames or [])
            elif list(reader.fieldnames or []) != header:
                raise ValueError(f"{path}: columns differ from {paths[0]}")
            rows.extend(reader)
    if header and "path" in header:
        rows.sort(key=lambda r: PurePosixPath(r.get("path") or "").parts)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=header or [], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(dest, buf.getvalue())


def _check_finished(shards: dict[int, Path], count: int) -> None:
    """Every file of each shard's part of its input folder has a row or an error line."""
    import yaml

    from nanomorph.batch.pipelines import list_items

    listings: dict[tuple[str, bool], list[str]] = {}
    unfinished = []
    for index, folder in sorted(shards.items()):
        config_path = folder / "config.yaml"
        config = yaml.safe_load(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
        input_dir = (config or {}).get("input_dir")
        if not input_dir or not Path(input_dir).is_dir():
            log.warning(
                "%s: input folder %s not found; cannot check that the shard is complete", folder, input_dir
            )
            continue
        key = (str(input_dir), bool(config.get("no_recursive")))
        if key not in listings:
            items = list_items(Path(input_dir), folder.parent, recursive=not key[1])
            listings[key] = [it.rel for it in items]
        done = {str(r.get("path")) for r in _read_jsonl(folder / "results.jsonl")}
        done |= {e["path"] for e in _read_errors(folder / "errors.csv")}
        todo = [rel for rel in listings[key] if shard_of(rel, count) == index and rel not in done]
        if todo:
            unfinished.append(f"shard {index}: {len(todo)} files not done (e.g. {todo[0]})")
    if unfinished:
        raise ValueError(
            "unfinished shards; rerun them (they resume) or merge what is there with --partial: "
            + "; ".join(unfinished)
        )


def _write_errors(path: Path, errors: list[dict[str, str]], columns: tuple[str, ...]) -> None:
    if not errors:
        path.unlink(missing_ok=True)
        return
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(errors)
    atomic_write_text(path, buf.getvalue())


# -------------------------------------------------------------------------------------------- the command (nanomorph.cli calls run)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such folder")
    counts = merge(out, Path(args.into) if args.into else None, partial=args.partial)
    log.info(
        "merged %d of %d shards: %d results, %d files not read; in %s",
        counts["shards"],
        counts["of"],
        counts["rows"],
        counts["errors"],
        args.into or out,
    )
    return 0
