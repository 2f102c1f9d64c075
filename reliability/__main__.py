"""``python -m reliability`` (``make reliability``): fuzz, load, soak and fault-inject a real server.

Runs, in order, against servers it starts itself on 127.0.0.1 with tiny ONNX models
(``tests.fixtures.tiny_models``; no torch in the service):

1. hostile uploads (:mod:`reliability.hostile`) and schemathesis over ``/docs.json``;
2. load/soak: ``/classify`` requests at 32 concurrent clients, RSS before/after;
3. faults: ``kill -9`` of the serving worker under load; a start with a corrupted model file;
   ``nanomorph pretrain`` and ``nanomorph study`` killed mid-run and resumed;
4. restarts: the worker killed under load and recycled under load (``NANOMORPH_RECYCLE_REQUESTS``),
   both loaded through the project's own client (``nanomorph.client``, its retries): failed requests.
5. large frames: 8 concurrent 8192 x 8192 ``/segment`` requests (:mod:`reliability.large`), with
   and without ``malloc_trim``: server errors, peak RSS, RSS after the burst.

Writes ``docs/reliability.md`` (figures, date, mode) and ``reliability.json`` in the work folder,
and prints the figures. ``--quick`` is the development mode (fewer requests, same checks).
Exit status 1 when a target is missed (any 5xx, a failed load request, no recovery, ...).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:  # tests.fixtures.* (the shared server starter) live at the root
    sys.path.insert(0, str(REPO_ROOT))

FULL = {
    "hostile": 1200,
    "schemathesis": 100,
    "load": 10_000,
    "kill_load": 3000,
    "recycle_load": 3000,
    "recycle_every": 500,
}
QUICK = {
    "hostile": 300,
    "schemathesis": 15,
    "load": 1000,
    "kill_load": 1000,
    "recycle_load": 1200,
    "recycle_every": 300,
}
PARTS = ("fuzz", "load", "faults", "restarts", "training", "large")


#: Bugs found by the first runs of this harness, with what was changed (kept in the report).
FOUND = (
    "**Concurrent `/segment` requests hung forever** when a small image (below one tile: a 32x32 tile) "
    "and a larger one (64x64 tiles) were queued together: `service.batching.Batcher` concatenated arrays of "
    "different shapes outside its `try`, the exception killed the batcher's task and every request of that "
    "batch waited until the client gave up (9 of 12 concurrent requests in the reproducer). Fixed in "
    "`service/batching.py`: a batch only takes arrays of the first one's item shape, and the concatenation "
    "is inside the error handling. Regression: `test_concurrent_segment_requests_with_different_tile_sizes`.",
    "**500 on float images with values near the float32 limit** (e.g. +-3e38): `nanomorph.contract.normalise` "
    "computed `hi - lo` in float32, which overflowed to inf, so every pixel became NaN and the classifier's "
    "confidence NaN failed the response model. Fixed in `nanomorph/contract/transform.py`: such spans are "
    "rescaled in float64 (no change for any other image).",
    "**500 on `/segment` with `pixel_size=inf` or `1e400`**: the form's `gt=0` let infinity through and "
    "`morphology.measure` raised. Fixed in `service/service.py`: `allow_inf_nan=False` on the field (now 422 "
    "`invalid_field`).",
    "**A multipart body without a boundary, or with a boundary that does not match, got FastAPI's 400 body** "
    '`{"detail": "Missing boundary in multipart."}` instead of the documented `{error, reason}`. Fixed in '
    "`service/service.py`: an exception handler answers every HTTP error in the service's format (400 "
    "`malformed_request`). Regression: `tests/service/test_bad_inputs.py::test_malformed_multipart_is_a_json_400`.",
)

#: Findings left to the service's owners (not server errors).
KNOWN = (
    "**Worker memory grows linearly, ~4.7 KB per request, inside BentoML 1.4.40** (not nanomorph code): "
    "the soak's RSS samples (Load and soak) rise steadily with no plateau; a separate run of 6 x 5,000 `/classify` "
    "requests grew the worker 192 -> 313 MB (+24 MB per 5,000). The same growth (~14 MB per 3,000 requests) "
    "appears for `GET /livez` and `GET /models`, for refused uploads, and on a *bare* BentoML service with "
    "one trivial API (`bentoml serve`, 3 x 3,000 `GET /livez`: +14 MB each, also with "
    "`services.<name>.metrics.enabled=false`), while a plain uvicorn + Starlette app under the same load "
    "stays flat (+0.0 MB). Within the 10% target for 10,000 requests, but unbounded over months: about "
    "400 MB/day at 1 request/s. Upstream report: bentoml/BentoML#4760. Until fixed, let workers recycle "
    "(`NANOMORPH_RECYCLE_REQUESTS` / `NANOMORPH_RECYCLE_RSS_MB`, see Restarts above and docs/deployment.md) or "
    "restart the service periodically, and alert on `process_resident_memory_bytes`.",
    "The OpenAPI document at `/docs.json` declares `openapi: 3.0.2` (BentoML's merged document) but the "
    "FastAPI routes' schemas in it use OpenAPI 3.1 / JSON Schema 2020-12 forms (numeric `exclusiveMinimum`, "
    '`type: null`, `contentMediaType`); strict 3.0 tools reject `/segment` (schemathesis: "Invalid definition '
    '... exclusiveMinimum"). The harness fuzzes it as 3.1.0.',
)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 1) for x in os.getloadavg()]
    except OSError:
        return None


def _say(msg: str) -> None:
    print(f"[reliability {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _upload_endpoints(url: str) -> tuple[str, ...]:
    """The POST endpoints the server's OpenAPI document lists (so new ones get fuzzed too)."""
    import httpx

    doc = httpx.get(url + "/docs.json", timeout=30).json()
    return tuple(p for p, ops in doc.get("paths", {}).items() if "post" in ops)


