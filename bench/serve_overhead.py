"""Serving overhead: ``/classify`` of a real server vs onnxruntime in-process, same model, one run.

Default model: a ResNet-18 classifier (1 channel, 4 classes, random weights: speed does not depend
on them) at 224 px, exported with ``training.export`` into a temporary folder store. Images are
synthetic 224x224 8-bit PNGs (smooth blobs plus noise, ~50 KB each), decoded in both arms.

* in-process: ``read_image`` + the model's contract + ``Classifier.predict_batch`` on batches of
  1, 8, 16 and 32 images (PNG decode included);
* served: ``nanomorph serve`` with the default configuration on 127.0.0.1, 1, 8, 16 and 32
  concurrent clients each posting one image per request (multipart, as curl would), a bounded
  number of requests per level after a warm-up. The clients run on the same cores as the server,
  so their own CPU per request is printed; ``--client raw`` (http.client, bodies built once)
  takes less of it than ``--client httpx`` (the default, multipart built per request).

Prints throughput (images/s), p50/p99 latency, rejected requests, the mean images per
onnxruntime call (from the server's ``nanomorph_batch_images`` metric), the time in onnxruntime
calls per image in both arms (a slower model in the server means its cores are shared), how many
calls were in progress on average (below the server's call lanes: batches start late) and the ratio
served/in-process at equal batch size / concurrency. ``--repeats N`` measures both arms N times,
interleaved, the in-process arm before and after each served run (their mean, so that a change in
the machine's load hits both), and reports the median ratio with its spread (min-max).
``--record`` writes the table into docs/benchmarks.md under "## Serving overhead". Not a test: run
it by hand (~1-2 minutes per repeat on 2 CPU cores)::

    .venv/bin/python bench/serve_overhead.py --repeats 5 --record
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import cpu_name, export_to_store, load_average, print_and_record  # noqa: E402
from nanomorph.contract import Contract, read_image  # noqa: E402
from nanomorph.runtime import Classifier, OnnxModel  # noqa: E402
from nanomorph.store import make_tag, metadata_props, resolve  # noqa: E402
from service.settings import available_cores  # noqa: E402

CLASSES = ["singular", "dispersed", "bundle", "network"]
SECTION = "## Serving overhead"


def build_model(store: Path, image_size: int = 224, arch: str = "resnet18") -> str:
    """Exports a ResNet-18 classifier into a folder store with ``training.export``; returns its tag."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm
    import torch

    from training.export import ClassifyNet, ExportJob
    from training.models import Classifier as TorchClassifier

    torch.manual_seed(0)
    backbone = timm.create_model(arch, in_chans=1, num_classes=0, pretrained=False)
    net = ClassifyNet(TorchClassifier(backbone, len(CLASSES)))
    contract = Contract(image_size=image_size)
    job = ExportJob(
        task="classify",
        net=net,
        outputs=["probabilities", "embedding"],
        contract=contract,
        run_dir=store,
        weights=store / "none",
        classes=CLASSES,
    )
    d = int(getattr(backbone, "num_features"))  # noqa: B009
    centroids = np.eye(len(CLASSES), d, dtype=np.float32).tolist()
    props = metadata_props(
        "classify",
        contract,
        classes=CLASSES,
        metrics={},
        ood={"centroids": centroids, "threshold": 0.5, "metric": "cosine"},
        encoder={"method": "none", "architecture": arch},
        provenance={"runs": {"bench": "bench/serve_overhead.py"}},
    )
    return export_to_store(job, store, make_tag("nanomorph", "classify", "bench"), props)


