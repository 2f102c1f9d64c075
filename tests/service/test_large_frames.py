"""Large frames: shedding only before a request starts, the pixel budget, bounded memory.

Unit tests of :mod:`service.largeframes` and the batcher, then one real server (tiny models, a
64 px inference tile so that frames need thousands of tiles, a 100 ms shedding limit and a small
pixel budget).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import tifffile

from service import largeframes
from service.batching import Batcher
from service.largeframes import (
    Busy,
    PixelBudget,
    default_pixel_budget,
    fix_mmap_threshold,
    segment_tiles,
    trim_memory,
)
from service.settings import DEFAULT_MAX_PIXELS, Settings
from tests.fixtures.server import Server, start_server

# ------------------------------------------------------------------------------------------ units


def test_later_calls_of_a_request_are_never_shed() -> None:
    def slow(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.05)
        return batch

    async def main() -> list[object]:
        b = Batcher(slow, max_batch_size=1, max_latency_ms=20)
        try:
            return await asyncio.gather(
                *(b.submit(np.zeros((1, 1)), shed=False) for _ in range(4)), return_exceptions=True
            )
        finally:
            b.close()

    assert all(isinstance(r, list) for r in asyncio.run(main()))


def test_pixel_budget_is_fifo_and_refuses_only_a_full_queue() -> None:
    async def main() -> None:
        budget = PixelBudget(100, max_waiting=2)
        order: list[str] = []
        release = asyncio.Event()

        async def job(name: str, pixels: int) -> None:
            async with budget.hold(pixels):
                order.append(name)
                await release.wait()

        first = asyncio.create_task(job("a", 80))
        await asyncio.sleep(0)
        waiting = [asyncio.create_task(job("b", 60)), asyncio.create_task(job("c", 10))]
        await asyncio.sleep(0.01)
        assert order == ["a"] and budget.in_use == 80  # "c" would fit but may not overtake "b"
        with pytest.raises(Busy) as err:
            async with budget.hold(1):
                pass
        assert err.value.retry_after_s >= 1
        release.set()
        await asyncio.gather(first, *waiting)
        assert order == ["a", "b", "c"] and budget.in_use == 0

        # A waiter whose client goes away leaves the line.
        blocker = asyncio.Event()

        async def hold_all() -> None:
            async with budget.hold(100):
                await blocker.wait()

        holder = asyncio.create_task(hold_all())
        await asyncio.sleep(0)
        gone = asyncio.create_task(job("gone", 50))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.gather(gone, return_exceptions=True)
        assert budget.queued_pixels == 0
        blocker.set()
        await holder
        assert budget.in_use == 0

    asyncio.run(main())


def test_default_budget_follows_memory_and_never_refuses_a_frame_within_the_limits() -> None:
    assert default_pixel_budget(DEFAULT_MAX_PIXELS, 1, memory=1 << 30) == DEFAULT_MAX_PIXELS
    big = default_pixel_budget(DEFAULT_MAX_PIXELS, 1, memory=64 << 30)
    assert big > DEFAULT_MAX_PIXELS
    assert default_pixel_budget(DEFAULT_MAX_PIXELS, 4, memory=64 << 30) < big  # per worker
    s = Settings.from_env({"NANOMORPH_PIXEL_BUDGET": "5000000", "NANOMORPH_PIXEL_QUEUE": "3"})
    assert (s.pixel_budget, s.pixel_queue) == (5_000_000, 3)
    assert Settings.from_env({}).pixel_budget >= DEFAULT_MAX_PIXELS
    with pytest.raises(ValueError, match="NANOMORPH_SEGMENT_TILE"):
        Settings.from_env({"NANOMORPH_SEGMENT_TILE": "500"})


def test_segment_tiles_blends_calls_as_they_arrive() -> None:
    norm = np.random.default_rng(0).random((300, 200), dtype=np.float32)
    sheds: list[bool] = []

    async def submit(tiles: np.ndarray, shed: bool) -> list[np.ndarray]:
        sheds.append(shed)
        assert len(tiles) <= 4
        return list(np.concatenate([1.0 - tiles, tiles], axis=1))  # "foreground" = brightness

    mask, probs = asyncio.run(segment_tiles(norm, 64, 16, 4, submit))
    assert probs is None  # only boundary-aware models keep them
    np.testing.assert_array_equal(mask, (norm > 0.5).astype(np.uint8))
    assert sheds[0] is True and not any(sheds[1:]) and len(sheds) > 5


def test_mmap_threshold_is_fixed_on_glibc_and_left_alone_at_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int]] = []

    class FakeLibc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    monkeypatch.setattr(largeframes, "_LIBC", FakeLibc())
    assert fix_mmap_threshold(1 << 20) is True
    assert calls == [(largeframes.M_MMAP_THRESHOLD, 1 << 20)]
    assert fix_mmap_threshold(0) is False and len(calls) == 1  # 0: glibc's default, untouched
    monkeypatch.setattr(largeframes, "_LIBC", False)  # no glibc (musl, macOS)
    assert fix_mmap_threshold(1 << 20) is False


def test_mmap_threshold_setting() -> None:
    assert Settings.from_env({}).mmap_threshold_bytes == 1 << 20
    assert Settings.from_env({"NANOMORPH_MMAP_THRESHOLD_MB": "0"}).mmap_threshold_bytes == 0


def test_trim_memory_runs_on_glibc() -> None:
    assert trim_memory() in (True, False)  # False only without glibc (musl, macOS)


# ------------------------------------------------------------------------------ a real server

TILE = 64  # the tiny model's training tile: a 2048^2 frame is 1,849 tiles (1,764 + borders)
BUDGET = 2048 * 2048 + 1000


@pytest.fixture(scope="module")
def large_server(
    tmp_path_factory: pytest.TempPathFactory, tiny_store: tuple[Path, dict[str, str]]
) -> Iterator[Server]:
    env = {
        "NANOMORPH_SEGMENT_TILE": str(TILE),
        "NANOMORPH_MAX_LATENCY_MS": "100",  # the whole frame takes far longer than this
        "NANOMORPH_MAX_BATCH_SIZE": "1",  # one tile per call: 1,849 calls, far past 100 ms
        "NANOMORPH_PIXEL_BUDGET": str(BUDGET),
        "NANOMORPH_MAX_UPLOAD_MB": "16",
        "NANOMORPH_MAX_REQUEST_MB": "32",
    }
    srv = start_server(tmp_path_factory.mktemp("large"), store=tiny_store[0], env=env)
    try:
        yield srv
    finally:
        srv.stop()


def _frame(h: int, w: int) -> tuple[bytes, np.ndarray]:
    """A uint16 TIFF with bright vertical stripes (the tiny model's foreground) and the expected mask."""
    img = np.full((h, w), 1000, dtype=np.uint16)
    img[:, ::97] = 60000
    img[:, 1::97] = 60000
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, compression="zlib")
    return buf.getvalue(), (img > 30000).astype(np.uint8)


