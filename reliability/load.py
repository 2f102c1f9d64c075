"""Load and soak: many ``/classify`` requests from concurrent clients on 127.0.0.1.

:func:`run_load` sends exactly ``n_requests`` requests (fewer only if ``time_limit_s`` runs out)
from ``concurrency`` asyncio clients sharing one connection pool, each request one small TEM-like
PNG. It counts failures (anything but a 200 with one result, or no response), latency
percentiles and throughput. :func:`tree_rss` measures the server's memory (resident set size,
summed over its whole process tree: the ``nanomorph serve`` wrapper, ``bentoml serve`` and its
workers) so that the soak can report growth before/after.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
import psutil

from reliability.hostile import noise_image, png_bytes


def tree_rss(pid: int) -> int:
    """Resident set size (bytes) of a process and all its descendants (0 if it is gone)."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += p.memory_info().rss
    return total


def worker_pids(pid: int) -> list[int]:
    """PIDs of the BentoML serving workers below ``pid`` (``python -m _bentoml_impl.worker...``)."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    out = []
    for c in children:
        try:
            if any("_bentoml_impl.worker" in part for part in c.cmdline()):
                out.append(c.pid)
        except psutil.NoSuchProcess:
            pass
    return out


def payloads(n: int = 16, seed: int = 0, size: int = 64) -> list[bytes]:
    """``n`` distinct small PNG frames (varied sizes around ``size``) to cycle through."""
    rng = np.random.default_rng(seed)
    return [
        png_bytes(
            noise_image(rng, int(rng.integers(size // 2, size * 2)), int(rng.integers(size // 2, size * 2)))
        )
        for _ in range(n)
    ]


@dataclass
class LoadReport:
    """Figures of one load run."""

    requests: int = 0
    ok: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    concurrency: int = 0
    stopped_early: bool = False
    failure_times: list[float] = field(default_factory=list)
    attempts: int = 0  # HTTP attempts (client load only: requests + retries)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def count(self, problem: str | None, start: float) -> None:
        """Counts one finished request: a success (its latency since ``perf_counter`` ``start``)
        or a failure of kind ``problem``."""
        self.requests += 1
        if problem is None:
            self.ok += 1
            self.latencies_ms.append(1000 * (time.perf_counter() - start))
        else:
            self.failures[problem] += 1
            self.failure_times.append(time.monotonic())

    def percentile(self, q: float) -> float | None:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "ok": self.ok,
            "failed": self.failed,
            "failures": dict(self.failures),
            "concurrency": self.concurrency,
            "seconds": round(self.seconds, 1),
            "throughput_rps": round(self.requests / self.seconds, 1) if self.seconds else None,
            "p50_ms": _r(self.percentile(50)),
            "p90_ms": _r(self.percentile(90)),
            "p99_ms": _r(self.percentile(99)),
            "max_ms": _r(max(self.latencies_ms) if self.latencies_ms else None),
            "stopped_early": self.stopped_early,
            **(
                {"attempts": self.attempts, "retries": self.attempts - self.requests} if self.attempts else {}
            ),
        }


def _r(x: float | None) -> float | None:
    return None if x is None else round(x, 1)


async def _load(
    url: str,
    n_requests: int,
    concurrency: int,
    bodies: list[bytes],
    timeout: float,
    time_limit_s: float,
    stop: threading.Event | None,
    headers: dict[str, str] | None,
) -> LoadReport:
    report = LoadReport(concurrency=concurrency)
    counter = iter(range(n_requests))
    deadline = time.monotonic() + time_limit_s
    t0 = time.monotonic()

    async def worker() -> None:
        # One keep-alive connection per client: a shared 32-connection httpx pool costs the load
        # generator about three times the CPU per request (measured), on the cores the server needs.
        limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
        async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers) as client:
            for i in counter:
                if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                    report.stopped_early = True
                    return
                body = bodies[i % len(bodies)]
                start = time.perf_counter()
                try:
                    r = await client.post(
                        url + "/classify", files=[("images", (f"f{i}.png", body, "image/png"))]
                    )
                    problem = None
                    if r.status_code != 200:
                        problem = f"HTTP {r.status_code}"
                    elif len(r.json().get("results", [])) != 1:
                        problem = "wrong result count"
                except httpx.HTTPError as exc:
                    problem = type(exc).__name__
                report.count(problem, start)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    report.seconds = time.monotonic() - t0
    return report


def run_load(
    url: str,
    n_requests: int = 10_000,
    concurrency: int = 32,
    *,
    bodies: list[bytes] | None = None,
    timeout: float = 60.0,
    time_limit_s: float = 1200.0,
    stop: threading.Event | None = None,
    headers: dict[str, str] | None = None,
) -> LoadReport:
    """Sends ``n_requests`` ``/classify`` requests from ``concurrency`` concurrent clients.

    Args:
        url: server base URL (127.0.0.1 only).
        n_requests: total requests (the run is bounded in count...).
        concurrency: clients in flight at once.
        bodies: PNG payloads to cycle through (default :func:`payloads`).
        timeout: per-request timeout (s).
        time_limit_s: ...and in time: no new request starts after this long.
        stop: an event that ends the run early (fault injection runs load in a thread).
        headers: extra headers (e.g. a bearer token).

    Returns:
        The :class:`LoadReport`; latencies are of successful requests only.
    """
    return asyncio.run(
        _load(url, n_requests, concurrency, bodies or payloads(), timeout, time_limit_s, stop, headers)
    )


class _CountingTransport(httpx.HTTPTransport):
    """One keep-alive connection (as :func:`run_load`'s clients) that counts every attempt."""

    def __init__(self, report: LoadReport, lock: threading.Lock) -> None:
        super().__init__(limits=httpx.Limits(max_connections=1, max_keepalive_connections=1))
        self._report, self._lock = report, lock

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        with self._lock:
            self._report.attempts += 1
        return super().handle_request(request)


def run_client_load(
    url: str,
    n_requests: int,
    concurrency: int = 8,
    *,
    bodies: list[bytes] | None = None,
    time_limit_s: float = 1200.0,
    stop: threading.Event | None = None,
    **client_kwargs: Any,
) -> LoadReport:
    """Like :func:`run_load`, but every request goes through :class:`nanomorph.client.NanomorphClient`
    (one per thread, its default retries unless ``client_kwargs`` say otherwise), so a failure is
    what an application using the project's client would see: an exception after every retry.
    Failures are keyed by the error's status and reason; ``LoadReport.attempts`` counts the HTTP
    attempts, so ``attempts - requests`` is the number of retries the client made.
    """
    from nanomorph.client import NanomorphClient, NanomorphError

    bodies = bodies or payloads()
    report = LoadReport(concurrency=concurrency)
    counter = iter(range(n_requests))
    lock = threading.Lock()
    deadline = time.monotonic() + time_limit_s
    t0 = time.monotonic()

    def worker() -> None:
        transport = _CountingTransport(report, lock)
        with NanomorphClient(url, transport=transport, **client_kwargs) as client:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                if time.monotonic() > deadline or (stop is not None and stop.is_set()):
                    report.stopped_early = True
                    return
                start = time.perf_counter()
                try:
                    results = client.classify([(f"f{i}.png", bodies[i % len(bodies)])])
                    problem = None if len(results) == 1 else "wrong result count"
                except NanomorphError as exc:
                    problem = f"{exc.status or 'no response'} {exc.reason}"
                with lock:
                    report.count(problem, start)

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report.seconds = time.monotonic() - t0
    return report
