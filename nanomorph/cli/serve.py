"""``nanomorph serve``: the stored models over HTTP (:mod:`nanomorph.serve`, BentoML)."""

from __future__ import annotations

import argparse

from nanomorph.cli.options import add_store
from nanomorph.tasks import TASKS


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    a = parser.add_argument
    a("--host", help="interface to listen on (0.0.0.0: all; put TLS termination in front)")
    a("--port", type=int, help="port")
    add_store(parser, "'bentoml' or a folder store (null: $NANOMORPH_STORE, else bentoml)")
    for task in TASKS:
        a(f"--{task}-model", help=f"tag of the {task} model (null: nanomorph-{task}:latest)")
    a("--require", help="tasks that must load before the server is ready ('all' or a comma list)")
    a("--providers", help="onnxruntime providers, comma list")
    a(
        "--precision",
        choices=("auto", "fp32"),
        help="auto: a model's int8 file on CPU where export kept one, fp32 on CUDA; fp32: always fp32",
    )
    a("--workers", type=int, help="worker processes (null: 1)")
    a("--max-batch-size", type=int, help="images per onnxruntime call")
    a(
        "--concurrent-calls",
        help="onnxruntime calls each model runs at once, the cores shared between them: auto or a count "
        "(null: $NANOMORPH_CONCURRENT_CALLS, else auto: on CPU classify/embed run a lone request on all "
        "cores and two calls on half the cores each under load; segment and CUDA one call)",
    )
    a("--max-latency-ms", type=int, help="queue time before 503")
    a("--max-upload-mb", type=float, help="largest upload (MiB)")
    a(
        "--shutdown-grace-s",
        type=float,
        help="on SIGTERM/SIGINT/SIGHUP, seconds the requests in flight get to finish "
        "(null: $NANOMORPH_SHUTDOWN_GRACE_S, else 30)",
    )
    a(
        "--recycle-requests",
        type=int,
        help="restart a worker (draining it first) after about this many requests; 0: never",
    )
    a(
        "--recycle-rss-mb",
        type=float,
        help="restart a worker (draining it first) once its memory passes this many MiB; 0: never",
    )
    a(
        "--build-default",
        action="store_true",
        help="if the store holds no default models (nanomorph-{classify,embed,segment}:latest), build them "
        "first from the bundled synthetic data (`nanomorph demo`; needs the training extra)",
    )
    a("--demo-dir", help="working folder of --build-default")


def run(args: argparse.Namespace) -> int:
    from nanomorph import serve

    return serve.run(args)
