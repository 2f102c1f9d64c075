"""Batch and watched-folder pipelines: ``nanomorph predict``, ``nanomorph client``, ``nanomorph watch``.

All three write the same outputs through one :class:`ResultWriter`, so running a folder in-process
(``predict``, onnxruntime via :mod:`nanomorph.runtime`, no server) or through a server
(``client``, :class:`~nanomorph.client.NanomorphClient`) gives identical files:

``OUT/results.jsonl``
    one JSON object per image, appended as each image finishes (the source of truth; a rerun
    skips every path already in it). ``path`` is relative to INPUT_DIR (``/`` separators).
``OUT/results.csv``
    the same rows flattened (``probabilities.<class>``, ``<class>.area_fraction`` ...), sorted by
    path, rewritten from ``results.jsonl`` at the end of each run.
``OUT/errors.csv``
    ``path, reason, message, size, mtime_ns`` of every image that failed. Files refused for their
    content (corrupt, unsupported, too large...) are not retried unless they change (or
    ``--retry-errors``); failures of the server (unreachable, 503, 5xx) are retried by the next run.
``OUT/embeddings/<path>.npy`` (embed); ``OUT/masks/<stem>_mask.png`` (palette PNG),
``OUT/masks/<stem>_labels.tif`` (calibrated ImageJ TIFF) and ``OUT/overlays/<stem>_overlay.png``
(segment, see :mod:`nanomorph.batch.outputs`); ``OUT/model.json`` (the model card's key numbers),
``OUT/report.html`` (self-contained summary, :mod:`nanomorph.batch.report`), ``OUT/config.yaml``
(resolved options, never the token), and for ``watch`` ``OUT/watch_state.json`` (files done, with
size and mtime; written atomically).

Every file under INPUT_DIR is accounted for: read, or a row in ``errors.csv`` (unsupported
suffixes too), except companions read with an image (a TIA ``.emi`` beside its ``.ser``).
``predict --shard I/N`` processes one deterministic part of the folder (:mod:`nanomorph.batch.shards`).

Floats in the rows are rounded to 6 significant digits, so that the last bits of a batched
onnxruntime call cannot make the in-process and the served results differ.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from nanomorph.atomic import atomic_write_bytes, atomic_write_text
from nanomorph.batch import outputs, report, shards
from nanomorph.config import save_resolved
from nanomorph.contract import (
    SUPPORTED_SUFFIXES,
    Contract,
    ImageReadError,
    is_companion,
    is_supported,
    list_files,
    normalise,
    read_image,
)
from nanomorph.contract.frames import nm_per_px
from nanomorph.progress import Progress
from nanomorph.tasks import TASKS

log = logging.getLogger(__name__)

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
ERRORS_CSV = "errors.csv"
STATE_FILE = "watch_state.json"
ERROR_COLUMNS = ("path", "reason", "message", "size", "mtime_ns")
#: Error reasons that another attempt may cure: never recorded as final.
#: (A wrong token is not the file's fault either: fixed, the files go through.)
TRANSIENT_REASONS = ("connection", "model_unavailable", "overloaded", "interrupted", "unauthorized")
SIGNIFICANT_DIGITS = 6


# ---------------------------------------------------------------------------------------- records


@dataclass
class Item:
    """One input file: its path, its path relative to the input folder (the row key), the stem
    its output files are named after, and whether its suffix is one nanomorph reads."""

    path: Path
    rel: str
    stem: str = ""
    supported: bool = True

    def __post_init__(self) -> None:
        self.stem = self.stem or outputs.output_stem(self.rel)


@dataclass
class Outcome:
    """What processing one image produced: a row and its files, or an error."""

    rel: str
    row: dict[str, Any] | None = None
    files: dict[str, bytes] = field(default_factory=dict)  # path relative to OUT -> bytes
    reason: str = ""
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.row is not None

    @property
    def transient(self) -> bool:
        return not self.ok and (self.reason in TRANSIENT_REASONS or self.reason.startswith("http_5"))


def failure(rel: str, exc: BaseException) -> Outcome:
    """An :class:`Outcome` for an exception: the reader's / server's reason, or a generic one."""
    reason = getattr(exc, "reason", "") or ""
    if not reason:
        reason = "unreadable" if isinstance(exc, OSError) else type(exc).__name__
    message = getattr(exc, "message", "") or str(exc)
    status = getattr(exc, "status", None)
    if isinstance(status, int) and status >= 500 and reason not in TRANSIENT_REASONS:
        reason = f"http_{status}"
    return Outcome(rel, reason=reason, message=" ".join(message.split()))


def clean(value: Any) -> Any:
    """JSON-able copy of ``value``: numpy scalars/arrays to Python, tuples to lists, floats rounded
    to :data:`SIGNIFICANT_DIGITS` significant digits and non-finite floats to None."""
    if isinstance(value, dict):
        return {str(k): clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return [clean(v) for v in value.tolist()]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        f = float(value)
        return float(f"{f:.{SIGNIFICANT_DIGITS}g}") if math.isfinite(f) else None
    return value


def embedding_file(rel: str) -> str:
    return f"embeddings/{rel}.npy"


def classify_row(rel: str, model: str, shape: Sequence[int], result: dict[str, Any]) -> dict[str, Any]:
    """The row of one classified image (``result`` as from ``Classifier.predict`` or the server)."""
    return clean(
        {
            "path": rel,
            "task": "classify",
            "model": model,
            "shape": list(shape),
            "label": result["label"],
            "confidence": result["confidence"],
            "ood_score": result.get("ood_score"),
            "ood_flag": bool(result.get("ood_flag", False)),
            "probabilities": result["probabilities"],
        }
    )


def embed_outcome(rel: str, model: str, shape: Sequence[int], embedding: np.ndarray) -> Outcome:
    vector = np.ascontiguousarray(embedding, dtype=np.float32).reshape(-1)
    buf = io.BytesIO()
    np.save(buf, vector, allow_pickle=False)
    row = clean(
        {
            "path": rel,
            "task": "embed",
            "model": model,
            "shape": list(shape),
            "dim": int(vector.shape[0]),
            "embedding_file": embedding_file(rel),
        }
    )
    return Outcome(rel, row, {embedding_file(rel): buf.getvalue()})


def overlay_png(
    image: np.ndarray,
    contract: Contract,
    mask: np.ndarray,
    classes: Sequence[str],
    pixel_size: float | None,
    pixel_unit: str | None,
) -> bytes:
    """Overlay PNG (legend, scale bar) over the normalised image (same in every pipeline)."""
    return outputs.overlay_png(normalise(image, contract), mask, classes, pixel_size, pixel_unit)


def segment_outcome(
    rel: str,
    model: str,
    classes: Sequence[str],
    mask: np.ndarray,
    pixel_size: float | None,
    pixel_unit: str | None,
    morphology: dict[str, Any],
    overlay: bytes | None,
    stem: str | None = None,
    particles: tuple[list[dict[str, Any]], dict[str, Any]] | None = None,
) -> Outcome:
    stem = stem or outputs.output_stem(rel)
    unit = pixel_unit if pixel_size is not None else None
    row = {
        "path": rel,
        "task": "segment",
        "model": model,
        "shape": [int(mask.shape[0]), int(mask.shape[1])],
        "pixel_size": pixel_size,
        "pixel_unit": unit,
        "classes": list(classes),
        "mask_file": outputs.mask_file(stem),
        "labels_file": outputs.labels_file(stem),
        "overlay_file": outputs.overlay_file(stem) if overlay is not None else None,
        "morphology": morphology,
    }
    files = outputs.segment_files(stem, mask, classes, pixel_size, unit, overlay)
    if particles is not None:
        from nanomorph import particles as pt

        rows, summary = particles
        row["particles"] = summary
        row["particles_file"] = pt.table_file(stem)
        files[pt.table_file(stem)] = pt.table_csv(rows).encode("utf-8")
        if overlay is not None:  # the picture is a report, like the overlay
            files[pt.picture_file(stem)] = pt.size_distribution_png(rows, rel)
    return Outcome(rel, clean(row), files)


def resolve_pixel_size(
    given: float | None, given_unit: str | None, meta_size: float | None, meta_unit: str | None
) -> tuple[float | None, str]:
    """The service's rule: a given size wins (with its unit, default nm), else the file's own."""
    size = given if given is not None else meta_size
    unit = given_unit or (meta_unit if given is None else None) or "nm"
    return size, unit


# --------------------------------------------------------------------------------------- backends


class LocalBackend:
    """Runs a stored model in this process (onnxruntime through :mod:`nanomorph.runtime`)."""

    def __init__(
        self,
        task: str,
        store: str,
        tag: str | None = None,
        providers: Sequence[str] | None = None,
        pixel_size: float | None = None,
        pixel_unit: str | None = None,
        overlays: bool = True,
        threads: int = 0,
        precision: str | None = None,
    ) -> None:
        from nanomorph.runtime import OnnxModel, Segmenter, task_helper
        from nanomorph.store import resolve

        self.task = task
        stored = resolve(tag or f"nanomorph-{task}:latest", store)
        onnx = OnnxModel(stored, providers=providers or None, threads=threads, precision=precision)
        self.model = stored.tag
        self.contract = stored.contract
        self.classes = list(stored.classes)
        self.helper: Any = task_helper(task, onnx)
        if isinstance(self.helper, Segmenter):
            self.classes = list(self.helper.classes)  # without a boundary channel
        self.pixel_size, self.pixel_unit, self.overlays = pixel_size, pixel_unit, overlays
        self.describe = f"{self.model} ({onnx.precision}) in-process on {', '.join(onnx.providers)}"
        threshold = (stored.ood or {}).get("threshold")
        sha = (stored.manifest.get("files") or {}).get("model.onnx")
        self._card = report.model_card(
            stored.tag,
            task,
            list(stored.classes),  # the model's own channels, as the server's /models lists them
            sha,
            stored.metrics,
            None if threshold is None else float(threshold),
        )

    def card(self) -> dict[str, Any]:
        """The model card's key numbers (``model.json``)."""
        return self._card

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """Processes a chunk of files; read errors become error outcomes, the rest run as one batch."""
        outcomes: list[Outcome | None] = [None] * len(items)
        decoded: list[tuple[int, np.ndarray, Any]] = []
        for i, item in enumerate(items):
            try:
                image, meta = read_image(item.path, name=item.rel)
                decoded.append((i, image, meta))
            except (ImageReadError, OSError) as exc:
                outcomes[i] = failure(item.rel, exc)
        if decoded and self.task == "classify":
            # The file's own calibration, as the service's /classify uses it (tiles at the encoder's nm/px).
            sizes = [nm_per_px(meta) for _, _, meta in decoded]
            results = self.helper.predict([im for _, im, _ in decoded], pixel_sizes=sizes)
            for (i, _, meta), r in zip(decoded, results, strict=True):
                outcomes[i] = Outcome(items[i].rel, classify_row(items[i].rel, self.model, meta.shape[:2], r))
        elif decoded and self.task == "embed":
            vectors = self.helper.embed([im for _, im, _ in decoded])
            for (i, _, meta), v in zip(decoded, vectors, strict=True):
                outcomes[i] = embed_outcome(items[i].rel, self.model, meta.shape[:2], v)
        else:
            for i, image, meta in decoded:
                outcomes[i] = self._segment(items[i], image, meta)
        return [o for o in outcomes if o is not None]

    def _segment(self, item: Item, image: np.ndarray, meta: Any) -> Outcome:
        from nanomorph.morphology import measure
        from nanomorph.particles import report as particle_report

        mask, instances = self.helper.mask_and_instances(image)  # bounded memory where it can be
        size, unit = resolve_pixel_size(self.pixel_size, self.pixel_unit, meta.pixel_size, meta.pixel_unit)
        numbers = measure(mask, self.classes, size, unit)
        over = overlay_png(image, self.contract, mask, self.classes, size, unit) if self.overlays else None
        particles = particle_report(instances, mask, self.classes, size, unit, item.rel)
        return segment_outcome(
            item.rel,
            self.model,
            self.classes,
            mask,
            size,
            unit,
            numbers,
            over,
            stem=item.stem,
            particles=particles,
        )

    def close(self) -> None:
        pass


