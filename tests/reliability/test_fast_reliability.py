"""Fast versions of the reliability harness (`python -m reliability`), against a real server.

A few hundred hostile uploads and a short schemathesis run (0 responses >= 500, server ready
afterwards), a short concurrent burst (0 failures), regressions for the bugs the harness found,
a corrupted model refused at start, and last a `kill -9` of the serving worker with recovery
(no failed request through the project's client); `-m slow` adds worker recycling under load.

The "one training resume" of the fast suite is tests/training/test_pretrain.py::
test_killed_run_resumes_to_the_same_end (SIGKILL mid-run, `--resume`, epochs 1..4 with no step
record lost or duplicated); the harness additionally kills and resumes `nanomorph study`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from reliability import target
from reliability.faults import corrupt_model_start, kill_worker_under_load, recycle_under_load
from reliability.fuzz import run_hostile
from reliability.hostile import KINDS, generate, png_bytes, tiff_bytes
from reliability.load import run_load, tree_rss, worker_pids
from tests.fixtures.server import REPO_ROOT, Server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = target.start(tmp_path_factory.mktemp("reliability"))  # tiny models + a similarity index
    try:
        yield srv
    finally:
        srv.stop()


def test_hostile_uploads_get_4xx_never_5xx(server: Server, tmp_path: Path) -> None:
    endpoints = tuple(
        p for p, ops in httpx.get(server.url + "/docs.json").json()["paths"].items() if "post" in ops
    )
    cases = list(generate(240, seed=1, skip_heavy=True, endpoints=endpoints))
    assert {c.kind for c in cases} == set(KINDS)
    report = run_hostile(server.url, cases, concurrency=4, save_dir=tmp_path / "failing")
    problems = [f.to_dict() for f in report.findings if f.severity != "error_body"]
    assert report.server_errors == 0 and not problems, problems[:5]
    assert report.requests == len(cases)
    # Every family of refusal is exercised, and valid control images still get answers.
    assert {"200", "400", "413", "415", "422"} <= set(report.by_status)
    assert report.by_kind["valid"] == {"200": sum(c.kind == "valid" for c in cases)}
    assert set(report.by_kind["huge_dims"]) == {"413"}
    assert report.ready_after
    assert not report.unavailable  # every endpoint was configured: no deliberate 503 either


def test_schemathesis_over_the_openapi_document(server: Server) -> None:
    pytest.importorskip("schemathesis")
    from reliability.fuzz import run_schemathesis

    report = run_schemathesis(server.url, max_examples=8)
    assert report.server_errors == 0, [f.to_dict() for f in report.findings][:5]
    # All three upload endpoints were reached (the /segment schema too, despite its 3.1 forms).
    reached = {k.split()[1] for k in report.by_kind}
    assert {"/classify", "/embed", "/segment", "/models"} <= reached
    assert report.requests >= 40 and report.ready_after


def test_concurrent_burst_has_no_failures(server: Server) -> None:
    before = tree_rss(server.proc.pid)
    report = run_load(server.url, 240, 16, time_limit_s=120)
    assert report.failed == 0 and report.ok == 240, report.to_dict()
    assert report.percentile(50) is not None
    assert tree_rss(server.proc.pid) < 2 * before  # no runaway growth in a short burst


def test_concurrent_segment_requests_with_different_tile_sizes(server: Server) -> None:
    """Regression: a small image's 32x32 tile and 64x64 tiles queued together made the batcher's
    np.concatenate raise outside its error handling; every request of that batch hung forever."""
    rng = np.random.default_rng(0)
    small = png_bytes((rng.random((20, 30)) * 255).astype(np.uint8))
    large = png_bytes((rng.random((150, 200)) * 255).astype(np.uint8))
    statuses: list[int | str] = []

    def send(i: int) -> None:
        body = small if i % 2 else large
        try:
            r = httpx.post(
                server.url + "/segment", files=[("image", (f"{i}.png", body, "image/png"))], timeout=30
            )
            statuses.append(r.status_code)
        except httpx.HTTPError as exc:
            statuses.append(type(exc).__name__)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert statuses == [200] * 10


def test_pixel_size_inf_and_extreme_floats_are_not_server_errors(server: Server) -> None:
    png = png_bytes(np.arange(32 * 32, dtype=np.uint8).reshape(32, 32))
    for value in ("inf", "1e400", "nan", "-1"):
        r = httpx.post(
            server.url + "/segment",
            files=[("image", ("a.png", png, "image/png"))],
            data={"pixel_size": value},
        )
        assert r.status_code == 422 and r.json()["reason"] == "invalid_field", (value, r.text)
    # Finite values near the float32 limit: hi - lo overflowed in normalise (NaN confidence, 500).
    extreme = np.where(np.indices((40, 48)).sum(0) % 2, 3.0e38, -3.0e38).astype(np.float32)
    r = httpx.post(server.url + "/classify", files=[("images", ("x.tif", tiff_bytes(extreme), "image/tiff"))])
    assert r.status_code == 200, r.text
    assert 0.0 <= r.json()["results"][0]["confidence"] <= 1.0


def test_corrupted_model_is_refused_with_a_clear_line(tmp_path: Path) -> None:
    report = corrupt_model_start(tmp_path, observe_s=4.0)
    assert report.never_ready and report.server_alive and report.worker_restarts == 0
    assert report.classify_status == 503 and report.classify_reason == "model_unavailable"
    assert len(report.refusal_lines) == 1, report.refusal_lines  # said once, not buried in a loop
    assert "does not match its manifest" in report.refusal_lines[0] and "sha256" in report.refusal_lines[0]


def test_killed_worker_recovers(server: Server) -> None:
    """Last in this module: kill -9 the worker of the shared server under load from the project's
    client, which retries the requests the dead worker dropped: none may fail."""
    before = worker_pids(server.proc.pid)
    report = kill_worker_under_load(
        server.url, server.proc.pid, n_requests=600, concurrency=4, warm_s=1.0, client=True
    )
    assert report.seconds_to_ready is not None and report.seconds_to_ready < 60, report.to_dict()
    assert report.new_pid is not None and report.new_pid not in before
    assert report.served_after
    assert report.load["ok"] > 0 and report.load["failed"] == 0, report.to_dict()


def test_large_frames_section_renders_and_replaces_only_itself() -> None:
    from reliability.__main__ import LARGE_SECTION, _replace_section, large_targets, render_large

    run = {
        "requests": 8,
        "statuses": [200] * 8,
        "server_errors": 0,
        "ok": 8,
        "seconds": 1.0,
        "latency_s": [0.5, 1.0],
        "rss_before_mb": 1000,
        "rss_peak_mb": 2000,
        "rss_after_mb": 1050,
        "rss_after_vs_before_pct": 5.0,
        "pixel_budget": 4 * 8192**2,
        "budget_mb": 4096,
        "frames_in_budget": 4,
    }
    results = {"large": {"side": 8192, "upload_bytes": 1 << 20, "trim": run, "no_trim": run}}
    assert [ok for _, ok in large_targets(results)] == [True, True, True]
    section = render_large(results, "2026-11-30 03:00")
    doc = "# R\n\n## A\n\nkeep\n\n" + LARGE_SECTION + "\n\nold\n\n## Bugs this harness found (fixed)\n\nx\n"
    new = _replace_section(doc, LARGE_SECTION, section)
    assert "old" not in new and "keep" in new and new.count(LARGE_SECTION) == 1 and "## Bugs" in new
    assert LARGE_SECTION in _replace_section(
        "# R\n\n## Bugs this harness found (fixed)\n", LARGE_SECTION, section
    )


@pytest.mark.slow
def test_recycled_worker_loses_no_request(tmp_path: Path) -> None:
    """A worker recycled every ~40 requests under load from the project's client: no request fails."""
    result = recycle_under_load(tmp_path, every=40, n_requests=160, concurrency=4)
    assert result["recycles_logged"] >= 1 and result["worker_pids_seen"] >= 2, result
    assert result["load"]["failed"] == 0 and result["ok"], result


def test_harness_functions_are_defined_once() -> None:
    """A second ``def`` of a name shadows the first: the report's ``_restarts`` once replaced the
    runner of the same name, and ``python -m reliability`` crashed at its restarts part."""
    import ast
    from collections import Counter

    for path in sorted((REPO_ROOT / "reliability").glob("*.py")):
        names = Counter(
            node.name
            for node in ast.parse(path.read_text()).body
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
        )
        assert [n for n, k in names.items() if k > 1] == [], path.name
