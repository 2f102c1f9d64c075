"""Worker recycling decisions (``service.lifecycle``); the real restart is in the reliability harness."""

from __future__ import annotations

import pytest

from service.lifecycle import MIB, RSS_CHECK_EVERY, Recycler, recycling_enabled, rss_bytes
from service.settings import Settings


class _Stops:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def test_off_by_default() -> None:
    stops = _Stops()
    recycler = Recycler(stop=stops)
    assert not recycler.enabled
    for _ in range(10_000):
        recycler.request_done()
    assert stops.calls == 0 and recycler.reason is None
    assert not recycling_enabled(Settings.from_env({}))


def test_request_mark_stops_the_worker_once_within_the_spread() -> None:
    stops = _Stops()
    recycler = Recycler(max_requests=100, jitter=0.1, stop=stops)
    assert 90 <= recycler.max_requests <= 110
    for _ in range(recycler.max_requests - 1):
        recycler.request_done()
    assert stops.calls == 0
    for _ in range(50):  # requests still draining after the signal: asked to stop only once
        recycler.request_done()
    assert stops.calls == 1 and "requests served" in (recycler.reason or "")


def test_memory_mark_is_checked_every_few_requests() -> None:
    stops = _Stops()
    rss = [100 * MIB]
    recycler = Recycler(rss_mb=200, rss=lambda: rss[0], stop=stops)
    for _ in range(3 * RSS_CHECK_EVERY):
        recycler.request_done()
    assert stops.calls == 0
    rss[0] = 250 * MIB
    for _ in range(RSS_CHECK_EVERY):
        recycler.request_done()
    assert stops.calls == 1 and "250 MiB" in (recycler.reason or "")


def test_rss_bytes_reads_this_process() -> None:
    assert rss_bytes() > 10 * MIB


def test_settings_and_containers(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings.from_env({"NANOMORPH_RECYCLE_REQUESTS": "5000", "NANOMORPH_RECYCLE_RSS_MB": "1024"})
    assert s.recycle_requests == 5000 and s.recycle_rss_mb == 1024.0
    monkeypatch.delenv("BENTOML_CONTAINERIZED", raising=False)
    monkeypatch.delenv("BENTOCLOUD_DEPLOYMENT_URL", raising=False)
    assert recycling_enabled(s)
    # BentoML's own containers never restart a worker: recycling would leave none.
    monkeypatch.setenv("BENTOML_CONTAINERIZED", "true")
    assert not recycling_enabled(s)
    with pytest.raises(ValueError, match="NANOMORPH_RECYCLE_REQUESTS"):
        Settings.from_env({"NANOMORPH_RECYCLE_REQUESTS": "-1"})
    with pytest.raises(ValueError, match="NANOMORPH_SHUTDOWN_GRACE_S"):
        Settings.from_env({"NANOMORPH_SHUTDOWN_GRACE_S": "soon"})


def test_inference_routes_are_not_traced_by_default() -> None:
    assert Settings.from_env({}).trace_requests is False
    assert Settings.from_env({"NANOMORPH_TRACE_REQUESTS": "1"}).trace_requests is True