def _fuzz_and_load(work: Path, sizes: dict[str, int], parts: set[str], results: dict[str, Any]) -> None:
    from reliability import target
    from reliability.fuzz import run_hostile, run_schemathesis
    from reliability.hostile import generate
    from reliability.load import payloads, run_load, tree_rss

    _say("starting the server (tiny models, folder store, similarity index)")
    server = target.start(work)
    results["setup_notes"] = server.setup_notes
    endpoints = _upload_endpoints(server.url)
    try:
        if "fuzz" in parts:
            _say(f"hostile uploads: {sizes['hostile']} cases")
            hostile = run_hostile(
                server.url,
                generate(sizes["hostile"], seed=0, endpoints=endpoints),
                concurrency=4,
                save_dir=work / "failing-cases",
            )
            results["hostile"] = hostile.to_dict()
            _say(f"  by status {dict(hostile.by_status)}; >=500 or no response: {hostile.server_errors}")
            _say(f"schemathesis: up to {sizes['schemathesis']} examples per operation and mode")
            st = run_schemathesis(server.url, max_examples=sizes["schemathesis"])
            results["schemathesis"] = st.to_dict()
            _say(f"  by status {dict(st.by_status)}; >=500 or no response: {st.server_errors}")
        if "load" in parts:
            bodies = payloads()
            _say("load: warm-up (200 requests)")
            rss_cold = tree_rss(server.proc.pid)
            run_load(server.url, 200, 32, bodies=bodies)
            rss_before = tree_rss(server.proc.pid)
            _say(f"load: {sizes['load']} /classify requests at 32 concurrent clients")
            samples: list[tuple[float, float]] = []  # (s since start, RSS MB): growth vs a plateau
            done = threading.Event()

            def sample(t_start: float = time.monotonic()) -> None:
                while not done.wait(5.0):
                    samples.append(
                        (round(time.monotonic() - t_start), round(tree_rss(server.proc.pid) / 2**20, 1))
                    )

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            load = run_load(server.url, sizes["load"], 32, bodies=bodies, time_limit_s=1800)
            done.set()
            sampler.join()
            rss_after = tree_rss(server.proc.pid)
            d = load.to_dict()
            d.update(
                rss_cold_mb=round(rss_cold / 2**20, 1),
                rss_before_mb=round(rss_before / 2**20, 1),
                rss_after_mb=round(rss_after / 2**20, 1),
                rss_growth_pct=round(100 * (rss_after - rss_before) / rss_before, 1) if rss_before else None,
                ready_after=server.ready(),
                rss_samples_mb=samples,
            )
            results["load"] = d
            _say(
                f"  {d['ok']}/{d['requests']} ok, p50 {d['p50_ms']} ms, p99 {d['p99_ms']} ms, "
                f"{d['throughput_rps']} req/s, RSS {d['rss_before_mb']} -> {d['rss_after_mb']} MB"
            )
        if "faults" in parts:
            from reliability.faults import kill_worker_under_load

            _say("fault: kill -9 the serving worker under load")
            kill = kill_worker_under_load(server.url, server.proc.pid, n_requests=sizes["kill_load"])
            results["worker_kill"] = kill.to_dict()
            _say(
                f"  ready again after {kill.seconds_to_ready} s; {kill.failed_during} requests failed meanwhile; "
                f"served after: {kill.served_after}"
            )
    finally:
        log = server.log(tail=50_000_000)
        server.stop()
        (work / "server.log").write_text(log)


