"""Adaptive batching: concurrent requests share one onnxruntime call.

A :class:`Batcher` owns one batch function (an internal API taking exactly one array, batch axis
first) and ``concurrent_calls`` threads ("lanes", one by default) to run it on. Requests queue
their arrays; whenever a lane is idle it takes everything queued, up to ``max_batch_size`` images,
concatenates it, runs it once and hands each request its slice of the result. With one client that
is a batch of 1 and no added wait; under load the batch grows by itself to what the model can
absorb ("continuous batching").

Adaptive calls (``narrow_fn``): on CPU one onnxruntime call on all the cores is fastest for a lone
request, but under load two calls on half the cores each are faster (a call's parallel sections
wait for all of its threads, so decoding or HTTP taking one core stalls the whole call; a call on
one core is only slowed). With ``narrow_fn`` a request that finds no call running and nothing
queued runs on ``fn`` (all cores) and no other call starts beside it; otherwise what is queued is
shared out between the idle lanes, each running ``narrow_fn`` (docs/benchmarks.md).

Why not BentoML's own batchable-API dispatch? Reaching a batchable ``@bentoml.api`` from another
endpoint of the same service goes through ``self.to_async``, an in-process HTTP client that
serialises numpy arrays as JSON lists: measured here at ~46 ms per 224x224 float32 image, three
times the ResNet-18 inference itself. The batcher keeps the arrays in memory. Like BentoML's
dispatcher it sheds load by latency: a request still queued after ``max_latency_ms`` gets a 503
(:class:`Overloaded`); unlike it, it never sheds on a *predicted* latency, so the default (60 s)
never rejects a request a client is still waiting for. Only a request's first call can be shed:
the later calls of a large frame (``submit(..., shed=False)``) wait for as long as they need, so a
request that has started is never refused because its own tiles queued behind each other.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class Overloaded(RuntimeError):
    """A request waited longer than ``max_latency_ms`` in the queue."""


@dataclass
class _Job:
    data: np.ndarray
    future: asyncio.Future[Any]
    shed: bool = True
    enqueued: float = field(default_factory=time.monotonic)


class Batcher:
    """Runs ``fn`` on batches gathered from concurrent :meth:`submit` calls.

    Args:
        fn: batch function ``array (N, ...) -> sequence of N results`` (an ndarray or a list);
            runs on this batcher's own thread, one call at a time.
        max_batch_size: most items per call; a single submission larger than this is cut into
            chunks by :meth:`submit`.
        max_latency_ms: queued longer than this -> :class:`Overloaded`.
        batch_wait_ms: after the first request of an idle spell, wait this long for others to join
            its batch (0: run at once; batches still form while a call is running).
        name: thread name (for logs).
        max_elements: most array elements per call (0: no limit besides ``max_batch_size``): the
            segment batcher's items are tiles of varying sides, so concurrent large frames must not
            add up to one huge call (its activations would grow onnxruntime's arena to match).
        concurrent_calls: calls of ``fn`` that may run at once, each on its own thread (1: one at
            a time). Several pay off on CPU under many clients with onnxruntime sessions of fewer
            threads each: a call is not held up by one of its threads that decoding or HTTP took
            off a core, and the other lane keeps the cores busy (docs/benchmarks.md).
        narrow_fn: with adaptive calls, ``fn`` on a session of 1 / ``concurrent_calls`` of the cores;
            ``fn`` then runs alone, only for a lone request (see the module docstring).
    """

    def __init__(
        self,
        fn: Callable[[np.ndarray], Sequence[Any] | np.ndarray],
        max_batch_size: int = 32,
        max_latency_ms: int = 60000,
        batch_wait_ms: float = 0.0,
        name: str = "batcher",
        max_elements: int = 0,
        concurrent_calls: int = 1,
        narrow_fn: Callable[[np.ndarray], Sequence[Any] | np.ndarray] | None = None,
    ) -> None:
        self.fn = fn
        self.max_batch_size = max(1, int(max_batch_size))
        self.max_latency = max_latency_ms / 1000.0
        self.batch_wait = max(0.0, batch_wait_ms / 1000.0)
        self.max_elements = max(0, int(max_elements))
        self._queue: deque[_Job] = deque()
        self.concurrent_calls = max(1, int(concurrent_calls))
        self._executor = ThreadPoolExecutor(max_workers=self.concurrent_calls, thread_name_prefix=name)
        self.narrow_fn = narrow_fn
        # A call alone always runs on the same thread (the session's own threads stay paired with it).
        self._alone_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-alone")
        self._running = 0  # calls in progress
        self._alone_running = False  # a call on all the cores (adaptive): no other may start
        self._wake: asyncio.Event | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def submit(self, data: np.ndarray, shed: bool = True) -> list[Any]:
        """Runs ``fn`` on ``data`` (batch axis first) batched with other callers; returns its N results.

        ``shed=False``: never refused for waiting (a later call of a request already running)."""
        if len(data) == 0:
            return []
        if len(data) > self.max_batch_size:
            parts = [data[i : i + self.max_batch_size] for i in range(0, len(data), self.max_batch_size)]
            chunks = await asyncio.gather(*(self.submit(p, shed) for p in parts))
            return [r for chunk in chunks for r in chunk]
        loop = asyncio.get_running_loop()
        if not self._tasks or any(t.done() or t.get_loop() is not loop for t in self._tasks):
            for task in self._tasks:  # a lane left on this loop would make one lane too many
                if not task.done() and task.get_loop() is loop:
                    task.cancel()
            self._wake = asyncio.Event()
            # Each lane takes what is queued whenever it is idle; all wake on a new request.
            self._tasks = [loop.create_task(self._run()) for _ in range(self.concurrent_calls)]
        job = _Job(data, loop.create_future(), shed)
        self._queue.append(job)
        assert self._wake is not None
        self._wake.set()
        result: list[Any] = await job.future
        return result

    def _take(self, max_jobs: int = 0) -> list[_Job]:
        now = time.monotonic()
        jobs: list[_Job] = []
        size = elements = 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # the client went away
                self._queue.popleft()
                continue
            if job.shed and now - job.enqueued > self.max_latency:
                self._queue.popleft()
                job.future.set_exception(
                    Overloaded(
                        f"request waited over {self.max_latency * 1000:.0f} ms for the model (overloaded)"
                    )
                )
                continue
            if jobs and size + len(job.data) > self.max_batch_size:
                break
            if max_jobs and len(jobs) >= max_jobs:
                break
            if jobs and self.max_elements and elements + job.data.size > self.max_elements:
                break
            if jobs and job.data.shape[1:] != jobs[0].data.shape[1:]:
                # Arrays of another item shape (e.g. a small image's 32x32 segmentation tile
                # next to 64x64 tiles) cannot share one np.concatenate: next batch.
                break
            self._queue.popleft()
            jobs.append(job)
            size += len(job.data)
            elements += job.data.size
        return jobs

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.batch_wait and self._queue and len(self._queue) < self.max_batch_size:
                waited = time.monotonic() - self._queue[0].enqueued
                if waited < self.batch_wait:
                    await asyncio.sleep(self.batch_wait - waited)
            while not self._alone_running and (jobs := self._take(self._share())):
                alone = (
                    self.narrow_fn is not None and not self._running and not self._queue and len(jobs) == 1
                )
                fn = self.narrow_fn if self.narrow_fn is not None and not alone else self.fn
                self._running += 1
                self._alone_running = alone
                try:
                    batch = jobs[0].data if len(jobs) == 1 else np.concatenate([j.data for j in jobs])
                    try:
                        executor = self._alone_executor if alone else self._executor
                        out = await loop.run_in_executor(executor, fn, batch)
                    finally:
                        self._running -= 1
                        if alone:  # the lanes that waited for it may start now
                            self._alone_running = False
                            self._wake.set()
                    if len(out) != len(batch):
                        raise RuntimeError(
                            f"batch function returned {len(out)} results for {len(batch)} inputs"
                        )
                except Exception as exc:  # every caller of this batch gets the error
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(exc)
                    continue
                start = 0
                for job in jobs:
                    n = len(job.data)
                    if not job.future.done():
                        job.future.set_result(list(out[start : start + n]))
                    start += n

    def _share(self) -> int:
        """Most jobs one lane takes now (0: no limit): with adaptive calls, a share for each idle lane."""
        if self.narrow_fn is None or len(self._queue) <= 1:
            return 0
        idle = self.concurrent_calls - self._running
        return -(-len(self._queue) // max(idle, 1))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._alone_executor.shutdown(wait=False, cancel_futures=True)
