"""Intensity normalisation: ``normalise`` with histogram percentiles vs ``np.percentile``.

``nanomorph.contract.normalise`` clips every image to its 0.5 / 99.5 percentiles before the
model sees it (training, ``predict``, the service). For 8- and 16-bit frames the percentiles now
come from a histogram (:func:`nanomorph.contract.transform.percentiles`, equal to
``np.percentile`` bit for bit). This prints, per frame size and bit depth, the median time of
``np.percentile`` on the float32 frame, of ``percentiles`` and of the whole ``normalise``, and the
speed-up. Not a test: run it by hand on a quiet machine (~1 minute)::

    .venv/bin/python bench/normalise.py --record
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_name, load_average, print_and_record  # noqa: E402
from nanomorph.contract import normalise  # noqa: E402
from nanomorph.contract.transform import percentiles  # noqa: E402

SECTION = "## Normalisation percentiles"
Q = [0.5, 99.5]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def frame(side: int, bits: int, seed: int = 0) -> np.ndarray:
    """A detector-like frame: a smooth field plus shot noise over the given bit depth."""
    rng = np.random.default_rng(seed)
    top = 2**bits - 1
    ramp = np.linspace(0.2, 0.8, side, dtype=np.float32)[None, :] * np.ones((side, 1), np.float32)
    counts = rng.poisson(ramp * top * 0.5).clip(0, top)
    return counts.astype(np.uint8 if bits <= 8 else np.uint16)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sides", default="224,1024,2048,4096", help="frame sides to time")
    p.add_argument("--repeats", type=int, default=15, help="timed calls per cell (median)")
    p.add_argument("--record", action="store_true", help="write the table into docs/benchmarks.md")
    args = p.parse_args(argv)
    rows = [
        "| frame | np.percentile ms | histogram ms | speed-up | normalise ms (whole) |",
        "|---|---|---|---|---|",
    ]
    for side in (int(s) for s in args.sides.split(",")):
        for bits in (8, 16):
            image = frame(side, bits)
            as_float = image.astype(np.float32)
            assert percentiles(image, Q).tobytes() == np.percentile(as_float, Q).tobytes()
            old = median_ms(partial(np.percentile, as_float, Q), args.repeats)
            new = median_ms(partial(percentiles, image, Q), args.repeats)
            whole = median_ms(partial(normalise, image), args.repeats)
            row = f"| {side} x {side}, {bits}-bit | {old:.2f} | {new:.2f} | {old / new:.1f}x | {whole:.2f} |"
            print(row, flush=True)
            rows.append(row)
    table = (
        f"{SECTION}\n\n`bench/normalise.py` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}): the 0.5 / 99.5 "
        "percentiles of `normalise` from a histogram (8/16-bit frames) against `np.percentile` on the float32 "
        f"frame, equal bit for bit (checked in each cell); medians of {args.repeats} calls, one thread. "
        f"Machine: {cpu_name()}; load average at the end {load_average()}.\n\n" + "\n".join(rows) + "\n"
    )
    print_and_record(table, SECTION, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
