"""Worker recycling: a worker that has served N requests, or grown past a memory mark, restarts.

BentoML 1.4.40's worker grows by a few KB per request (docs/reliability.md, "Known, not fixed"),
which adds up over months. With ``NANOMORPH_RECYCLE_REQUESTS`` or ``NANOMORPH_RECYCLE_RSS_MB`` set,
:class:`RecycleMiddleware` counts finished HTTP requests of its worker and, once a mark is passed,
sends the worker SIGTERM: uvicorn stops accepting connections, lets the requests in flight finish
(within the ``--timeout-graceful-shutdown`` that ``nanomorph serve`` passes), runs the shutdown
hooks and exits; BentoML's arbiter then starts a fresh worker on the same listening socket.
Connections that arrive meanwhile wait in the socket's backlog; requests that reach the new worker
before its models are loaded get 503 ``model_unavailable`` with ``Retry-After``, which
:class:`nanomorph.client.NanomorphClient` honours. Both marks are off by default.

The request mark is spread by +-10% per worker so that several workers do not restart together.
BentoML does not restart workers inside its own containers (``BENTOML_CONTAINERIZED``), so
recycling is refused there with a log line.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from collections.abc import Callable

from starlette.types import ASGIApp, Receive, Scope, Send

from service.settings import Settings

log = logging.getLogger("bentoml.nanomorph")

MIB = 1 << 20
#: The memory mark is checked every this many requests (reading /proc costs ~10 us).
RSS_CHECK_EVERY = 8


def rss_bytes() -> int:
    """This process's resident set size in bytes (0 when it cannot be read)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        import psutil

        return int(psutil.Process().memory_info().rss)
    except Exception:  # no psutil, or an unsupported platform: the memory mark never fires
        return 0


def _stop_self() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class Recycler:
    """Decides when this worker should restart.

    Args:
        max_requests: restart after about this many requests (0: never); spread by ``jitter``.
        rss_mb: restart once the resident memory passes this many MiB (0: never).
        jitter: relative spread of the request mark.
        rss: reads the resident memory in bytes.
        stop: asks this worker to stop gracefully (default: SIGTERM to itself).
    """

    def __init__(
        self,
        max_requests: int = 0,
        rss_mb: float = 0.0,
        *,
        jitter: float = 0.1,
        rss: Callable[[], int] = rss_bytes,
        stop: Callable[[], None] = _stop_self,
    ) -> None:
        spread = int(max_requests * jitter)
        self.max_requests = max(1, max_requests + random.randint(-spread, spread)) if max_requests > 0 else 0
        self.rss_limit = int(rss_mb * MIB) if rss_mb > 0 else 0
        self.requests = 0
        self.reason: str | None = None
        self._rss = rss
        self._stop = stop

    @property
    def enabled(self) -> bool:
        return bool(self.max_requests or self.rss_limit)

    def request_done(self) -> None:
        """Counts one finished request; asks the worker to stop once a mark is passed (once)."""
        self.requests += 1
        if self.reason is not None:
            return
        if self.max_requests and self.requests >= self.max_requests:
            self.reason = f"{self.requests} requests served (recycle mark {self.max_requests})"
        elif self.rss_limit and self.requests % RSS_CHECK_EVERY == 0:
            rss = self._rss()
            if rss > self.rss_limit:
                self.reason = (
                    f"resident memory {rss / MIB:.0f} MiB over the mark of {self.rss_limit / MIB:.0f} MiB"
                )
        if self.reason is not None:
            log.warning(
                "recycling this worker (pid %d): %s; draining, a new one starts", os.getpid(), self.reason
            )
            self._stop()


def recycling_enabled(settings: Settings) -> bool:
    """True when a recycle mark is set and BentoML will restart the worker afterwards."""
    if not (settings.recycle_requests or settings.recycle_rss_mb):
        return False
    if "BENTOML_CONTAINERIZED" in os.environ or "BENTOCLOUD_DEPLOYMENT_URL" in os.environ:
        log.error(
            "worker recycling is off: BentoML does not restart workers inside its containers "
            "(BENTOML_CONTAINERIZED); restart the container instead (docs/deployment.md)"
        )
        return False
    return True


class RecycleMiddleware:
    """ASGI middleware feeding every finished HTTP request to a :class:`Recycler`."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.recycler = Recycler(settings.recycle_requests, settings.recycle_rss_mb)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.recycler.request_done()