class RemoteBackend:
    """Sends files to a running service, ``concurrency`` requests at a time (threads; the server
    batches concurrent requests into one onnxruntime call)."""

    def __init__(
        self,
        task: str,
        url: str,
        token: str | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        retries: int = 3,
        pixel_size: float | None = None,
        pixel_unit: str | None = None,
        overlays: bool = True,
        wait_ready: float = 0.0,
    ) -> None:
        from nanomorph.client import NanomorphClient, NanomorphError

        if concurrency < 1:
            raise ValueError(f"--concurrency must be >= 1, got {concurrency}")
        self.task = task
        self.concurrency = concurrency
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request is noise
        self.client = NanomorphClient(
            url, token=token, timeout=timeout, retries=retries, max_connections=concurrency
        )
        self.pixel_size, self.pixel_unit, self.overlays = pixel_size, pixel_unit, overlays
        self._pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="nanomorph-client")
        self._info: dict[str, Any] | None = None
        if wait_ready > 0:
            # Fail fast, before any file is tried: unreachable server, wrong token, no such model.
            try:
                self.client.wait_ready(timeout=wait_ready, interval=0.5)
                self.info()
            except NanomorphError as exc:
                self.close()
                hint = " (is `nanomorph serve` running there?)" if exc.status is None else ""
                raise ValueError(f"{url}: {exc.message or exc}{hint}") from exc
        self.describe = f"server {url}"

    def info(self) -> dict[str, Any]:
        """This task's ``/models`` entry (tag, classes, contract), fetched once."""
        if self._info is None:
            from nanomorph.client import NanomorphError

            info = self.client.model_info(self.task)
            if not info.get("available"):
                raise NanomorphError(
                    f"the server has no {self.task} model loaded: {info.get('error')}",
                    reason="model_unavailable",
                )
            self._info = info
        return self._info

    def card(self) -> dict[str, Any]:
        """The model card's key numbers (``model.json``), from the server's ``/models``."""
        info = self.info()
        return report.model_card(
            info["tag"],
            self.task,
            info.get("classes") or [],
            info.get("sha256"),
            info.get("metrics"),
            info.get("ood_threshold"),
        )

    def process(self, items: Sequence[Item]) -> list[Outcome]:
        """Processes a chunk of files concurrently; results come back in input order."""
        return list(self._pool.map(self._one, items))

    def _one(self, item: Item) -> Outcome:
        from nanomorph.client import NanomorphError

        try:
            data = item.path.read_bytes()
            upload = (item.rel, data)  # the server names it in its error messages
            info = self.info()
            if self.task == "classify":
                r = self.client.classify([upload])[0]
                return Outcome(item.rel, classify_row(item.rel, r.get("model") or info["tag"], r["shape"], r))
            if self.task == "embed":
                r = self.client.embed([upload])[0]
                return embed_outcome(item.rel, info["tag"], r["shape"], r["embedding"])
            body = self.client.segment(
                upload, pixel_size=self.pixel_size, pixel_unit=self.pixel_unit or "nm", particles=True
            )
        except (NanomorphError, OSError) as exc:
            return failure(item.rel, exc)
        mask = body["mask"]
        classes = [e["name"] for e in sorted(body["legend"], key=lambda e: e["index"])]
        size, unit = body.get("pixel_size"), body.get("pixel_unit")
        over = None
        if self.overlays:
            try:  # the overlay needs the pixels here too: decoded with the same contract reader
                image, _ = read_image(data, name=item.rel)
                contract = Contract.from_dict(info["contract"])
                over = overlay_png(image, contract, mask, classes, size, unit)
            except (ImageReadError, ValueError) as exc:
                log.warning("%s: no overlay (%s)", item.rel, exc)
        morphology = body.get("morphology") or {}
        return segment_outcome(
            item.rel,
            body["model"],
            classes,
            mask,
            size,
            unit,
            morphology,
            over,
            stem=item.stem,
            particles=(body["particles"], body["particle_summary"])
            if body.get("particles") is not None
            else None,
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()


Backend = LocalBackend | RemoteBackend


# ----------------------------------------------------------------------------------------- writer


def file_signature(path: Path) -> tuple[int, int]:
    st = path.stat()
    return int(st.st_size), int(st.st_mtime_ns)


def flatten(row: dict[str, Any]) -> dict[str, Any]:
    """One CSV row: nested dicts become dotted columns (morphology without its ``summary.``/
    ``classes.`` level, e.g. ``wire.area_fraction``), lists become JSON, None an empty cell."""
    out: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
            return
        for strip in ("morphology.summary.", "morphology.classes."):
            if prefix.startswith(strip):
                prefix = prefix[len(strip) :]
                break
        if isinstance(value, list):
            value = json.dumps(value)
        out[prefix] = "" if value is None else value

    walk("", row)
    return out


class ResultWriter:
    """Appends results to ``OUT/results.jsonl`` (each row flushed when its files are in place),
    keeps ``errors.csv`` current and rewrites ``results.csv`` on :meth:`close`.

    Args:
        out_dir: the output folder (created).
        task: the task; a folder holding results of another task is refused.

    Raises:
        ValueError: ``out_dir`` holds results of another task.
    """

    def __init__(self, out_dir: str | Path, task: str) -> None:
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.task = task
        self.jsonl = self.out / RESULTS_JSONL
        self._lock = threading.Lock()
        self.done: set[str] = set()
        for row in self._read_rows(repair=True):
            if row.get("task", task) != task:
                raise ValueError(
                    f"{self.jsonl} holds {row.get('task')} results; use another --out for --task {task}"
                )
            self.done.add(str(row["path"]))
        self.errors: dict[str, dict[str, str]] = self._read_errors()
        self._fh = open(self.jsonl, "a", encoding="utf-8")  # noqa: SIM115 - open for the writer's life

    def _read_rows(self, repair: bool = False) -> list[dict[str, Any]]:
        if not self.jsonl.is_file():
            return []
        data = self.jsonl.read_bytes()
        if repair and data and not data.endswith(b"\n"):
            # A run killed mid-line: drop the partial line so appended rows stay valid JSON lines.
            keep = data.rfind(b"\n") + 1
            log.warning("%s: dropping an incomplete last line (interrupted run)", self.jsonl)
            with open(self.jsonl, "r+b") as fh:
                fh.truncate(keep)
            data = data[:keep]
        rows = []
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{self.jsonl}: line {n} is not JSON ({exc.msg})") from None
        return rows

    def _read_errors(self) -> dict[str, dict[str, str]]:
        path = self.out / ERRORS_CSV
        if not path.is_file():
            return {}
        with open(path, newline="", encoding="utf-8") as fh:
            return {r["path"]: dict(r) for r in csv.DictReader(fh) if r.get("path")}

    def _write_errors(self) -> None:
        path = self.out / ERRORS_CSV
        if not self.errors and not path.exists():
            return
        buf = io.StringIO()
        writer = csv.DictWriter(
            buf, fieldnames=list(ERROR_COLUMNS), extrasaction="ignore", lineterminator="\n"
        )
        writer.writeheader()
        for rel in sorted(self.errors):
            writer.writerow(self.errors[rel])
        atomic_write_text(path, buf.getvalue())

    def known_failure(self, item: Item) -> bool:
        """True when ``item`` failed for its content before and has not changed since."""
        err = self.errors.get(item.rel)
        if (
            err is None
            or err.get("reason") in TRANSIENT_REASONS
            or str(err.get("reason", "")).startswith("http_5")
        ):
            return False
        try:
            size, mtime = file_signature(item.path)
        except OSError:
            return False
        return err.get("size") == str(size) and err.get("mtime_ns") == str(mtime)

    def add(self, outcome: Outcome, item: Item) -> None:
        """Records one outcome: files first, then the row (so a row never points at a missing file)."""
        with self._lock:
            if outcome.ok:
                for rel_file, data in outcome.files.items():
                    atomic_write_bytes(self.out / rel_file, data)
                self._fh.write(json.dumps(outcome.row, ensure_ascii=False) + "\n")
                self._fh.flush()
                os.fsync(self._fh.fileno())
                self.done.add(outcome.rel)
                if self.errors.pop(outcome.rel, None) is not None:
                    self._write_errors()
                return
            try:
                size, mtime = file_signature(item.path)
            except OSError:
                size, mtime = -1, -1
            self.errors[outcome.rel] = {
                "path": outcome.rel,
                "reason": outcome.reason,
                "message": outcome.message,
                "size": str(size),
                "mtime_ns": str(mtime),
            }
            self._write_errors()

    def write_csv(self) -> Path:
        """Rewrites ``results.csv`` from ``results.jsonl`` (sorted by path, union of columns)."""
        rows = sorted((flatten(r) for r in self._read_rows()), key=lambda r: str(r.get("path", "")))
        columns: dict[str, None] = {}
        for r in rows:
            columns.update(dict.fromkeys(r))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(columns), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        path = self.out / RESULTS_CSV
        atomic_write_text(path, buf.getvalue())
        if self.task == "segment":  # particles.csv + particles.png, rebuilt like results.csv
            from nanomorph.particles import write_batch

            write_batch(self.out, [str(r["particles_file"]) for r in rows if r.get("particles_file")])
        return path

    def close(self) -> None:
        with self._lock:
            if not self._fh.closed:
                self._fh.close()
            self.write_csv()


# ----------------------------------------------------------------------------------------- running


def _chunks(items: Sequence[Item], size: int) -> Iterator[Sequence[Item]]:
    for start in range(0, len(items), max(1, size)):
        yield items[start : start + size]


def list_items(input_dir: Path, out_dir: Path, recursive: bool = True) -> list[Item]:
    """Every file under ``input_dir``, sorted: images, and files that will be reported as not read
    (``supported=False``). Left out: hidden files, companions read with an image (TIA ``.emi``),
    and the pipeline's own outputs, should OUT lie inside."""
    out = out_dir.resolve()
    found = []
    for path in list_files(input_dir, recursive=recursive):
        if out in path.resolve().parents or is_companion(path):
            continue
        found.append((path, path.relative_to(input_dir).as_posix()))
    stems = outputs.output_stems([rel for _, rel in found])
    return [Item(path, rel, stems[rel], is_supported(path)) for path, rel in found]


def unsupported(item: Item) -> Outcome:
    """The error row of a file nanomorph does not read (by its suffix): listed, never dropped."""
    suffix = item.path.suffix.lower() or "(no suffix)"
    message = (
        f"{item.rel}: {suffix} is not a supported image format (supported: {' '.join(SUPPORTED_SUFFIXES)})"
    )
    return Outcome(item.rel, reason="unsupported_format", message=message)


@dataclass
class Tally:
    ok: int = 0
    failed: int = 0
    transient: int = 0


def process_items(
    items: Sequence[Item],
    backend: Backend,
    writer: ResultWriter,
    chunk: int,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    on_outcome: Callable[[Item, Outcome], None] | None = None,
) -> Tally:
    """Runs ``items`` through ``backend`` in chunks, recording every outcome."""
    tally = Tally()
    by_rel = {it.rel: it for it in items}
    for group in _chunks(items, chunk):
        if stop is not None and stop.is_set():
            break
        images = [it for it in group if it.supported]
        found = [unsupported(it) for it in group if not it.supported]
        for outcome in found + (backend.process(images) if images else []):
            item = by_rel[outcome.rel]
            if outcome.ok:
                tally.ok += 1
            elif outcome.transient:
                tally.transient += 1
                log.warning("%s: %s (%s); will be retried", outcome.rel, outcome.message, outcome.reason)
            else:
                tally.failed += 1
                log.warning("%s: %s (%s)", outcome.rel, outcome.message, outcome.reason)
            writer.add(outcome, item)
            if on_outcome is not None:
                on_outcome(item, outcome)
            if progress is not None:
                progress.update()
    return tally


def make_backend(args: argparse.Namespace, remote: bool) -> Backend:
    if remote:
        return RemoteBackend(
            args.task,
            args.url,
            token=args.token,
            concurrency=args.concurrency,
            timeout=args.timeout,
            retries=args.retries,
            pixel_size=args.pixel_size,
            pixel_unit=args.pixel_unit,
            overlays=not args.no_overlays,
            wait_ready=getattr(args, "wait", 0.0) or 0.0,
        )
    from nanomorph.store import default_store

    providers = [p.strip() for p in (args.providers or "").split(",") if p.strip()]
    return LocalBackend(
        args.task,
        args.store or default_store(),
        tag=args.tag,
        providers=providers or None,
        pixel_size=args.pixel_size,
        pixel_unit=args.pixel_unit,
        overlays=not args.no_overlays,
        threads=getattr(args, "threads", 0) or 0,
        precision=getattr(args, "precision", None),
    )


def _write_card(backend: Backend, out: Path) -> None:
    try:
        report.write_model_card(out, backend.card())
    except Exception as exc:  # the card is a convenience: never fail a batch on it
        log.warning("no model.json (%s)", exc)


def _write_report(out: Path) -> None:
    try:
        log.info("report: %s", report.write_report(out))
    except Exception as exc:  # e.g. a disk full: the results themselves are already safe
        log.warning("no report.html (%s)", exc)


def _save_config(args: argparse.Namespace, out: Path) -> None:
    # The token is a secret: never written to disk.
    save_resolved({k: v for k, v in vars(args).items() if k != "token"}, out)


def run_batch(args: argparse.Namespace) -> int:
    """``predict`` and ``client``: every image under INPUT_DIR not done yet, then exit.

    Returns:
        0 when something was processed or nothing was left to do; 1 when images were tried and
        none could be processed.
    """
    input_dir, out = Path(args.input_dir), Path(args.out)
    items = list_items(input_dir, out, recursive=not args.no_recursive)
    if not items:
        log.error("no files under %s", input_dir)
        return 1
    shard = shards.parse_shard(getattr(args, "shard", None))
    if shard is not None:
        items = shards.select(items, *shard)
        out = shards.shard_dir(out, *shard)
        log.info("shard %d/%d: %d files; results in %s", *shard, len(items), out)
    writer = ResultWriter(out, args.task)
    todo = [
        it
        for it in items
        if it.rel not in writer.done and (args.retry_errors or not writer.known_failure(it))
    ]
    skipped = len(items) - len(todo)
    _save_config(args, out)
    if not todo:
        writer.close()
        _write_report(out)
        log.info("nothing new: all %d images under %s are done (results in %s)", len(items), input_dir, out)
        return 0
    backend = make_backend(args, remote=args.command == "client")
    _write_card(backend, out)
    log.info(
        "%s: %d images to do, %d already done; using %s", args.task, len(todo), skipped, backend.describe
    )
    progress = Progress(len(todo), args.task)
    t0 = time.perf_counter()
    try:
        tally = process_items(
            todo,
            backend,
            writer,
            chunk=max(args.batch_size, 2 * getattr(args, "concurrency", 1)),
            progress=progress,
        )
    finally:
        progress.close()
        backend.close()
        writer.close()
        _write_report(out)
    seconds = time.perf_counter() - t0
    log.info(
        "done: %d processed, %d failed, %d to retry in %.1f s (%.1f img/s); results in %s",
        tally.ok,
        tally.failed,
        tally.transient,
        seconds,
        tally.ok / max(seconds, 1e-9),
        out,
    )
    if tally.failed or tally.transient:
        log.warning("failures are listed in %s", out / ERRORS_CSV)
    return 0 if tally.ok else 1


# ------------------------------------------------------------------------------------------- watch


class WatchState:
    """``OUT/watch_state.json``: files handled, with the size and mtime they had (atomic writes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.files: dict[str, dict[str, Any]] = {}
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
                self.files = dict(data.get("files", {}))
            except (ValueError, AttributeError) as exc:
                raise ValueError(f"{path}: not a nanomorph watch state file ({exc})") from None

    def mark(self, item: Item, outcome: Outcome, signature: tuple[int, int]) -> None:
        self.files[item.rel] = {
            "size": signature[0],
            "mtime_ns": signature[1],
            "status": "ok" if outcome.ok else "error",
        }

    def handled(self, rel: str, signature: tuple[int, int]) -> bool:
        entry = self.files.get(rel)
        if entry is None:
            return False
        # An error is retried once the file changes (e.g. it was still being copied).
        return entry.get("status") == "ok" or (entry.get("size"), entry.get("mtime_ns")) == signature

    def save(self) -> None:
        atomic_write_text(
            self.path, json.dumps({"version": 1, "files": self.files}, indent=1, sort_keys=True)
        )


class StabilityTracker:
    """A file is complete once its size and mtime are unchanged across two scans and either
    ``stable_seconds`` passed since they last changed or its mtime is that old already."""

    def __init__(self, stable_seconds: float) -> None:
        self.stable_seconds = stable_seconds
        self.seen: dict[str, tuple[tuple[int, int], float]] = {}

    def ready(self, rel: str, signature: tuple[int, int], now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        previous = self.seen.get(rel)
        if previous is None or previous[0] != signature:
            self.seen[rel] = (signature, now)
            return False
        age = time.time() - signature[1] / 1e9
        return now - previous[1] >= self.stable_seconds or age >= self.stable_seconds

    def forget(self, rel: str) -> None:
        self.seen.pop(rel, None)


@contextlib.contextmanager
def _stop_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT / SIGTERM set ``stop`` (the current file is finished first) instead of killing the
    process; the previous handlers come back afterwards. Signals reach only the main thread."""
    previous: dict[signal.Signals, Any] = {}

    def on_signal(signum: int, frame: Any) -> None:
        log.info("stopping after the current file (signal %d)", signum)
        stop.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@dataclass
class _WatchSession:
    """What one ``watch`` keeps between scans of its folder."""

    input_dir: Path
    out: Path
    recursive: bool
    writer: ResultWriter
    state: WatchState
    tracker: StabilityTracker

    def scan(self) -> tuple[list[Item], int]:
        """``(files completely written and not handled yet, number still being written)``."""
        ready: list[Item] = []
        pending = 0
        for item in list_items(self.input_dir, self.out, recursive=self.recursive):
            if item.rel in self.writer.done:
                continue
            try:
                signature = file_signature(item.path)
            except OSError:
                continue  # removed meanwhile
            if self.state.handled(item.rel, signature) or self.writer.known_failure(item):
                continue
            if self.tracker.ready(item.rel, signature):
                ready.append(item)
            else:
                pending += 1
        return ready, pending

    def record(self, item: Item, outcome: Outcome) -> None:
        """Marks a file handled in the state file, unless its failure was transient (then a later
        scan tries it again)."""
        self.tracker.forget(item.rel)
        if outcome.transient:
            return
        try:
            self.state.mark(item, outcome, file_signature(item.path))
        except OSError:
            self.state.mark(item, outcome, (-1, -1))
        self.state.save()
        if outcome.ok:
            log.info("%s: done", item.rel)


def _check_watch_args(args: argparse.Namespace) -> None:
    if bool(args.url) == bool(args.store):
        raise ValueError("give exactly one of --url (through a server) or --store (in-process)")
    if not Path(args.input_dir).is_dir():
        raise FileNotFoundError(f"{Path(args.input_dir)}: no such folder")
    if args.interval <= 0 or args.stable_seconds < 0:
        raise ValueError("--interval must be > 0 and --stable-seconds >= 0")


def run_watch(args: argparse.Namespace) -> int:
    """``watch``: processes each new file once it is completely written, until Ctrl-C / SIGTERM
    (or, with ``--once``, until every file present is done)."""
    _check_watch_args(args)
    input_dir, out = Path(args.input_dir), Path(args.out)
    writer = ResultWriter(out, args.task)
    state = WatchState(out / STATE_FILE)
    _save_config(args, out)
    backend = make_backend(args, remote=bool(args.url))
    _write_card(backend, out)
    session = _WatchSession(
        input_dir, out, not args.no_recursive, writer, state, StabilityTracker(args.stable_seconds)
    )
    stop = threading.Event()
    log.info("watching %s for %s with %s; results in %s", input_dir, args.task, backend.describe, out)
    total = Tally()
    retry = 0
    try:
        with _stop_on_signals(stop):
            while not stop.is_set():
                ready, pending = session.scan()
                if ready:
                    tally = process_items(
                        ready, backend, writer, chunk=args.batch_size, stop=stop, on_outcome=session.record
                    )
                    total.ok += tally.ok
                    total.failed += tally.failed
                    total.transient += tally.transient
                    writer.write_csv()
                    _write_report(out)  # kept current for whoever opens it during the session
                    retry = tally.transient
                    if not args.once:
                        pending += tally.transient
                if args.once and not pending:
                    break
                stop.wait(args.interval)
    finally:
        backend.close()
        writer.close()
        state.save()
        _write_report(out)
    log.info("watch stopped: %d processed, %d failed", total.ok, total.failed)
    if args.once and retry:
        log.error("%d file(s) could not be processed for now (server unavailable?); run again", retry)
        return 1
    return 0


# ----------------------------------------------------------------------------------------- the command


def run(args: argparse.Namespace) -> int:
    if args.task not in TASKS:
        raise ValueError(f"--task must be one of {', '.join(TASKS)}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.pixel_size is not None and not args.pixel_size > 0:
        raise ValueError(f"--pixel-size must be > 0, got {args.pixel_size}")
    for attr in ("concurrency",):
        if getattr(args, attr, 1) < 1:
            raise ValueError(f"--{attr} must be >= 1")
    shards.parse_shard(getattr(args, "shard", None))  # a bad --shard fails before any work
    if args.command == "watch":
        return run_watch(args)
    return run_batch(args)