def _segment(url: str, data: bytes) -> httpx.Response:
    return httpx.post(
        url + "/segment", params={"format": "png"}, files={"image": ("f.tif", data)}, timeout=300
    )


def test_frame_of_many_tiles_is_answered_on_an_idle_server(large_server: Server) -> None:
    from nanomorph.morphology import png_bytes_to_mask

    data, expected = _frame(2048, 2048)
    resp = _segment(large_server.url, data)
    assert resp.status_code == 200, resp.text
    np.testing.assert_array_equal(png_bytes_to_mask(resp.content), expected)
    info = {m["task"]: m for m in httpx.get(large_server.url + "/models", timeout=30).json()["models"]}
    assert info["segment"]["inference_tile"] == TILE and info["segment"]["precision"] == "fp32"


def test_frame_over_the_compute_budget_is_a_413_naming_the_limit(large_server: Server) -> None:
    data, _ = _frame(2048, 2100)
    resp = _segment(large_server.url, data)
    assert resp.status_code == 413
    body = resp.json()
    assert body["reason"] == "over_budget"
    assert str(BUDGET) in body["error"] and "NANOMORPH_PIXEL_BUDGET" in body["error"]


def test_memory_returns_after_a_burst(large_server: Server) -> None:
    """Coarse: after 4 concurrent 2048^2 frames (queued for the one-frame budget), the server's
    memory is back within 100 MB of where it was (a frame is ~50 MB at peak)."""
    from reliability.load import tree_rss

    data, _ = _frame(2048, 2048)
    assert _segment(large_server.url, data).status_code == 200  # warm: arenas at their size
    before = tree_rss(large_server.proc.pid)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        statuses = [r.status_code for r in pool.map(lambda _: _segment(large_server.url, data), range(4))]
    assert statuses == [200] * 4
    after = tree_rss(large_server.proc.pid)
    assert after - before < 100 * 2**20, f"RSS {before / 2**20:.0f} -> {after / 2**20:.0f} MB"


def test_concurrent_frames_do_not_add_up_to_one_huge_call() -> None:
    calls: list[int] = []

    def fn(batch: np.ndarray) -> np.ndarray:
        calls.append(batch.size)
        time.sleep(0.01)
        return batch

    async def main() -> None:
        b = Batcher(fn, max_batch_size=32, max_elements=3 * 100)
        try:
            await asyncio.gather(*(b.submit(np.zeros((3, 10, 10))) for _ in range(6)))
        finally:
            b.close()

    asyncio.run(main())
    assert sum(calls) == 6 * 300 and max(calls) <= 300