def _server_faults(work: Path, results: dict[str, Any]) -> None:
    from reliability.faults import corrupt_model_start

    _say("fault: start with a corrupted model.onnx (required model)")
    rep = corrupt_model_start(work / "corrupt")
    results["corrupt_model"] = rep.to_dict()
    _say(
        f"  never ready: {rep.never_ready}; /classify {rep.classify_status} {rep.classify_reason}; "
        f"refusal lines: {len(rep.refusal_lines)}; worker restarts: {rep.worker_restarts}"
    )


def _restarts(work: Path, sizes: dict[str, int], results: dict[str, Any]) -> None:
    from reliability import target
    from reliability.faults import kill_worker_under_load, recycle_under_load

    _say("restarts: kill -9 the serving worker under load from the project's client")
    server = target.start(work / "restarts")
    try:
        kill = kill_worker_under_load(server.url, server.proc.pid, n_requests=sizes["kill_load"], client=True)
    finally:
        server.stop()
    results["worker_kill_client"] = kill.to_dict()
    _say(
        f"  ready again after {kill.seconds_to_ready} s; {kill.failed_during} requests failed; "
        f"{kill.load.get('retries')} retries; served after: {kill.served_after}"
    )
    every, n = sizes["recycle_every"], sizes["recycle_load"]
    _say(f"restarts: {n} requests from the project's client, worker recycled every ~{every} requests")
    rec = recycle_under_load(work / "recycle", every=every, n_requests=n)
    results["recycle"] = rec
    _say(
        f"  {rec['recycles_logged']} recycles, {rec['worker_pids_seen']} workers seen, "
        f"{rec['load']['failed']} failed of {rec['load']['requests']}; {rec['load'].get('retries')} retries"
    )
    _say(
        "restarts: the same recycling load from plain httpx requests that are never retried (the drain alone)"
    )
    raw = recycle_under_load(work / "recycle-httpx", every=every, n_requests=n, client=False)
    results["recycle_httpx"] = raw
    _say(f"  {raw['recycles_logged']} recycles, {raw['load']['failed']} failed of {raw['load']['requests']}")


def _training_faults(work: Path, results: dict[str, Any]) -> None:
    from reliability.faults import pretrain_kill_resume, study_kill_resume

    _say("fault: kill -9 `nanomorph pretrain` after its first epoch, then --resume")
    pre = pretrain_kill_resume(work / "train")
    results["pretrain_resume"] = pre
    _say(
        f"  epochs before kill {pre['epochs_before_kill']}, after resume {pre['epochs_after_resume']}; ok {pre['ok']}"
    )
    encoder = work / "train" / "pretrain" / "backbone.safetensors"
    _say("fault: kill -9 `nanomorph study cls` after 3 cells, then rerun")
    st = study_kill_resume(work / "train", encoder if encoder.is_file() else None)
    results["study_resume"] = st
    _say(
        f"  rows before kill {st['rows_before_kill']}, after {st['rows_after_resume']} "
        f"of {st['expected_cells']}; pre-kill rows kept {st['pre_kill_rows_kept']}; ok {st['ok']}"
    )


