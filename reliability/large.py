"""Large frames under a burst: 8 concurrent 8192 x 8192 ``/segment`` requests.

A server with the tiny models (the per-pixel segment model, so the figures measure decoding,
tiling, stitching, the pixel budget and the memory, not a network's compute) and the default
configuration, apart from a request timeout long enough for the queue. It gets one warm-up frame,
then :func:`burst` sends ``n`` frames at once and samples the server's RSS (process tree) every
0.25 s. Run twice: with ``malloc_trim`` after large requests (the default) and without
(``NANOMORPH_MALLOC_TRIM=0``), which is the measurement behind that default.
"""

from __future__ import annotations

import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np


def frame_tiff(side: int, seed: int = 0) -> bytes:
    """A uint16 frame with bright stripes on a textured background, zlib TIFF (compressible, as a real
    0.6 MB frame: noise would make it larger than the upload limit)."""
    import tifffile

    rng = np.random.default_rng(seed)
    row = (1000 + rng.integers(0, 50, side)).astype(np.uint16)  # one textured row, repeated
    img = np.tile(row, (side, 1))
    img[:, ::61] = 60000
    buf = io.BytesIO()
    tifffile.imwrite(buf, img, compression="zlib")
    return buf.getvalue()


def burst(url: str, pid: int, data: bytes, n: int) -> dict[str, Any]:
    """``n`` concurrent ``POST /segment?format=png``; statuses, seconds and RSS before/peak/after."""
    from reliability.load import tree_rss

    before = tree_rss(pid)
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.25):
            peak = max(peak, tree_rss(pid))

    def one(_: int) -> tuple[int, float, str]:
        t0 = time.monotonic()
        try:
            r = httpx.post(
                url + "/segment", params={"format": "png"}, files={"image": ("f.tif", data)}, timeout=3600
            )
            reason = "" if r.status_code == 200 else r.text[:200]
            return r.status_code, time.monotonic() - t0, reason
        except httpx.HTTPError as exc:
            return 0, time.monotonic() - t0, f"{type(exc).__name__}: {exc}"

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.monotonic()
    with ThreadPoolExecutor(n) as pool:
        results = list(pool.map(one, range(n)))
    seconds = time.monotonic() - t0
    time.sleep(1.0)  # let the last response's buffers go
    done.set()
    sampler.join()
    after = tree_rss(pid)
    statuses = [s for s, _, _ in results]
    mb = 2**20
    return {
        "requests": n,
        "statuses": statuses,
        "server_errors": sum(1 for s in statuses if s == 0 or s >= 500),
        "ok": statuses.count(200),
        "seconds": round(seconds, 1),
        "latency_s": sorted(round(t, 1) for _, t, _ in results),
        "errors": [r for _, _, r in results if r][:3],
        "rss_before_mb": round(before / mb),
        "rss_peak_mb": round(peak / mb),
        "rss_after_mb": round(after / mb),
        "rss_after_vs_before_pct": round(100 * (after - before) / before, 1) if before else None,
    }


def run_large(
    work: Path, side: int = 8192, n: int = 8, runs: tuple[str, ...] = ("trim", "no_trim")
) -> dict[str, Any]:
    """The burst with (``trim``) and without (``no_trim``) malloc_trim, each on a fresh server."""
    from reliability import target

    data = frame_tiff(side)
    out: dict[str, Any] = {"side": side, "upload_bytes": len(data)}
    for label in runs:
        trim = "1" if label == "trim" else "0"
        env = {"NANOMORPH_MALLOC_TRIM": trim, "NANOMORPH_TIMEOUT_S": "3600"}
        server = target.start(work / f"large-{label}", env=env, timeout=600)  # slow on a loaded box
        try:
            models = httpx.get(server.url + "/models", timeout=30).json()
            budget = int(models["limits"]["pixel_budget"])
            warm = burst(server.url, server.proc.pid, data, 1)
            rep = burst(server.url, server.proc.pid, data, n)
            from service.largeframes import BYTES_PER_PIXEL

            rep.update(
                warmup_status=warm["statuses"],
                pixel_budget=budget,
                budget_mb=round(budget * BYTES_PER_PIXEL / 2**20),
                frames_in_budget=budget // (side * side),
                ready_after=server.ready(),
            )
            out[label] = rep
            (work / f"large-{label}.json").write_text(json.dumps(rep, indent=1))  # survives a later failure
        finally:
            server.stop()
    return out
