"""Large frames in the service: an in-flight pixel budget, tiled segmentation through the batcher,
and giving freed memory back to the system.

* :class:`PixelBudget` bounds the pixels of ``/segment`` requests in progress in one worker (the
  memory of a request is proportional to its pixels: :data:`BYTES_PER_PIXEL`). A request larger
  than the whole budget can never run: 413 ``over_budget`` naming the limit. Others wait their turn
  in a FIFO queue (no overtaking: a large frame is never starved by small ones); only when
  ``max_waiting`` requests are already queued is a request refused, 503 ``busy`` with a
  ``Retry-After`` estimated from the measured pixel throughput.
* :func:`segment_tiles` runs one normalised frame's tiles through the batcher a few at a time
  (the same plan as :class:`nanomorph.runtime.Segmenter`: tile side, tiles per call,
  :func:`~nanomorph.contract.tile_chunks`, :class:`~nanomorph.contract.Stitcher`), blending each
  call's predictions into the mask as they arrive. Only its *first* call may be shed for overload
  (the request could not start in time); later calls are never shed, so a frame of 1,849 tiles is
  not refused because its own tiles queued behind each other. One call is queued ahead while the
  previous one is blended, so the model never waits for the stitching.
* :func:`segment_frame` decodes one upload and runs it through :func:`segment_tiles` and the
  post-processing of :meth:`nanomorph.runtime.Segmenter.mask_and_instances`.
* :func:`fix_mmap_threshold` (at worker start) keeps large buffers out of glibc's heap, so freeing
  them returns them to the system (``NANOMORPH_MMAP_THRESHOLD_MB``, default 1).
* :func:`trim_memory` asks glibc to return free heap memory to the system (``malloc_trim(0)``):
  after a large request, numpy's freed frame-sized buffers otherwise stay in the process
  (glibc raises its mmap threshold after the first large free, so later large arrays come from
  the heap). Measured in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import math
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nanomorph.contract import ImageMeta, Stitcher, n_tiles, normalise, tile_chunks
from nanomorph.morphology import mask_to_png_bytes, measure
from nanomorph.particles import connected_instances, segment_probs
from nanomorph.particles import report as particle_report
from service.guard import decode_upload

if TYPE_CHECKING:  # the runtime (onnxruntime) and the settings are only types here
    from nanomorph.runtime import Segmenter
    from service.settings import Settings

#: Memory of one /segment request per image pixel that the budget plans with. numpy's share is
#: measured at ~8 bytes per pixel (tracemalloc peak, tests/nanomorph/test_runtime.py); the rest
#: (decoder buffers, PNG, morphology) is not traced, hence the headroom. docs/service.md
#: ("Large frames") explains the budget in these terms.
BYTES_PER_PIXEL = 16
#: Share of the machine's memory (or cgroup limit) the default budget may plan for, over all workers.
MEMORY_SHARE = 0.25


class Busy(RuntimeError):
    """The queue for the pixel budget is full (503 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def machine_memory() -> int:
    """Bytes of memory this process may use: physical memory, or a smaller cgroup limit."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            limit = int(Path(path).read_text().strip())  # "max" (no limit) -> ValueError
            if 0 < limit < total:
                total = limit
    return int(total)


def default_pixel_budget(max_pixels: int, workers: int, memory: int | None = None) -> int:
    """:data:`MEMORY_SHARE` of the memory, per worker, in pixels; never below one frame of
    ``max_pixels`` (every frame the limits accept must be servable)."""
    memory = machine_memory() if memory is None else memory
    return max(int(max_pixels), int(MEMORY_SHARE * memory / max(1, workers) / BYTES_PER_PIXEL))


class PixelBudget:
    """FIFO admission of requests by pixels (one per worker; used on its event loop)."""

    def __init__(self, budget: int, max_waiting: int) -> None:
        self.budget = int(budget)
        self.max_waiting = int(max_waiting)
        self.in_use = 0
        self._waiting: deque[tuple[int, asyncio.Future[None]]] = deque()
        self._rate = 0.0  # pixels per second of finished requests (moving average)

    @property
    def queued_pixels(self) -> int:
        return sum(p for p, _ in self._waiting)

    def retry_after(self) -> int:
        """Seconds until the queue ahead has likely drained (10 before anything was measured)."""
        if self._rate <= 0:
            return 10
        return max(1, math.ceil((self.in_use + self.queued_pixels) / self._rate))

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int) -> AsyncIterator[None]:
        """Holds ``pixels`` of the budget for the block (waits in line for them)."""
        await self._acquire(pixels)
        t0 = time.monotonic()
        try:
            yield
        finally:
            self._release(pixels)
            seconds = time.monotonic() - t0
            if seconds > 0:
                rate = pixels / seconds
                self._rate = rate if self._rate <= 0 else 0.7 * self._rate + 0.3 * rate

    async def _acquire(self, pixels: int) -> None:
        if not self._waiting and self.in_use + pixels <= self.budget:
            self.in_use += pixels
            return
        if len(self._waiting) >= self.max_waiting:
            raise Busy(
                f"{len(self._waiting)} large requests are already waiting for the pixel budget "
                f"({self.budget} pixels in flight); retry later",
                self.retry_after(),
            )
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (pixels, future)
        self._waiting.append(entry)
        try:
            await future
        except asyncio.CancelledError:  # the client went away while waiting
            if future.done() and not future.cancelled():
                self._release(pixels)  # granted just before the cancel: hand it on
            else:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(entry)
                self._grant()
            raise

    def _release(self, pixels: int) -> None:
        self.in_use -= pixels
        self._grant()

    def _grant(self) -> None:
        while self._waiting and self.in_use + self._waiting[0][0] <= self.budget:
            pixels, future = self._waiting.popleft()
            if future.done():
                continue
            self.in_use += pixels
            future.set_result(None)


Submit = Callable[[np.ndarray, bool], Awaitable[list[Any]]]


async def segment_tiles(
    norm: np.ndarray, side: int, overlap: int, per_call: int, submit: Submit, keep_probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Segments a normalised frame through ``submit(tiles, shed)``; returns the class mask and, with
    ``keep_probabilities`` (a boundary-aware model's post-processing needs them), the probabilities.

    ``submit`` runs tiles ``(n, 1, t, t)`` and returns their ``(C, t, t)`` predictions; ``shed`` is
    True only for the first call. Tiles are cut and blended off the event loop, one call ahead.
    """
    single = n_tiles(norm.shape, side, overlap) == 1
    stitcher = Stitcher(norm.shape, side, single_tile=single, keep_probabilities=keep_probabilities)
    chunks = tile_chunks(norm, side, overlap, per_call)

    def next_chunk() -> tuple[np.ndarray, list[tuple[int, int]]] | None:
        return next(chunks, None)

    def blend(preds: list[Any], positions: list[tuple[int, int]]) -> None:
        stitcher.add(np.stack(preds), positions)

    current = await asyncio.to_thread(next_chunk)
    if current is None:
        raise ValueError("empty image")
    pending = asyncio.ensure_future(submit(current[0], True))
    try:
        while current is not None:
            upcoming = await asyncio.to_thread(next_chunk)
            preds = await pending
            if upcoming is not None:  # queue the next call before blending this one
                pending = asyncio.ensure_future(submit(upcoming[0], False))
            await asyncio.to_thread(blend, preds, current[1])
            current = upcoming
    finally:
        if not pending.done():
            pending.cancel()
    return await asyncio.to_thread(stitcher.finish)


async def segment_frame(
    seg: Segmenter, submit: Submit, data: bytes, name: str, settings: Settings, with_instances: bool
) -> tuple[ImageMeta, np.ndarray, np.ndarray | None, bytes]:
    """Decodes, normalises and segments one uploaded frame tile chunk by tile chunk (:func:`segment_tiles`).

    Returns ``(meta, mask, instances or None, mask PNG)``, post-processed exactly as
    :meth:`nanomorph.runtime.Segmenter.mask_and_instances`: a boundary-aware model keeps its
    probabilities for the watershed; otherwise the mask streams and instances, when asked
    for, are its connected components."""

    def prepare() -> tuple[ImageMeta, np.ndarray]:
        image, meta = decode_upload(data, name, settings)
        return meta, normalise(image, seg.contract)  # the raw frame is freed on return

    meta, norm = await asyncio.to_thread(prepare)
    side, overlap = seg.tile_geometry(norm.shape)
    per_call = seg.tiles_per_call(side, settings.max_batch_size)
    boundary = seg.instances is not None
    mask, probs = await segment_tiles(norm, side, overlap, per_call, submit, boundary)
    del norm

    def finish() -> tuple[np.ndarray, np.ndarray | None, bytes]:
        if boundary:
            assert probs is not None
            folded, ids, _ = segment_probs(probs, seg.model_classes, seg.instances)
            return folded, ids, mask_to_png_bytes(folded)
        return mask, connected_instances(mask) if with_instances else None, mask_to_png_bytes(mask)

    folded, instances, png = await asyncio.to_thread(finish)
    return meta, folded, instances, png


async def frame_numbers(
    seg: Segmenter,
    mask: np.ndarray,
    instances: np.ndarray | None,
    pixel_size: float | None,
    pixel_unit: str,
    name: str,
) -> tuple[dict[str, Any], list[dict[str, Any]] | None, dict[str, Any] | None]:
    """``(morphology, particle rows, particle summary)`` of a segmented frame, off the event loop;
    the particle table only with ``instances``. Run inside the pixel budget: measuring a large
    mask takes memory too."""
    numbers = await asyncio.to_thread(measure, mask, seg.classes, pixel_size, pixel_unit)
    if instances is None:
        return numbers, None, None
    rows, summary = await asyncio.to_thread(
        particle_report, instances, mask, seg.classes, pixel_size, pixel_unit, name
    )
    return numbers, rows, summary


_LIBC: Any = None
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h)


