"""``nanomorph demo``: the default model from synthetic data (:mod:`training.demo`, imported by
``run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanomorph.cli.options import add_store

_INTS = (
    "n_per_class", "n_unlabeled", "size", "seed", "image_size", "pretrain_epochs", "pretrain_batch_size",
    "seg_tile", "cls_steps", "seg_steps",
)  # fmt: skip
_TEXTS = ("kind", "backbone", "method", "cls_mode", "pretrain_optimizer")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--out", type=Path, help="working folder (data + runs)")
    add_store(parser, "'bentoml' or a folder for the exported models")
    parser.add_argument("--name", help="tag prefix of the stored models")
    for key in _INTS:
        parser.add_argument("--" + key.replace("_", "-"), type=int, help=f"{key} of its stage")
    parser.add_argument("--pretrain-base-lr", type=float, help="base_lr of the pretrain stage")
    for key in _TEXTS:
        parser.add_argument("--" + key.replace("_", "-"), help=f"{key} of its stage")


def run(args: argparse.Namespace) -> int:
    from training import demo

    return demo.run(args)
