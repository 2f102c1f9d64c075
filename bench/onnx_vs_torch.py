"""Images/s of the exported ``classify`` model: onnxruntime vs PyTorch eager, on CPU, same process.

    HF_HUB_OFFLINE=1 python bench/onnx_vs_torch.py [--arch resnet18] [--size 224] [--batches 1 32]
        [--seconds 5] [--threads 0] [--quantize int8] [--classifier RUNS/Y]

Builds a ``training.models.Classifier`` (random weights, or the one of ``--classifier``), exports it
exactly as ``nanomorph export`` does (softmax and L2-normalised embedding in the graph, parity
checked), then alternates timed rounds of PyTorch (``torch.inference_mode``) and onnxruntime on the
same batch so load from other processes hits both alike. Prints images/s and the ratios; with
``--quantize int8`` also the static int8 model's throughput vs fp32 onnxruntime and how often its
top-1 agrees with fp32. Not a unit test: results go to docs/benchmarks.md by hand.

It also prints each engine's achieved GFLOP/s (the model's FLOPs from ``torch.utils.flop_counter``)
next to a large float32 matrix multiply on the same cores, the practical float32 ceiling: when
onnxruntime is already at that ceiling, the fp32 ratio cannot grow beyond ceiling / PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _rate(fn: Any, n_images: int, seconds: float) -> float:
    fn()  # warm-up (allocations, kernel selection)
    fn()
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds or runs < 3:
        fn()
        runs += 1
    return runs * n_images / (time.perf_counter() - start)


def _sgemm_gflops(n: int = 4096, repeats: int = 5) -> float:
    """GFLOP/s of a float32 n x n matrix product with numpy's BLAS on all cores."""
    a = np.random.default_rng(0).random((n, n), dtype=np.float32)
    b = np.random.default_rng(1).random((n, n), dtype=np.float32)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def _flops_per_image(net: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        net(torch.rand(1, 1, size, size))
    return float(counter.get_total_flops())


def _images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """TEM-like inputs in [0, 1]: dark background, a few bright blobs and rods, noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = np.empty((n, 1, size, size), dtype=np.float32)
    for i in range(n):
        img = rng.normal(0.15, 0.05, (size, size))
        for _ in range(rng.integers(2, 8)):
            cy, cx, r = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(3, size / 8)
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = rng.uniform(0.6, 1.0)
        out[i, 0] = np.clip(img, 0, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per measurement")
    parser.add_argument("--rounds", type=int, default=2, help="alternating torch/onnx rounds (best kept)")
    parser.add_argument(
        "--threads", type=int, default=0, help="threads for both (0 = each library's default)"
    )
    parser.add_argument("--quantize", choices=("none", "int8"), default="none")
    parser.add_argument("--classifier", default=None, help="a classifier run instead of random weights")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    import onnxruntime as ort

    from nanomorph.contract import Contract
    from training.backbones import create_backbone
    from training.export import (
        ClassifyNet,
        ExportJob,
        check_parity,
        export_onnx,
        load_classifier_job,
        quantize_int8,
    )
    from training.models import Classifier

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.classifier:
        job = load_classifier_job(args.classifier)
    else:
        torch.manual_seed(0)
        model = Classifier(create_backbone(args.arch), args.classes)
        job = ExportJob(
            task="classify",
            net=ClassifyNet(model),
            outputs=["probabilities", "embedding"],
            contract=Contract(image_size=args.size),
            run_dir=Path("."),
            weights=Path("random"),
            classes=[f"c{i}" for i in range(args.classes)],
        )
    size = job.contract.image_size
    net = job.net.eval()
    results: dict[str, Any] = {
        "arch": args.arch,
        "size": size,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "onnxruntime": ort.__version__,
        "load_avg": os.getloadavg()[0],
    }
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = export_onnx(job, Path(tmp) / "classify.onnx")
        parity = check_parity(job, fp32)
        results["parity_max_abs_diff"] = parity["max_abs_diff"]
        options = ort.SessionOptions()
        if args.threads:
            options.intra_op_num_threads = args.threads
        sess = ort.InferenceSession(str(fp32), options, providers=["CPUExecutionProvider"])
        sess_q = None
        if args.quantize == "int8":
            calib = _images(32, size, seed=1)
            int8 = quantize_int8(fp32, Path(tmp) / "classify.int8.onnx", calib)
            sess_q = ort.InferenceSession(str(int8), options, providers=["CPUExecutionProvider"])
            test = _images(64, size, seed=2)
            p32 = sess.run(["probabilities"], {"image": test})[0].argmax(1)
            p8 = sess_q.run(["probabilities"], {"image": test})[0].argmax(1)
            results["int8_top1_agreement"] = float((p32 == p8).mean())
        for batch in args.batches:
            x = _images(batch, size)
            xt = torch.from_numpy(x)

            def run_torch(xt: torch.Tensor = xt) -> None:
                with torch.inference_mode():
                    net(xt)

            best: dict[str, float] = {}
            for _ in range(args.rounds):
                for name, fn in (
                    ("torch", run_torch),
                    ("onnx", lambda x=x: sess.run(None, {"image": x})),
                    *((("int8", lambda x=x: sess_q.run(None, {"image": x})),) if sess_q else ()),
                ):
                    best[name] = max(best.get(name, 0.0), _rate(fn, batch, args.seconds))
            row = {f"{k}_images_per_s": round(v, 2) for k, v in best.items()}
            row["onnx_vs_torch"] = round(best["onnx"] / best["torch"], 3)
            if "int8" in best:
                row["int8_vs_onnx"] = round(best["int8"] / best["onnx"], 3)
            results[f"batch_{batch}"] = row
    # After the timed rounds, so neither BLAS threads nor the FLOP counter can disturb them.
    results["gflop_per_image"] = round(_flops_per_image(net, size) / 1e9, 3)
    results["sgemm_gflops"] = round(_sgemm_gflops(), 1)
    for batch in args.batches:
        row = results[f"batch_{batch}"]
        for engine in ("torch", "onnx"):
            row[f"{engine}_gflops"] = round(row[f"{engine}_images_per_s"] * results["gflop_per_image"], 1)
        # The fp32 ratio cannot exceed the best float32 throughput seen on these cores / PyTorch's.
        ceiling = max(results["sgemm_gflops"], row["onnx_gflops"])
        row["fp32_ratio_ceiling"] = round(ceiling / row["torch_gflops"], 3)
        print(f"batch {batch}: " + ", ".join(f"{k} {v}" for k, v in row.items()), flush=True)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
