"""Cost of the per-image files a segment run writes, old names/format vs the files people open.

Old (before ``nanomorph.batch.outputs``): a grey 0/1 PNG mask and a plain overlay PNG. New: a palette PNG mask, a
calibrated ImageJ label TIFF and an overlay with legend and scale bar (nanomorph.batch.outputs). Both are
timed on the same synthetic image (uniform noise: the worst case for PNG compression) and mask
(random discs of two classes), alternating rounds, best of each; prints ms per image, bytes
written and the ratio new / old.

    PYTHONPATH=. python bench/output_files.py --size 2048 --rounds 5
"""

from __future__ import annotations

import argparse
import io
import time

import numpy as np
from PIL import Image

from nanomorph.batch import outputs
from nanomorph.morphology import overlay


def old_files(image01: np.ndarray, mask: np.ndarray) -> int:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8)).save(buf, format="PNG")  # grey 0/1
    over = io.BytesIO()
    Image.fromarray(overlay(image01, mask, 3)).save(over, format="PNG")
    return len(buf.getvalue()) + len(over.getvalue())


def new_files(image01: np.ndarray, mask: np.ndarray) -> int:
    classes = ["background", "wire", "particle"]
    files = outputs.segment_files(
        "x", mask, classes, 0.5, "nm", outputs.overlay_png(image01, mask, classes, 0.5, "nm")
    )
    return sum(len(v) for v in files.values())


def best(fn, *args, rounds: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.size
    image01 = rng.random((n, n), dtype=np.float32)
    mask = np.zeros((n, n), np.uint8)
    yy, xx = np.mgrid[:n, :n]
    for _ in range(n // 16):
        cy, cx, r = rng.integers(0, n), rng.integers(0, n), rng.integers(4, 24)
        mask[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(1, 3)
    old_t = new_t = float("inf")
    for _ in range(2):  # alternate, so a load change on a shared machine hits both
        old_t = min(old_t, best(old_files, image01, mask, rounds=args.rounds))
        new_t = min(new_t, best(new_files, image01, mask, rounds=args.rounds))
    print(f"image {n}x{n}, best of {2 * args.rounds} rounds each")
    print(
        f"old files (grey PNG + plain overlay): {old_t * 1e3:.1f} ms, {old_files(image01, mask) / 1e6:.2f} MB"
    )
    print(
        f"new files (palette PNG + label TIFF + overlay with legend/scale bar): {new_t * 1e3:.1f} ms, "
        f"{new_files(image01, mask) / 1e6:.2f} MB"
    )
    print(f"ratio new / old: {new_t / old_t:.2f}")


if __name__ == "__main__":
    main()