def make_images(n: int, size: int = 224, seed: int = 0) -> list[bytes]:
    """Synthetic TEM-like 8-bit PNGs: smoothed random blobs plus shot noise."""
    from PIL import Image
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        field = ndi.gaussian_filter(rng.random((size, size)), 4)
        field = (field - field.min()) / (np.ptp(field) + 1e-9)
        img = np.clip(field * 200 + rng.normal(0, 12, field.shape) + 20, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def in_process(clf: Classifier, images: list[bytes], batch: int, n_images: int) -> tuple[float, float]:
    """Images/s of decode + preprocess + onnxruntime at ``batch`` images per call, and the
    seconds per image of the onnxruntime calls alone (to compare with the server's)."""
    clf.predict_batch(np.stack([clf.preprocess(read_image(images[0])[0])] * batch))  # warm-up
    done, model_s = 0, 0.0
    start = time.perf_counter()
    while done < n_images:
        chunk = [images[(done + i) % len(images)] for i in range(batch)]
        x = np.stack([clf.preprocess(read_image(b)[0]) for b in chunk])
        t0 = time.perf_counter()
        clf.predict_batch(x)
        model_s += time.perf_counter() - t0
        done += batch
    return done / (time.perf_counter() - start), model_s / done


BOUNDARY = "nanomorph-bench-boundary"


def multipart_body(name: str, png: bytes) -> bytes:
    """One ``images`` file part, as curl -F or httpx ``files=`` would send it."""
    head = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="images"; filename="{name}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    )
    return head.encode() + png + f"\r\n--{BOUNDARY}--\r\n".encode()


def httpx_poster(
    url: str, images: list[bytes], clients: int
) -> tuple[Callable[[int], int], Callable[[], None]]:
    """(post(i) -> status, close()) over one shared httpx client: multipart built per request."""
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    client = httpx.Client(timeout=120, limits=limits)

    def post(i: int) -> int:
        files = {"images": (f"{i}.png", images[i % len(images)], "image/png")}
        return client.post(url + "/classify", files=files).status_code

    return post, client.close


def raw_poster(
    url: str, images: list[bytes], clients: int
) -> tuple[Callable[[int], int], Callable[[], None]]:
    """(post(i) -> status, close()): a keep-alive ``http.client`` connection per thread and the
    multipart bodies built once, so the load generator takes as little of the shared cores as
    a C load tool would (the server sees the same bytes as from httpx)."""
    import http.client
    from urllib.parse import urlsplit

    host = urlsplit(url)
    bodies = [multipart_body(f"{i}.png", png) for i, png in enumerate(images)]
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    local = threading.local()
    opened: list[http.client.HTTPConnection] = []

    def post(i: int) -> int:
        conn = getattr(local, "conn", None)
        if conn is None:
            conn = local.conn = http.client.HTTPConnection(
                host.hostname or "127.0.0.1", host.port, timeout=120
            )
            opened.append(conn)
        try:
            conn.request("POST", "/classify", body=bodies[i % len(bodies)], headers=headers)
            response = conn.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            conn.close()  # reconnects on the next request; counted as rejected
            return 0

    def close() -> None:
        for conn in opened:
            conn.close()

    return post, close


def load(
    url: str, images: list[bytes], clients: int, n_requests: int, client: str = "httpx"
) -> dict[str, Any]:
    """``clients`` threads post one image per request until ``n_requests`` are done; also the
    load generator's own CPU per request (it shares the cores with the server)."""
    latencies: list[float] = []
    statuses: list[int] = []
    lock = threading.Lock()
    counter = iter(range(n_requests))
    post, close = (raw_poster if client == "raw" else httpx_poster)(url, images, clients)

    def worker() -> None:
        while True:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            status = post(i)
            dt = time.perf_counter() - t0
            with lock:
                latencies.append(dt)
                statuses.append(status)

    cpu0 = time.process_time()
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        for f in [pool.submit(worker) for _ in range(clients)]:
            f.result()
        wall = time.perf_counter() - start
    client_cpu_ms = 1000 * (time.process_time() - cpu0) / max(len(statuses), 1)
    close()
    ok = [lat for lat, s in zip(latencies, statuses, strict=True) if s == 200]
    q = statistics.quantiles(ok, n=100, method="inclusive") if len(ok) > 1 else [float("nan")] * 99
    return {
        "throughput": len(ok) / wall,
        "p50_ms": 1000 * statistics.median(ok) if ok else float("nan"),
        "p99_ms": 1000 * q[98],
        "rejected": sum(1 for s in statuses if s != 200),
        "requests": len(statuses),
        "client_cpu_ms": client_cpu_ms,
    }


def batch_totals(url: str) -> tuple[float, float, float]:
    """(onnxruntime calls, images, seconds in them) so far, from the server's
    ``nanomorph_batch_images`` and ``nanomorph_inference_seconds`` histograms."""
    calls = images = seconds = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("nanomorph_batch_images_count"):
            calls += float(line.split()[-1])
        elif line.startswith("nanomorph_batch_images_sum"):
            images += float(line.split()[-1])
        elif line.startswith("nanomorph_inference_seconds_sum"):
            seconds += float(line.split()[-1])
    return calls, images, seconds


def machine() -> str:
    import onnxruntime as ort

    return (
        f"{cpu_name()}, {available_cores()} cores available, onnxruntime {ort.__version__} (CPUExecutionProvider), "
        f"Python {platform.python_version()}; load average at the end {load_average()} "
        "(other jobs share these cores)"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--levels", default="1,8,16,32", help="concurrency levels = in-process batch sizes")
    p.add_argument(
        "--requests", type=int, default=240, help="requests per concurrency level (level 1: a third)"
    )
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument(
        "--repeats", type=int, default=1, help="measure both arms this many times (median, spread)"
    )
    p.add_argument(
        "--client",
        choices=("httpx", "raw"),
        default="httpx",
        help="load generator: httpx (multipart built per request) or raw http.client with prebuilt "
        "bodies (less of the shared cores taken by the clients)",
    )
    p.add_argument(
        "--concurrent-calls",
        default="auto",
        help="the server's NANOMORPH_CONCURRENT_CALLS: auto (its default) or a count of onnxruntime "
        "calls at once, cores shared out",
    )
    p.add_argument("--record", action="store_true", help="write the result into docs/benchmarks.md")
    args = p.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    from tests.fixtures.server import start_server

    with tempfile.TemporaryDirectory(prefix="nanomorph-bench-") as tmp:
        work = Path(tmp)
        store = work / "store"
        store.mkdir()
        t0 = time.perf_counter()
        tag = build_model(store, args.image_size)
        print(f"exported {tag} in {time.perf_counter() - t0:.1f} s", flush=True)
        images = make_images(64, args.image_size)

        local: dict[int, list[float]] = {b: [] for b in levels}
        served: dict[int, list[dict[str, Any]]] = {c: [] for c in levels}
        env = {"NANOMORPH_CLASSIFY_MODEL": tag, "NANOMORPH_CONCURRENT_CALLS": str(args.concurrent_calls)}
        clf = Classifier(OnnxModel(resolve(tag, store)))  # one session for every in-process run
        with start_server(work / "server", store=store, env=env, timeout=600) as server:
            for c in levels:
                load(server.url, images, c, 2 * c, args.client)  # warm-up: connections, thread pools
            for rep in range(args.repeats):
                for c in levels:
                    n_requests = args.requests // 3 if c == 1 else args.requests
                    # The in-process arm brackets the served one (half the images before, half after,
                    # the mean of the two rates): a change in the machine's speed during the repeat
                    # hits both arms alike (single short in-process runs moved 32-80 images/s).
                    n_local = max(c * 4, n_requests // 2)
                    first = in_process(clf, images, c, n_local)
                    before = batch_totals(server.url)
                    s = load(server.url, images, c, n_requests, args.client)
                    after = batch_totals(server.url)
                    second = in_process(clf, images, c, n_local)
                    local[c].append((first[0] + second[0]) / 2)
                    s["mean_batch"] = (after[1] - before[1]) / max(after[0] - before[0], 1.0)
                    # Where the gap is: the model slower in the server (cores shared with HTTP,
                    # decoding and clients) or idle between calls (batches formed too late).
                    s["model_ms"] = 1000 * (after[2] - before[2]) / max(after[1] - before[1], 1.0)
                    s["local_model_ms"] = 1000 * (first[1] + second[1]) / 2
                    s["ratio"] = s["throughput"] / local[c][-1]
                    served[c].append(s)
                    print(
                        f"[{rep + 1}/{args.repeats}] {c:>2}: in-process {local[c][-1]:7.1f} images/s, "
                        f"served {s['throughput']:7.1f} images/s  p50 {s['p50_ms']:6.0f} ms  "
                        f"p99 {s['p99_ms']:6.0f} ms  rejected {s['rejected']}/{s['requests']}  "
                        f"mean batch {s['mean_batch']:.1f}  client CPU {s['client_cpu_ms']:.1f} ms/request  "
                        f"model ms/image served {s['model_ms']:.1f} vs in-process {s['local_model_ms']:.1f} "
                        f"(calls in progress {s['model_ms'] * s['throughput'] / 1000:.2f} on average)  "
                        f"ratio {s['ratio']:.2f}",
                        flush=True,
                    )

    med = statistics.median
    rows = [
        "| clients = batch | in-process images/s | served images/s | ratio (median) | ratio min-max | "
        "mean batch | model ms/image served / in-process | client CPU ms/request | p50 ms | p99 ms | rejected |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in levels:
        ratios = [s["ratio"] for s in served[c]]
        rows.append(
            f"| {c} | {med(local[c]):.1f} | {med([s['throughput'] for s in served[c]]):.1f} | "
            f"{med(ratios):.2f} | {min(ratios):.2f}-{max(ratios):.2f} | "
            f"{med([s['mean_batch'] for s in served[c]]):.1f} | "
            f"{med([s['model_ms'] for s in served[c]]):.1f} / {med([s['local_model_ms'] for s in served[c]]):.1f} | "
            f"{med([s['client_cpu_ms'] for s in served[c]]):.1f} | "
            f"{med([s['p50_ms'] for s in served[c]]):.0f} | "
            f"{med([s['p99_ms'] for s in served[c]]):.0f} | "
            f"{sum(s['rejected'] for s in served[c])}/{sum(s['requests'] for s in served[c])} |"
        )
    table = (
        f"{SECTION}\n\n`bench/serve_overhead.py --repeats {args.repeats} --client {args.client} --concurrent-calls "
        f"{args.concurrent_calls}` ({time.strftime('%Y-%m-%d')}): "
        f"ResNet-18 classifier, 1 channel, {args.image_size} px, `/classify` with one PNG per request vs "
        f"in-process onnxruntime (PNG decode included) at the same batch size, both arms measured "
        f"{args.repeats} time(s), interleaved (in-process: the mean of a run before and one after each served "
        f"run); medians, and the ratio's spread over the repeats. Server: "
        f"`nanomorph serve` defaults (1 worker, max batch 32, no batch wait, max latency 60 s, "
        f"{args.concurrent_calls} concurrent onnxruntime call(s)), clients on "
        f"the same machine over loopback (they share its cores; client CPU: the load generator's own CPU "
        f"time per request). Mean batch: images per onnxruntime call "
        f"(`nanomorph_batch_images`); model ms/image: time in onnxruntime calls per image, the server's "
        f"(`nanomorph_inference_seconds`) and the in-process arm's.\n\n"
        f"Machine: {machine()}.\n\n" + "\n".join(rows) + "\n"
    )
    if os.getloadavg()[0] > 1.5 * available_cores():
        table += (
            "\n**Oversubscribed machine**: the load average was well above the core count (other jobs ran), "
            "so absolute numbers are several times too low and the ratios are noise-dominated; rerun on a quiet machine.\n"
        )
    print_and_record(table, SECTION, args.record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
