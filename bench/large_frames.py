"""Large frames: ``/segment`` of 8192^2 and 4096^2 frames, served vs onnxruntime in-process.

Model: the default segmenter's architecture (smp U-Net, resnet18 encoder, 1 channel, 2 classes, with
its int8 model beside it as the default model's export stores it, unless ``--fp32-only``;
training tile 256, overlap 64; random weights: speed does not depend on them), exported with
``training.export`` into a temporary folder store, so its contract records the inference tiles
(``infer_tile_cpu`` / ``infer_tile_cuda``). Frames: synthetic uint16 TIFFs (zlib), as a
direct-detector camera writes them.

* in-process: ``read_image`` + ``Segmenter.mask`` (the path ``nanomorph predict`` runs): decode,
  normalise, tiles, onnxruntime, stitching; and for 4096^2 also with the training tile (256 px, the
  tiling before this change) for comparison;
* served: ``nanomorph serve`` with the default configuration on 127.0.0.1 (default pixel budget,
  shedding limit, batch size), one ``POST /segment?format=png`` per frame (the mask; JSON adds the
  morphology numbers, which the in-process arm does not compute).

``--tiles`` only times the model per pixel on tiles of 256, 512, 768 and 1024 px (about 2 M pixels
per call, best of 2): the measurement behind the inference tile sizes.

Prints the seconds of each arm and the ratio served / in-process; ``--record`` writes the table
into docs/benchmarks.md (its subsection of "## Large frames"). Not a test: run by hand (~5-10 minutes on 2 CPU
cores)::

    .venv/bin/python bench/large_frames.py --record
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_name, export_to_store, load_average, print_and_record  # noqa: E402
from nanomorph.contract import Contract, read_image  # noqa: E402
from nanomorph.runtime import OnnxModel, Segmenter  # noqa: E402
from nanomorph.store import make_tag, metadata_props, resolve  # noqa: E402

CLASSES = ["background", "wire"]
# --record replaces this subsection of "## Large frames" in docs/benchmarks.md (the rest is prose).
SECTION = "### Last recorded run (`bench/large_frames.py --record`)"


def build_model(store: Path, arch: str = "resnet18", int8: bool = True) -> str:
    """Exports a U-Net segmenter (random weights) into a folder store, with its int8 model beside
    it unless ``int8`` is False (what a default-model export stores); returns its tag."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from training.export import ExportJob, SegmentNet
    from training.models import build_unet

    torch.manual_seed(0)
    contract = Contract(tile_size=256, tile_overlap=64).with_infer_tiles()
    job = ExportJob(
        task="segment",
        net=SegmentNet(build_unet(arch, len(CLASSES))),
        outputs=["probabilities"],
        contract=contract,
        run_dir=store,
        weights=store / "none",
        classes=CLASSES,
    )
    props = metadata_props("segment", contract, CLASSES, {}, None, {"architecture": arch}, {})
    calibration = calibration_tiles(contract.tile_size) if int8 else None
    return export_to_store(job, store, make_tag("bench", "segment", "1"), props, calibration)


def calibration_tiles(side: int, n: int = 8) -> np.ndarray:
    """``n`` normalised tiles of a synthetic frame: the int8 model's activation ranges."""
    from nanomorph.contract import normalise

    frame = normalise(read_image(frame_tiff(side * 4, seed=1))[0], Contract())
    tiles = [frame[y : y + side, x : x + side] for y in (0, side, 2 * side, 3 * side) for x in (0, 2 * side)]
    return np.stack(tiles[:n])[:, None].astype(np.float32)