def targets(results: dict[str, Any]) -> list[tuple[str, bool]]:
    """(description, met) for every target the run measured."""
    out: list[tuple[str, bool]] = []
    for key in ("hostile", "schemathesis"):
        if key in results:
            r = results[key]
            out.append((f"{r['label']}: 0 responses >= 500 / no response", r["server_errors"] == 0))
            out.append((f"{r['label']}: server ready afterwards", bool(r["ready_after"])))
    if "hostile" in results:
        out.append(
            (
                "hostile uploads: valid control images all answered 200",
                results["hostile"]["control_refused"] == 0,
            )
        )
    if "load" in results:
        r = results["load"]
        out.append(("load: 0 failed requests", r["failed"] == 0 and not r["stopped_early"]))
        out.append(("load: RSS growth < 10% (after warm-up)", (r["rss_growth_pct"] or 0) < 10))
    if "worker_kill" in results:
        r = results["worker_kill"]
        out.append(
            (
                "worker kill: ready again (new worker) and serving",
                r["seconds_to_ready"] is not None and r["served_after"],
            )
        )
    if "worker_kill_client" in results:
        r = results["worker_kill_client"]
        out.append(
            (
                "worker kill under load, project's client: 0 failed requests, serving again",
                r["failed_during"] == 0 and r["load"]["failed"] == 0 and r["served_after"],
            )
        )
    if "recycle" in results:
        r = results["recycle"]
        out.append(("worker recycled under load, project's client: 0 failed requests", bool(r["ok"])))
    if "corrupt_model" in results:
        r = results["corrupt_model"]
        out.append(
            (
                "corrupted model: refused with a log line, never ready, 503 model_unavailable, no restart loop",
                r["never_ready"]
                and r["refusal_line_count"] >= 1
                and r["classify_reason"] == "model_unavailable"
                and r["worker_restarts"] == 0
                and r["server_alive"],
            )
        )
    for key in ("pretrain_resume", "study_resume"):
        if key in results:
            out.append((f"{key.replace('_', ' ')}: nothing finished lost", bool(results[key]["ok"])))
    out.extend(large_targets(results))
    return out


def large_targets(results: dict[str, Any]) -> list[tuple[str, bool]]:
    """Targets of the large-frames burst; the trim run is the default configuration."""
    r = (results.get("large") or {}).get("trim")
    if not r:
        return []
    n = f"{r['requests']} concurrent {results['large']['side']}^2 /segment"
    return [
        (
            f"large frames: {n}: 0 responses >= 500, all answered 200",
            r["server_errors"] == 0 and r["ok"] == r["requests"],
        ),
        (
            "large frames: peak RSS under RSS before + the pixel budget's memory",
            r["rss_peak_mb"] <= r["rss_before_mb"] + r["budget_mb"],
        ),
        (
            "large frames: RSS after the burst within 10% of before",
            abs(r["rss_after_vs_before_pct"] or 0) <= 10,
        ),
    ]


def render_large(results: dict[str, Any], started: str) -> str:
    """The "## Large frames" section (also rewritten alone by ``--parts large``)."""
    large = results["large"]
    L = [f"{LARGE_SECTION}\n"]
    L.append(
        f"`python -m reliability --parts large` ({started} UTC, load average {results.get('loadavg_start')} at the "
        f"start): {large['trim']['requests']} concurrent `POST /segment?format=png` of one {large['side']} x "
        f"{large['side']} uint16 zlib TIFF ({large['upload_bytes'] / 2**20:.1f} MB), after one warm-up frame, on a "
        "server with the tiny models (per-pixel segment model: the figures are decoding, tiling, stitching, "
        "budget and memory, not a network's compute) and the default configuration except "
        "`NANOMORPH_TIMEOUT_S=3600`. Default pixel budget on this machine: "
        f"{large['trim']['pixel_budget']} pixels = {large['trim']['frames_in_budget']} such frames at once "
        f"(~{large['trim']['budget_mb']} MB at 16 bytes per pixel); the rest wait in line. RSS = the "
        "server's process tree, sampled every 0.25 s.\n"
    )
    L.append("| target | met |\n|---|---|")
    for desc, ok in large_targets(results):
        L.append(f"| {desc} | {'yes' if ok else '**NO**'} |")
    L.append("")
    L.append(
        "| run | statuses | burst (s) | latencies (s) | RSS before (MB) | peak (MB) | after (MB) | after vs before |"
    )
    L.append("|---|---|---|---|---|---|---|---|")
    for key, label in (
        ("trim", "malloc_trim after large requests (default)"),
        ("no_trim", "NANOMORPH_MALLOC_TRIM=0"),
    ):
        r = large.get(key)
        if r:
            counts = ", ".join(f"{s}: {r['statuses'].count(s)}" for s in sorted(set(r["statuses"])))
            L.append(
                f"| {label} | {counts} | {r['seconds']} | {r['latency_s'][0]}-{r['latency_s'][-1]} | "
                f"{r['rss_before_mb']} | {r['rss_peak_mb']} | {r['rss_after_mb']} | {r['rss_after_vs_before_pct']}% |"
            )
    L.append("")
    return "\n".join(L)