def _glibc() -> Any:
    """glibc's malloc_trim / mallopt, or False where there is none (musl, macOS)."""
    global _LIBC
    if _LIBC is None:
        name = ctypes.util.find_library("c")
        try:
            lib = ctypes.CDLL(name or "libc.so.6")
            lib.malloc_trim.argtypes = [ctypes.c_size_t]
            lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
            _LIBC = lib
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def trim_memory() -> bool:
    """``malloc_trim(0)``: returns free glibc heap memory to the system. False where there is no
    glibc (musl, macOS) -- then nothing happens."""
    libc = _glibc()
    if not libc:
        return False
    libc.malloc_trim(0)
    return True


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Fixes glibc's mmap threshold: every allocation of at least ``threshold_bytes`` gets its own
    mapping, which goes back to the system when freed. By default glibc raises the threshold after
    the first large free (up to 32 MiB), so a large frame's tile and stitching buffers later come
    from the heap, which fragments and keeps them: after 8 concurrent 8192² frames the server stayed
    +26 % over its RSS before (malloc_trim included); with the threshold fixed at 1 MiB, +4 % (and
    the burst ran 17 % faster; docs/reliability.md). 0 leaves glibc's default. False without glibc."""
    libc = _glibc()
    if threshold_bytes <= 0 or not libc:
        return False
    return bool(libc.mallopt(M_MMAP_THRESHOLD, int(threshold_bytes)))