def frame_tiff(side: int, seed: int = 0) -> bytes:
    """A uint16 TEM-like frame (smooth blobs, stripes, noise) as a zlib TIFF."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    img = 20000 + 8000 * np.sin(40 * xx + 3 * yy) * np.cos(25 * yy)
    img += rng.normal(0, 1500, (side, side)).astype(np.float32)
    buf = io.BytesIO()
    tifffile.imwrite(buf, np.clip(img, 0, 65535).astype(np.uint16), compression="zlib")
    return buf.getvalue()


def in_process(store: Path, tag: str, data: bytes, max_tile: int | None = None) -> float:
    seg = Segmenter(OnnxModel(resolve(tag, store)), max_tile=max_tile)
    seg.mask(np.random.default_rng(0).random((1024, 1024), dtype=np.float32))  # warm-up
    t0 = time.perf_counter()
    image, _ = read_image(data)
    seg.mask(image)
    return time.perf_counter() - t0


def tile_costs(store: Path, tag: str) -> dict[int, float]:
    """Nanoseconds per pixel of one onnxruntime call on square tiles of each side (~2 M pixels)."""
    model = OnnxModel(resolve(tag, store))
    out = {}
    for side, n in ((256, 32), (512, 8), (768, 4), (1024, 2)):
        x = np.random.default_rng(0).random((n, 1, side, side), dtype=np.float32)
        model.run(x)
        best = min(_timed(model.run, x) for _ in range(2))
        out[side] = 1e9 * best / x.size
        print(f"tile {side}: {out[side]:.0f} ns/px", flush=True)
    return out


def _timed(fn: Any, *args: Any) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def served(url: str, data: bytes) -> tuple[float, int]:
    t0 = time.perf_counter()
    resp = httpx.post(
        url + "/segment", params={"format": "png"}, files={"image": ("frame.tif", data)}, timeout=3600
    )
    return time.perf_counter() - t0, resp.status_code


def machine() -> str:
    return f"{os.cpu_count()} cores, {cpu_name()}, load average {load_average()}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", default="8192,4096", help="frame sides to run")
    p.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    p.add_argument("--tiles", action="store_true", help="only the model's cost per pixel by tile side")
    p.add_argument(
        "--fp32-only",
        action="store_true",
        help="store no int8 model (what an export without --quantize stores)",
    )
    args = p.parse_args(argv)
    if args.tiles:
        with tempfile.TemporaryDirectory(prefix="nanomorph-bench-large-") as tmp:
            tile_costs(Path(tmp), build_model(Path(tmp), int8=not args.fp32_only))
        return 0
    from tests.fixtures.server import start_server

    sides = [int(s) for s in args.sides.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nanomorph-bench-large-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        tag = build_model(store, int8=not args.fp32_only)
        contract = resolve(tag, store).contract
        frames = {s: frame_tiff(s) for s in sides}
        for side in sides:
            local = in_process(store, tag, frames[side])
            print(f"{side}^2 in-process: {local:.1f} s", flush=True)
            rows.append({"side": side, "local": local})
        old = None
        if 4096 in sides:
            old = in_process(store, tag, frames[4096], max_tile=contract.tile_size)
            print(f"4096^2 in-process, training tile {contract.tile_size} px: {old:.1f} s", flush=True)
        with start_server(work / "server", store=store, env={"NANOMORPH_SEGMENT_MODEL": tag}) as server:
            served(server.url, frame_tiff(512))  # warm-up
            for row in rows:
                row["served"], row["status"] = served(server.url, frames[row["side"]])
                print(
                    f"{row['side']}^2 served: {row['served']:.1f} s (HTTP {row['status']}), "
                    f"ratio {row['served'] / row['local']:.2f}",
                    flush=True,
                )
            models = httpx.get(server.url + "/models", timeout=30).json()
    seg_info = next(m for m in models["models"] if m["task"] == "segment")
    lines = [
        f"{SECTION}\n",
        "`bench/large_frames.py` (smp U-Net, resnet18 encoder, 1 channel, 2 classes, random weights, exported with "
        f"`training.export`; contract tile {contract.tile_size} px, overlap {contract.tile_overlap}, inference tile "
        f"CPU {contract.infer_tile('cpu')} / CUDA {contract.infer_tile('cuda')}). Frames: synthetic uint16 zlib "
        "TIFFs. In-process = `read_image` + `Segmenter.mask` (what `nanomorph predict` runs); served = default "
        "`nanomorph serve`, one `POST /segment?format=png` (mask only; JSON adds the morphology numbers). "
        f"Served: precision {seg_info.get('precision')}, inference tile {seg_info.get('inference_tile')} px, pixel "
        f"budget {models['limits'].get('pixel_budget')} px, providers {', '.join(seg_info['providers'])}.\n",
        f"Machine: {machine()} (the load average shows what else ran), "
        f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC.\n",
        "| frame | in-process (s) | served (s) | HTTP | served / in-process |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['side']} x {row['side']} | {row['local']:.1f} | {row['served']:.1f} | {row['status']} | "
            f"{row['served'] / row['local']:.2f} |"
        )
    if old is not None:
        lines.append(
            f"\n4096 x 4096 in-process with the training tile ({contract.tile_size} px, the tiling before "
            f"inference tiles): {old:.1f} s.\n"
        )
    print_and_record("\n".join(lines) + "\n", SECTION, args.record)
    return 0 if all(r["status"] == 200 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
