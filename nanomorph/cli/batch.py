"""``nanomorph predict``, ``client`` and ``watch``: one folder of images in, one results folder out
(:mod:`nanomorph.batch.pipelines`). They share most options, so one module builds all three parsers."""

from __future__ import annotations

import argparse

from nanomorph.cli.options import add_store


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    from nanomorph.batch.pipelines import TASKS

    a = parser.add_argument
    a("input_dir", help="folder of images (searched recursively)")
    a("--out", required=True, help="output folder")
    a("--task", choices=TASKS, help="what to run on each image")
    if name in ("predict", "watch"):
        _in_process(parser, name)
    if name in ("client", "watch"):
        _over_http(parser, name)
    a("--batch-size", type=int, help="images per in-process onnxruntime call")
    a("--pixel-size", type=float, help="segment: pixel size (null: from each file)")
    a("--pixel-unit", help="segment: unit of --pixel-size (null: nm)")
    a("--no-overlays", action="store_true", help="segment: skip overlay PNGs")
    a("--no-recursive", action="store_true", help="only the top folder")
    if name == "watch":
        a("--interval", type=float, help="seconds between scans")
        a(
            "--stable-seconds",
            type=float,
            help="a file counts as written once its size and mtime are unchanged this long",
        )
        a("--once", action="store_true", help="process what is there (once complete), then exit")
    else:
        a(
            "--retry-errors",
            action="store_true",
            help="also retry files that failed before and have not changed",
        )
        a(
            "--shard",
            metavar="I/N",
            help="process only part I of N (0 <= I < N) into OUT/shard-I-of-N/; "
            "join the parts with `nanomorph merge OUT`",
        )


def _in_process(parser: argparse.ArgumentParser, name: str) -> None:
    add_store(
        parser,
        "model store: a folder store or 'bentoml' (null: $NANOMORPH_STORE, else bentoml)"
        + ("" if name == "predict" else "; in-process, instead of --url"),
        was_models=True,
    )
    parser.add_argument("--tag", help="model tag (null: nanomorph-<task>:latest)")
    parser.add_argument("--providers", help="onnxruntime providers, comma list")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32"),
        help="auto: a model's int8 file (where export kept one) on CPU, fp32 on CUDA; fp32: always fp32 "
        "(null: $NANOMORPH_PRECISION, else auto)",
    )
    parser.add_argument(
        "--threads", type=int, help="onnxruntime threads (0: all cores; set it to the CPUs a cluster job got)"
    )


def _over_http(parser: argparse.ArgumentParser, name: str) -> None:
    a = parser.add_argument
    a(
        "--url",
        required=name == "client",
        help="server URL, e.g. http://localhost:3000" + ("" if name == "client" else " (instead of --store)"),
    )
    a("--token", help="bearer token (null: $NANOMORPH_TOKEN; never saved)")
    a("--concurrency", type=int, help="requests in flight")
    a("--timeout", type=float, help="seconds per request")
    a("--retries", type=int, help="retries on connection errors / 503")
    if name == "client":
        a("--wait", type=float, help="seconds to wait for the server to be ready")


def run(args: argparse.Namespace) -> int:
    from nanomorph.batch import pipelines

    return pipelines.run(args)
