"""``nanomorph export``: runs to ONNX, into the model store (:mod:`training.export`, imported by ``run``)."""

from __future__ import annotations

import argparse

from nanomorph.cli.options import add_run_policy, add_store


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    a = parser.add_argument
    a("--encoder", help="pretraining run RUNS/X (backbone.safetensors): the embed model")
    a("--classifier", help="classifier run RUNS/Y: the classify model")
    a("--segmenter", help="segmenter run RUNS/Z: the segment model")
    a("--name", help="tag prefix: <name>-<task>:<version>")
    a("--version", help="version of the tags (null: UTC time + random)")
    add_store(parser, "'bentoml' or a folder (null: $NANOMORPH_STORE or bentoml)")
    a(
        "--quantize",
        choices=("none", "int8"),
        help="int8: static quantisation of classify and segment for CPU (kept beside fp32 if accurate)",
    )
    a("--max-accuracy-drop", type=float, help="refuse int8 above this drop (0.01 = 1 point)")
    a("--tolerance", type=float, help="max abs diff onnxruntime vs PyTorch")
    a("--data", help="images for the parity check / int8 accuracy (null: the runs' data)")
    add_run_policy(
        parser,
        force_help="export again even if these runs are already stored",
        resume_help=None,  # an export has no run folder to resume: it reads runs, writes the store
    )


def run(args: argparse.Namespace) -> int:
    from training import export

    return export.run(args)
