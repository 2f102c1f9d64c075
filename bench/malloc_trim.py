"""Memory after bursts of large frames, with and without glibc ``malloc_trim`` (in-process).

Runs ``Segmenter.mask`` (the tiny per-pixel test model, so the figures are the frame handling:
normalise, tiles, stitching, mask) on ``--n`` concurrent ``--side`` x ``--side`` frames, three
bursts, and prints this process's RSS before, after each burst, and after ``malloc_trim(0)``
(:func:`service.largeframes.trim_memory`) unless ``--no-trim``. The service calls the same function
after large ``/segment`` requests; docs/benchmarks.md has the figures. ~1-3 minutes on 2 cores::

    .venv/bin/python bench/malloc_trim.py && .venv/bin/python bench/malloc_trim.py --no-trim
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nanomorph.runtime import Segmenter  # noqa: E402
from nanomorph.store import resolve  # noqa: E402
from service.largeframes import trim_memory  # noqa: E402
from tests.fixtures.tiny_models import build_tiny_store  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=4096)
    p.add_argument("--n", type=int, default=4, help="concurrent frames per burst")
    p.add_argument("--bursts", type=int, default=3)
    p.add_argument("--no-trim", action="store_true")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        build_tiny_store(Path(tmp))
        seg = Segmenter(resolve("nanomorph-segment:latest", tmp))

    def rss() -> float:
        return psutil.Process().memory_info().rss / 2**20

    def frame(i: int) -> int:
        img = np.random.default_rng(i).random((args.side, args.side), dtype=np.float32)
        return int(seg.mask(img).max())

    frame(0)  # warm: onnxruntime's arena and the first frame's buffers
    base = rss()
    for k in range(args.bursts):
        t0 = time.time()
        with ThreadPoolExecutor(args.n) as pool:
            list(pool.map(frame, range(args.n)))
        after = rss()
        if not args.no_trim:
            trim_memory()
        final = rss()
        print(
            f"burst {k + 1}: {args.n} x {args.side}^2, {'malloc_trim' if not args.no_trim else 'no trim'}: "
            f"RSS before {base:.0f} MB, after the burst {after:.0f} MB (+{after - base:.0f}), "
            f"after trimming {final:.0f} MB (+{final - base:.0f}); {time.time() - t0:.0f} s",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
