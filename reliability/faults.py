"""Fault injection: a killed serving worker, a corrupted model file, killed training jobs.

* :func:`kill_worker_under_load`: ``kill -9`` the BentoML worker while ``/classify`` load runs,
  then measure how long until ``/readyz`` is 200 again (from a *new* worker) and how many
  requests failed meanwhile.
* :func:`corrupt_model_start`: flip one byte of ``model.onnx`` in a folder store and start a server
  that requires that model: it must refuse the model with a log line naming the sha256 mismatch,
  stay not-ready (``/readyz`` 503, ``/classify`` 503 ``model_unavailable``), and neither exit nor
  restart its worker in a loop that would bury that line.
* :func:`pretrain_kill_resume` / :func:`study_kill_resume`: ``kill -9`` a ``nanomorph pretrain`` /
  ``nanomorph study cls`` mid-run, resume it, and check that nothing finished before the kill was
  lost (pretrain: epoch records and the checkpoint carry on; study: every ``results.csv`` row
  written before the kill is in the final file, unchanged).

Everything runs on 127.0.0.1 and in scratch folders, bounded in time.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from reliability.load import LoadReport, run_client_load, run_load, worker_pids
from tests.fixtures.images import write_disc_frames as write_unlabeled
from tests.fixtures.images import write_shapes


def _get(url: str, timeout: float = 2.0) -> int | None:
    try:
        return httpx.get(url, timeout=timeout).status_code
    except httpx.HTTPError:
        return None


# ------------------------------------------------------------------------------- worker kill


@dataclass
class WorkerKillReport:
    killed_pid: int
    new_pid: int | None
    seconds_to_ready: float | None
    seconds_unready: float | None
    failed_during: int
    load: dict[str, Any]
    served_after: bool
    client: str = "httpx"

    def to_dict(self) -> dict[str, Any]:
        return {
            "client": self.client,
            "killed_pid": self.killed_pid,
            "new_pid": self.new_pid,
            "seconds_to_ready": None if self.seconds_to_ready is None else round(self.seconds_to_ready, 2),
            "seconds_unready": None if self.seconds_unready is None else round(self.seconds_unready, 2),
            "failed_during": self.failed_during,
            "served_after": self.served_after,
            "load": self.load,
        }


def kill_worker_under_load(
    url: str,
    server_pid: int,
    *,
    n_requests: int = 3000,
    concurrency: int = 8,
    warm_s: float = 2.0,
    recover_timeout_s: float = 120.0,
    client: bool = False,
) -> WorkerKillReport:
    """Kills the serving worker with SIGKILL while load runs and measures the recovery.

    Args:
        url: server base URL.
        server_pid: PID of the server's top process (its worker is found among its descendants).
        n_requests: the load's bound on requests (it is stopped once the server has recovered).
        concurrency: concurrent clients of the load.
        warm_s: seconds of load before the kill.
        recover_timeout_s: give up waiting for ``/readyz`` after this long.
        client: send the load through :class:`nanomorph.client.NanomorphClient` (with its retries)
            instead of plain httpx requests that are never retried.

    Returns:
        Time from the kill until ``/readyz`` answered 200 from a new worker, time ``/readyz`` was
        not 200, requests that failed from the kill until recovery, and the load's figures.
    """
    workers = worker_pids(server_pid)
    if not workers:
        raise RuntimeError(f"no BentoML worker found below PID {server_pid}")
    stop = threading.Event()
    box: dict[str, LoadReport] = {}

    def load() -> None:
        if client:
            box["r"] = run_client_load(url, n_requests, concurrency, stop=stop, timeout=30.0)
        else:
            box["r"] = run_load(url, n_requests, concurrency, stop=stop, timeout=30.0)

    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    time.sleep(warm_s)
    victim = workers[0]
    t_kill = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    unready_since: float | None = None
    seconds_to_ready = None
    new_pid = None
    while time.monotonic() - t_kill < recover_timeout_s:
        status = _get(url + "/readyz", timeout=2.0)
        now = time.monotonic()
        if status != 200 and unready_since is None:
            unready_since = now
        alive = [p for p in worker_pids(server_pid) if p != victim]
        if status == 200 and alive and now - t_kill > 0.2:
            seconds_to_ready = now - t_kill
            new_pid = alive[0]
            break
        time.sleep(0.05)
    t_ready = time.monotonic()
    time.sleep(5.0 if client else 1.0)  # let requests in flight (or retrying) at recovery finish
    stop.set()
    thread.join(timeout=120)
    load = box.get("r", LoadReport())
    # A client gives up only after its retries: count its failures until the end of the run.
    failed_during = sum(
        1 for t in load.failure_times if t_kill <= t <= (math.inf if client else t_ready + 1.0)
    )
    served_after = False
    try:
        from reliability.load import payloads

        r = httpx.post(
            url + "/classify", files=[("images", ("after.png", payloads(1)[0], "image/png"))], timeout=30
        )
        served_after = r.status_code == 200
    except httpx.HTTPError:
        pass
    return WorkerKillReport(
        killed_pid=victim,
        new_pid=new_pid,
        seconds_to_ready=seconds_to_ready,
        seconds_unready=None if unready_since is None else t_ready - unready_since,
        failed_during=failed_during,
        load=load.to_dict(),
        served_after=served_after,
        client="nanomorph.client" if client else "httpx",
    )


# ------------------------------------------------------------------------------- recycling


def recycle_under_load(
    workdir: Path, *, every: int = 300, n_requests: int = 1500, concurrency: int = 8, client: bool = True
) -> dict[str, Any]:
    """Starts a server that recycles its worker every ~``every`` requests and loads it through
    :class:`nanomorph.client.NanomorphClient` (``client=False``: plain httpx requests, never
    retried, to see what the drain alone achieves); counts recycles, new workers and failed requests.

    Returns:
        ``recycle_every``, ``recycles_logged`` (the workers' "recycling this worker" lines),
        ``worker_pids_seen``, the load's figures, ``served_after`` and ``ok`` (at least one recycle
        and no failed request).
    """
    from reliability.load import payloads
    from tests.fixtures.server import start_server
    from tests.fixtures.tiny_models import build_tiny_store

    store = workdir / "store"
    build_tiny_store(store)
    server = start_server(workdir, store=store, env={"NANOMORPH_RECYCLE_REQUESTS": str(every)})
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.1):
            for pid in worker_pids(server.proc.pid):
                if pid not in seen:
                    seen.append(pid)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        if client:
            load = run_client_load(server.url, n_requests, concurrency, timeout=30.0)
        else:
            load = run_load(server.url, n_requests, concurrency, timeout=30.0)
        done.set()
        watcher.join()
        server.wait_ready(120)
        r = httpx.post(
            server.url + "/classify",
            files=[("images", ("after.png", payloads(1)[0], "image/png"))],
            timeout=30,
        )
        served_after = r.status_code == 200
        log = server.log(tail=50_000_000)
    finally:
        done.set()
        server.stop()
    recycles = sum(1 for line in log.splitlines() if "recycling this worker" in line)
    return {
        "client": "nanomorph.client" if client else "httpx",
        "recycle_every": every,
        "recycles_logged": recycles,
        "worker_pids_seen": len(seen),
        "load": load.to_dict(),
        "served_after": served_after,
        "ok": bool(recycles >= 1 and load.failed == 0 and not load.stopped_early and served_after),
    }


# ------------------------------------------------------------------------------- corrupt model


def flip_byte(path: Path, offset: int | None = None) -> int:
    """Flips every bit of one byte of ``path`` (default: the middle one); returns the offset."""
    data = bytearray(path.read_bytes())
    pos = len(data) // 2 if offset is None else offset
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    return pos


@dataclass
class CorruptModelReport:
    flipped: str
    offset: int
    observed_s: float
    readyz: list[int | None] = field(default_factory=list)
    classify_status: int | None = None
    classify_reason: str | None = None
    refusal_lines: list[str] = field(default_factory=list)
    worker_pids_seen: list[int] = field(default_factory=list)
    server_alive: bool = False

    @property
    def never_ready(self) -> bool:
        return bool(self.readyz) and all(s != 200 for s in self.readyz)

    @property
    def worker_restarts(self) -> int:
        return max(0, len(self.worker_pids_seen) - 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "flipped": self.flipped,
            "offset": self.offset,
            "observed_s": round(self.observed_s, 1),
            "readyz_statuses": sorted({str(s) for s in self.readyz}),
            "never_ready": self.never_ready,
            "classify_status": self.classify_status,
            "classify_reason": self.classify_reason,
            "refusal_lines": self.refusal_lines[:5],
            "refusal_line_count": len(self.refusal_lines),
            "worker_restarts": self.worker_restarts,
            "server_alive": self.server_alive,
        }


def corrupt_model_start(workdir: Path, *, observe_s: float = 15.0) -> CorruptModelReport:
    """Starts a server on a store whose classify ``model.onnx`` has one byte flipped.

    The server requires the classify model (``NANOMORPH_REQUIRE_MODELS=classify``), so the broken
    model must keep it not-ready. Observes it for ``observe_s`` seconds.
    """
    from tests.fixtures.server import start_server
    from tests.fixtures.tiny_models import build_tiny_store

    store = workdir / "store"
    tags = build_tiny_store(store)
    name, version = tags["classify"].split(":")
    onnx_path = store / name / version / "model.onnx"
    offset = flip_byte(onnx_path)
    server = start_server(
        workdir,
        store=store,
        env={"NANOMORPH_REQUIRE_MODELS": "classify", "NANOMORPH_MODEL_POLL_S": "1"},
        wait=False,
    )
    report = CorruptModelReport(
        flipped=str(onnx_path.relative_to(workdir)), offset=offset, observed_s=observe_s
    )
    try:
        server.wait_listening(timeout=90)
        t0 = time.monotonic()
        while time.monotonic() - t0 < observe_s:
            report.readyz.append(_get(server.url + "/readyz"))
            for pid in worker_pids(server.proc.pid):
                if pid not in report.worker_pids_seen:
                    report.worker_pids_seen.append(pid)
            time.sleep(0.5)
        from reliability.load import payloads

        r = httpx.post(
            server.url + "/classify", files=[("images", ("a.png", payloads(1)[0], "image/png"))], timeout=30
        )
        report.classify_status = r.status_code
        try:
            report.classify_reason = r.json().get("reason")
        except ValueError:
            report.classify_reason = None
        report.server_alive = server.proc.poll() is None
        log = server.log(tail=1_000_000)
        report.refusal_lines = [
            line.strip() for line in log.splitlines() if "cannot load" in line and "classify" in line
        ]
    finally:
        server.stop()
    return report


# ------------------------------------------------------------------------------- training


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "nanomorph.cli", *args]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "NANOMORPH_PLAIN_PROGRESS": "1",
    }


def _epoch_records(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue  # a line cut by the kill
        if rec.get("kind") == "epoch":
            out.append(rec)
    return out


def _kill_when(proc: subprocess.Popen[bytes], ready: Any, timeout: float, what: str) -> float:
    """Polls ``ready()``; SIGKILLs ``proc`` as soon as it is true; returns seconds until the kill."""
    t0 = time.monotonic()
    while not ready():
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace")[-2000:] if proc.stderr else ""
            raise RuntimeError(f"{what} ended (exit {proc.returncode}) before it could be killed:\n{err}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            proc.wait(timeout=30)
            raise TimeoutError(f"{what}: nothing to kill for after {timeout:.0f} s")
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # no chance to clean up: like a power cut or an OOM kill
    proc.wait(timeout=30)
    return time.monotonic() - t0


TINY_PRETRAIN = ["--backbone", "test_resnet", "--image-size", "32", "--batch-size", "8", "--workers", "0"]


def pretrain_kill_resume(workdir: Path, *, epochs: int = 4, timeout: float = 600.0) -> dict[str, Any]:
    """Kills ``nanomorph pretrain`` after its first finished epoch and resumes it.

    Returns:
        ``killed_after_epoch``, the epochs recorded before the kill and after the resume, whether
        every pre-kill epoch record survived unchanged, the final checkpoint epoch, and ``ok``.
    """
    data = write_unlabeled(workdir / "unlabeled")
    out = workdir / "pretrain"
    cmd = _cli("pretrain", "--data", str(data), "--out", str(out), *TINY_PRETRAIN)
    cmd += ["--epochs", str(epochs), "--crops-per-image", "4", "--method", "simclr", "--log-every", "2"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_s = _kill_when(proc, lambda: (out / "checkpoint.pt").exists(), timeout, "pretrain")
    before = _epoch_records(out / "metrics.jsonl")
    resumed = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=timeout)
    after = _epoch_records(out / "metrics.jsonl")
    kept = all(any(a == b for a in after) for b in before)
    result = {
        "killed_after_s": round(killed_s, 1),
        "epochs_before_kill": [r["epoch"] for r in before],
        "epochs_after_resume": [r["epoch"] for r in after],
        "pre_kill_records_kept": kept,
        "resume_exit": resumed.returncode,
        "resume_message": next(
            (ln.split(": ", 1)[-1] for ln in resumed.stderr.splitlines() if "resuming" in ln), None
        ),
        "backbone_written": (out / "backbone.safetensors").is_file(),
        "seconds": round(time.monotonic() - t0, 1),
    }
    result["ok"] = bool(
        resumed.returncode == 0
        and [r["epoch"] for r in after] == list(range(1, epochs + 1))
        and kept
        and result["backbone_written"]
    )
    if resumed.returncode != 0:
        result["stderr"] = resumed.stderr[-1500:]
    return result


def _csv_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as fh:
        text = fh.read()
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines = lines[:-1]  # the kill may cut the last line: it was not finished
    return list(csv.DictReader(lines))


def study_kill_resume(
    workdir: Path, encoder: Path | None = None, *, timeout: float = 900.0
) -> dict[str, Any]:
    """Kills ``nanomorph study cls`` once some cells are in ``results.csv`` and resumes it.

    Args:
        workdir: scratch folder.
        encoder: a ``backbone.safetensors`` (e.g. from :func:`pretrain_kill_resume`); without one
            the study runs the scratch baseline only (``--arch test_resnet``).
        timeout: seconds for each of the two runs.

    Returns:
        Rows before the kill, rows after the resume, whether every pre-kill row is in the final
        file unchanged, the resume's "finished already" line, and ``ok``.
    """
    data = write_shapes(workdir / "classification", n_per_class=7)
    out = workdir / "study"
    args = ["study", "cls", "--data", str(data), "--labels-per-class", "1,2,all", "--repeats", "2"]
    args += ["--modes", "linear,finetune", "--steps", "2", "--scratch-steps", "2", "--eval-every", "1"]
    args += ["--batch-size", "4", "--out", str(out)]
    if encoder is not None:
        args += ["--encoders", f"ssl={encoder}"]
    else:
        args += ["--arch", "test_resnet", "--image-size", "32"]
    cmd = _cli(*args)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    killed_s = _kill_when(proc, lambda: len(_csv_rows(out / "results.csv")) >= 3, timeout, "study")
    before = _csv_rows(out / "results.csv")
    resumed = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    after = _csv_rows(out / "results.csv")
    keys = ("encoder", "mode", "labels", "repeat")
    after_by_key = {tuple(r.get(k) for k in keys): r for r in after}
    kept = all(after_by_key.get(tuple(b.get(k) for k in keys)) == b for b in before)
    cells = len(after_by_key)
    result = {
        "killed_after_s": round(killed_s, 1),
        "rows_before_kill": len(before),
        "rows_after_resume": len(after),
        "distinct_cells": cells,
        "duplicate_rows": len(after) - cells,
        "pre_kill_rows_kept": kept,
        "resume_exit": resumed.returncode,
        "resume_message": next(
            (ln.split(": ", 1)[-1] for ln in resumed.stderr.splitlines() if "finished already" in ln), None
        ),
        "seconds": round(time.monotonic() - t0, 1),
    }
    expected = (2 if encoder is not None else 1) * 2 * 3 * 2  # encoders x modes x label counts x repeats
    result["expected_cells"] = expected
    result["ok"] = bool(resumed.returncode == 0 and kept and cells == expected and len(after) == cells)
    if resumed.returncode != 0:
        result["stderr"] = resumed.stderr[-1500:]
    return result