LARGE_SECTION = "## Large frames (burst)"


def _table(counter: dict[str, int]) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(counter.items())) or "-"


def _outcome(run: dict[str, Any]) -> str:
    """What a run of generated requests (hostile uploads, schemathesis) got back, in one sentence."""
    return (
        f"Responses by status: {_table(run['by_status'])}. >= 500 or no response: **{run['server_errors']}**; "
        f"ready afterwards: {run['ready_after']}"
    )


def _by_kind(header: str, by_kind: dict[str, dict[str, int]]) -> list[str]:
    """A markdown table of responses by status, one row per kind of request."""
    return [
        f"| {header} | responses by status |\n|---|---|",
        *(f"| {k} | {_table(c)} |" for k, c in by_kind.items()),
        "",
    ]


def _intro(results: dict[str, Any], mode: str, started: str, seconds: float) -> list[str]:
    L = ["# Reliability: hostile input, load and faults\n"]
    L.append(
        f"Generated by `make reliability` (`python -m reliability{' --quick' if mode == 'quick' else ''}`) on "
        f"{started} UTC in **{mode}** mode; the run took {seconds / 60:.1f} min. Machine: {os.cpu_count()} CPU cores "
        f"shared with other work (load average 1/5/15 min {results.get('loadavg_start')} at the start, "
        f"{results.get('loadavg_end')} at the end), {platform.python_implementation()} "
        f"{platform.python_version()}, no GPU. "
        "All traffic went to servers the harness started on 127.0.0.1 (`tests/fixtures/server.py`), serving "
        "the tiny ONNX models of `tests/fixtures/tiny_models.py` from a folder store: the figures measure the "
        "service (decode, guard, batching, HTTP), not a real network's inference time.\n"
    )
    L.append("## Targets\n")
    L.append("| target | met |\n|---|---|")
    for desc, ok in targets(results):
        L.append(f"| {desc} | {'yes' if ok else '**NO**'} |")
    L.append("")
    return L


def _generated_requests(title: str, run: dict[str, Any], what: str, extras: str, kind: str) -> list[str]:
    """The section of a run of generated requests (hostile uploads, schemathesis): what was sent,
    what came back, and the responses by kind of request."""
    return [
        f"## {title}\n",
        f"{run['requests']} {what}, {run['seconds']} s. {_outcome(run)}; {extras}\n",
        *_by_kind(kind, run["by_kind"]),
    ]


def _hostile(h: dict[str, Any]) -> list[str]:
    L = _generated_requests(
        "Hostile uploads",
        h,
        "generated requests (`reliability/hostile.py`, seed 0) at 4 concurrent clients",
        f"refusals not in the documented `{{error, reason}}` JSON: {h['error_bodies_off_format']}; "
        f"deliberate 503s (documented reasons, not counted as errors): {h.get('documented_503') or 0}.",
        "kind",
    )
    if h["findings"]:
        L.append("Findings (first 10):\n")
        for f in h["findings"][:10]:
            L.append(
                f"- `{f['name']}` {f['endpoint']} -> {f['status']} ({f['severity']}): {f['detail'][:200]}"
            )
        L.append("")
    return L


