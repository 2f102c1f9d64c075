"""``nanomorph finetune-seg``: few-label segmentation (:mod:`training.finetune_seg`, imported by
``run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanomorph.cli.options import add_run_policy


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    a = parser.add_argument
    a("--encoder", help="RUNS/X/backbone.safetensors, a run folder, or 'scratch'")
    a("--arch", help="timm architecture for 'scratch' (null: resnet18); must match a backbone")
    a("--data", type=Path, help="folder with images/ and masks/ (same stems, integer masks); required")
    a("--classes", help="comma-separated class names, background first (null: read from synth.json)")
    a("--labeled-images", help="number K of labeled images to train on, or 'all'")
    a("--freeze-encoder", action=argparse.BooleanOptionalAction, help="keep the encoder fixed (decoder only)")
    a("--tile", type=int, help="tile side in pixels (multiple of 32)")
    a("--tile-overlap", type=int, help="sliding-window overlap (null: tile/4)")
    a("--test-fraction", type=float, help="held-out share of the images")
    a("--val-fraction", type=float, help="share of the labeled images for validation")
    a("--seed", type=int, help="fixes the splits, the tiles and the initialisation")
    a("--epochs", type=int, help="passes over the labeled area (in tiles)")
    a("--steps", type=int, help="optimizer steps (overrides --epochs)")
    a("--batch-size", type=int, help="tiles per step")
    a("--lr", type=float, help="decoder learning rate (AdamW)")
    a(
        "--encoder-lr-scale",
        type=float,
        help="encoder lr = lr x this (pretrained); 1 measured at least as good as 0.1 at 8-310 labelled images",
    )
    a(
        "--decoder-warmup",
        type=float,
        help="share of steps training the decoder alone before a pretrained encoder is unfrozen",
    )
    a("--weight-decay", type=float, help="AdamW weight decay")
    a("--fg-fraction", type=float, help="share of tiles centred on foreground")
    a(
        "--invert-fraction",
        type=float,
        help="share of tiles with inverted intensity (1 - x): for sets mixing dark and bright particles",
    )
    a("--dice-weight", type=float, help="loss = CE + this x soft Dice")
    a("--max-val-evals", type=int, help="validations during training (at most)")
    a("--overlays", type=int, help="test images to save as overlay PNGs")
    a("--device", help="auto, cpu or cuda[:N]")
    a(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        help="training arithmetic: auto = bf16 autocast on CUDA and on CPUs with AMX, else fp32",
    )
    a("--workers", type=int, help="data loader workers (0 = in process)")
    a("--infer-batch-size", type=int, help="tiles per inference batch")
    a(
        "--instances",
        help="auto: train instance-aware (boundary class + watershed) when DATA/instances/ exists; off: never",
    )
    a(
        "--tune-instances",
        action=argparse.BooleanOptionalAction,
        help="instance models: choose the watershed's smoothing, seed threshold and minimum areas on the "
        "validation images (best mean AP@0.5)",
    )
    a("--save-model", action=argparse.BooleanOptionalAction, help="write segmenter.safetensors")
    a("--keep-checkpoint", action=argparse.BooleanOptionalAction, help="keep checkpoint.pt when done")
    a("--checkpoint-every-s", type=float, help="seconds between checkpoints")
    a("--out", type=Path, help="run folder")
    add_run_policy(
        parser,
        force_help="retrain even if --out holds a run (formerly --overwrite)",
        resume_help=None,  # an interrupted run resumes from checkpoint.pt by itself (training.runs)
    )


def run(args: argparse.Namespace) -> int:
    from training import finetune_seg

    return finetune_seg.run(args)
