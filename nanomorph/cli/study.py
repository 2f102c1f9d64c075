"""``nanomorph study cls|seg``: label-efficiency study (:mod:`training.study`, imported by ``run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanomorph.cli.finetune_cls import add_tiling_arguments
from nanomorph.cli.options import Repeatable


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    a = parser.add_argument
    a(
        "task",
        choices=("cls", "seg"),
        help="cls: classification over labels per class; seg: segmentation over labeled images",
    )
    a("--data", type=Path, help="cls: classification folder; seg: folder with images/ and masks/")
    a(
        "--encoders",
        "--encoder",
        dest="encoders",
        action=Repeatable,
        help="name=SOURCE[,other=SOURCE...], repeatable; SOURCE: RUNS/X, its backbone.safetensors, "
        "imagenet[@ARCH] or a checkpoint file[@ARCH] (docs/encoders.md); scratch is always added",
    )
    a("--labels-per-class", type=str, help="cls grid, e.g. 1,2,4,8,all")
    a("--labeled-images", type=str, help="seg grid, e.g. 1,2,4,all")
    a("--repeats", type=int, help="repeat r uses seed + r: its own test split and labeled subsets")
    a("--modes", help="cls: linear,finetune (null: both); seg: frozen,finetune (null: both)")
    a("--seed", type=int, help="seed of repeat 0")
    a("--val-fraction", type=float, help="of the labeled images")
    a("--test-fraction", type=float, help="held-out share, drawn first")
    a("--group-column", help="cls: labels.csv column; a group never straddles train/test")
    a("--image-size", type=int, help="cls: null = the first encoder's contract")
    a("--arch", help="scratch baseline architecture (null: the first encoder's)")
    a("--steps", type=int, help="cls fine-tuning steps (null: finetune-cls's)")
    a("--scratch-steps", type=int, help="cls fine-tuning steps from random init (null: finetune-cls's)")
    a("--batch-size", type=int, help="cls batch size (null: finetune-cls's)")
    add_tiling_arguments(parser)
    a("--eval-every", type=int, help="cls steps between validations (null: finetune-cls's)")
    a("--classes", help="seg: class names, background first")
    a("--tile", type=int, help="seg: tile size (null: finetune-seg's)")
    a("--seg-steps", type=int, help="seg: training steps per cell (null: finetune-seg's)")
    a("--device", help="auto | cpu | cuda | cuda:N")
    a("--out", type=Path, help="study folder")


def run(args: argparse.Namespace) -> int:
    from training import study

    return study.run(args)