def _schemathesis(s: dict[str, Any]) -> list[str]:
    return _generated_requests(
        "Schemathesis (OpenAPI document `/docs.json`)",
        s,
        "requests, positive and negative generation modes",
        f"deliberate 503s: {s.get('documented_503') or 0}. Notes: {'; '.join(s.get('notes', [])[:3]) or '-'}.",
        "operation (mode)",
    )


def _load(r: dict[str, Any]) -> list[str]:
    L = ["## Load and soak\n"]
    L.append(
        f"{r['requests']} `POST /classify` requests (one 32-128 px PNG each) from {r['concurrency']} concurrent "
        f"clients (asyncio, one keep-alive connection each), after 200 warm-up requests.\n"
    )
    L.append("| figure | value |\n|---|---|")
    for k, label in (
        ("ok", "succeeded"),
        ("failed", "failed"),
        ("seconds", "duration (s)"),
        ("throughput_rps", "throughput (req/s)"),
        ("p50_ms", "p50 latency (ms)"),
        ("p90_ms", "p90 latency (ms)"),
        ("p99_ms", "p99 latency (ms)"),
        ("max_ms", "max latency (ms)"),
        ("rss_cold_mb", "server RSS at ready, before warm-up (MB, process tree)"),
        ("rss_before_mb", "server RSS before the run (MB)"),
        ("rss_after_mb", "server RSS after the run (MB)"),
        ("rss_growth_pct", "RSS growth during the run (%)"),
    ):
        L.append(f"| {label} | {r.get(k)} |")
    L.append("")
    samples = r.get("rss_samples_mb") or []
    if samples:
        step = max(1, len(samples) // 12)
        shown = ", ".join(f"{t} s: {mb}" for t, mb in samples[::step])
        L.append(f"Server RSS (MB) sampled every 5 s during the run: {shown}.\n")
    return L


def _worker_kill(k: dict[str, Any]) -> list[str]:
    return [
        "## Fault: serving worker killed (`kill -9`) under load\n",
        f"Load at 8 concurrent clients sending plain httpx requests that are never retried (for the project's "
        f"client, see Restarts); the BentoML worker (PID {k['killed_pid']}) was killed 2 s in. "
        f"A new worker (PID {k['new_pid']}) answered `/readyz` 200 **{k['seconds_to_ready']} s** after the kill "
        f"(`/readyz` not 200 for {k['seconds_unready']} s). Requests failed from the kill until recovery: "
        f"**{k['failed_during']}** (of {k['load']['requests']} sent in the whole run; failures by kind "
        f"{k['load']['failures']}). Served after recovery: {k['served_after']}.\n",
    ]


# The paragraphs of the restarts section, in order: str.format templates over the run's results
# (``run``), its load figures (``ld``) and its failures by kind (``failures``).
_RESTART_PARAGRAPHS = {
    "worker_kill_client": "- **Worker killed** (`kill -9`, PID {run[killed_pid]}) 2 s into a load at "
    "{ld[concurrency]} concurrent clients: a new worker (PID {run[new_pid]}) answered `/readyz` 200 "
    "{run[seconds_to_ready]} s after the kill. Failed requests: **{ld[failed]}** of {ld[requests]} ({failures}); "
    "the client retried {ld[retries]} times; p50 {ld[p50_ms]} ms, max {ld[max_ms]} ms. Served after: "
    "{run[served_after]}.",
    "recycle": "- **Worker recycled** (`NANOMORPH_RECYCLE_REQUESTS={run[recycle_every]}`) under a load of "
    "{ld[requests]} requests at {ld[concurrency]} concurrent clients: {run[recycles_logged]} recycles logged, "
    "{run[worker_pids_seen]} worker processes seen. Failed requests: **{ld[failed]}** ({failures}); the client "
    "retried {ld[retries]} times; p50 {ld[p50_ms]} ms, p99 {ld[p99_ms]} ms, max {ld[max_ms]} ms, "
    "{ld[throughput_rps]} req/s. Served after: {run[served_after]}.",
    "recycle_httpx": "- For comparison, the same recycling load from plain httpx requests that are **never "
    "retried** (what the drain alone achieves): {run[recycles_logged]} recycles, failed requests {ld[failed]} "
    "of {ld[requests]} ({failures}). Such a request was sent on a keep-alive connection in the instant the "
    "draining worker closed it, so the server never read it (a retry is safe), or it reached the new worker "
    "before its models were loaded (503 + `Retry-After`); connections opened while no worker accepts wait in "
    "the listening socket's backlog and are served.",
}


def _restart_paragraph(key: str, run: dict[str, Any]) -> str:
    ld = defaultdict(lambda: None, run["load"])  # ``retries``: only client loads count them
    return _RESTART_PARAGRAPHS[key].format(run=run, ld=ld, failures=_table(ld["failures"]))


def _restarts_section(results: dict[str, Any]) -> list[str]:
    """Worker kill and recycling under load, through the project's client (and plain httpx)."""
    found = [_restart_paragraph(key, results[key]) for key in _RESTART_PARAGRAPHS if key in results]
    if "worker_kill_client" not in results and "recycle" not in results:
        return found
    intro = (
        "The load goes through `nanomorph.client.NanomorphClient` with its defaults (3 retries, backoff "
        "0.5 s doubling, never shorter than the server's `Retry-After`; every 503 carries "
        "`Retry-After: 2`), one client and one keep-alive connection per thread. A request counts as "
        "failed only when the client raises after its retries.\n"
    )
    return ["## Restarts under load, through the project's client\n", intro, *found, ""]


def _corrupt_model(c: dict[str, Any]) -> list[str]:
    L = ["## Fault: start with a corrupted model file\n"]
    L.append(
        f"One byte of `{c['flipped']}` flipped (offset {c['offset']}), server started with "
        f"`NANOMORPH_REQUIRE_MODELS=classify` and watched for {c['observed_s']} s: `/readyz` answered "
        f"{', '.join(c['readyz_statuses'])} throughout (never ready: {c['never_ready']}), `/classify` "
        f"{c['classify_status']} `{c['classify_reason']}`, worker restarts {c['worker_restarts']}, server alive "
        f"{c['server_alive']}. The reason is logged once ({c['refusal_line_count']} line(s)):\n"
    )
    for line in c["refusal_lines"][:2]:
        L.append(f"    {line[:400]}")
    L.append("")
    return L


def _training_resume(results: dict[str, Any]) -> list[str]:
    L = ["## Fault: training jobs killed (`kill -9`) and resumed\n"]
    if "pretrain_resume" in results:
        p = results["pretrain_resume"]
        L.append(
            f"- `nanomorph pretrain` (test_resnet, 32 px, 4 epochs) killed {p['killed_after_s']} s in, as soon as "
            f"its first checkpoint existed: epochs recorded before the kill {p['epochs_before_kill']}; "
            f"`--resume` ({p['resume_message']!r}) finished with epochs {p['epochs_after_resume']}; "
            f"pre-kill epoch records unchanged: {p['pre_kill_records_kept']}; backbone written: "
            f"{p['backbone_written']}."
        )
    if "study_resume" in results:
        s = results["study_resume"]
        L.append(
            f"- `nanomorph study cls` ({s['expected_cells']} cells) killed {s['killed_after_s']} s in with "
            f"{s['rows_before_kill']} rows in results.csv; the rerun ({s['resume_message']!r}) ended with "
            f"{s['rows_after_resume']} rows, {s['distinct_cells']} distinct cells, {s['duplicate_rows']} "
            f"duplicates; every pre-kill row present unchanged: {s['pre_kill_rows_kept']}."
        )
    L.append("")
    return L


def _closing() -> list[str]:
    L = ["## Bugs this harness found (fixed)\n"]
    L.extend(f"- {b}" for b in FOUND)
    L.append("")
    L.append("## Known, not fixed\n")
    L.extend(f"- {b}" for b in KNOWN)
    L.append("")
    L.append("## How to run\n")
    L.append(
        "`make reliability` runs the full harness (about 1,200 hostile uploads, schemathesis with 100 examples per "
        "operation and mode, 10,000 load requests, the faults); `python -m reliability --quick` is the "
        "development mode; `--parts fuzz,load,faults,restarts,training` picks parts. The default test suite keeps fast "
        "versions in `tests/reliability/test_fast_reliability.py`. Failing hostile cases are saved for replay "
        "under the work folder's `failing-cases/` (`--workdir` keeps it).\n"
    )
    return L


def render(results: dict[str, Any], mode: str, started: str, seconds: float) -> str:
    """The markdown report (docs/reliability.md)."""
    L = _intro(results, mode, started, seconds)
    sections: list[tuple[str, Any]] = [
        ("hostile", _hostile),
        ("schemathesis", _schemathesis),
        ("load", _load),
        ("worker_kill", _worker_kill),
    ]
    for key, section in sections:
        if key in results:
            L.extend(section(results[key]))
    L.extend(_restarts_section(results))
    if "corrupt_model" in results:
        L.extend(_corrupt_model(results["corrupt_model"]))
    if "pretrain_resume" in results or "study_resume" in results:
        L.extend(_training_resume(results))
    if "large" in results:
        L.append(render_large(results, started))
    L.extend(_closing())
    return "\n".join(L)


def _replace_section(doc: str, heading: str, section: str) -> str:
    """``doc`` with the section under ``heading`` replaced (or inserted before the bugs list)."""
    if heading in doc:
        head, rest = doc.split(heading, 1)
        nxt = rest.find("\n## ")
        return head + section.rstrip("\n") + "\n\n" + (rest[nxt + 1 :] if nxt >= 0 else "")
    anchor = "## Bugs this harness found"
    if anchor in doc:
        head, rest = doc.split(anchor, 1)
        return head + section + "\n" + anchor + rest
    return doc.rstrip("\n") + "\n\n" + section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m reliability", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="development mode: fewer requests")
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma list of {', '.join(PARTS)} (default all); 'large' alone rewrites only its section of "
        "the report",
    )
    parser.add_argument(
        "--large-runs", default="trim,no_trim", help="large frames: trim (default config), no_trim, or both"
    )
    parser.add_argument("--out", default=str(REPO_ROOT / "docs" / "reliability.md"), help="markdown report")
    parser.add_argument("--workdir", default=None, help="scratch folder to keep (default: a temporary one)")
    parser.add_argument(
        "--from-json", default=None, help="only re-render the report from a saved reliability.json"
    )
    args = parser.parse_args(argv)
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        text = render(saved, saved["mode"], saved["started_utc"], float(saved.get("seconds", 0.0)))
        Path(args.out).write_text(text)
        print(text)
        return 1 if any(not ok for _, ok in targets(saved)) else 0
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    unknown = parts - set(PARTS)
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    sizes = QUICK if args.quick else FULL
    mode = "quick" if args.quick else "full"
    started = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M")
    t0 = time.monotonic()
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="nanomorph-reliability-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"mode": mode, "started_utc": started, "loadavg_start": _loadavg()}
    try:
        if parts & {"fuzz", "load", "faults"}:
            _fuzz_and_load(work, sizes, parts, results)
        if "faults" in parts:
            _server_faults(work, results)
        if "restarts" in parts:
            _restarts(work, sizes, results)
        if "training" in parts:
            _training_faults(work, results)
        if "large" in parts:
            from reliability.large import run_large

            _say("large frames: 8 concurrent 8192^2 /segment, with and without malloc_trim")
            results["large"] = run_large(work, runs=tuple(args.large_runs.split(",")))
            for key in args.large_runs.split(","):
                r = results["large"][key]
                _say(
                    f"  {key}: statuses {r['statuses']}, RSS {r['rss_before_mb']} -> peak {r['rss_peak_mb']} -> "
                    f"{r['rss_after_mb']} MB"
                )
    finally:
        seconds = time.monotonic() - t0
        results["seconds"] = round(seconds, 1)
        results["loadavg_end"] = _loadavg()
        (work / "reliability.json").write_text(json.dumps(results, indent=1, default=str))
        out = Path(args.out)
        if parts == {"large"} and out.exists():  # only its own section (none if it failed)
            section = render_large(results, started) if "large" in results else ""
            text = _replace_section(out.read_text(), LARGE_SECTION, section) if section else out.read_text()
        else:
            text = render(results, mode, started, seconds)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        print(text)
        _say(f"wrote {args.out} and {work / 'reliability.json'}")
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    missed = [d for d, ok in targets(results) if not ok]
    for d in missed:
        _say(f"TARGET MISSED: {d}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
