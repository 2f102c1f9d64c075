"""``nanomorph finetune-cls``: few-label classification (:mod:`training.finetune_cls`, imported by
``run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanomorph.cli.options import add_run_policy, auto_or_bool, float_list


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    a = parser.add_argument
    a(
        "--encoder",
        help="RUNS/X/backbone.safetensors, RUNS/X, scratch, imagenet[@ARCH] or a checkpoint file[@ARCH] "
        "(CEM500K MoCoV2, DINOv2/timm; docs/encoders.md)",
    )
    a("--arch", help="timm architecture for --encoder scratch")
    a("--data", type=Path, help="classification folder (<class>/ or labels.csv); required")
    a("--mode", choices=("linear", "finetune"), help="linear: frozen encoder; finetune: LP-FT")
    a("--labels-per-class", type=str, help="K or 'all'")
    a("--val-fraction", type=float, help="of the labeled images, per class")
    a("--test-fraction", type=float, help="drawn first, fixed by the seed")
    a("--group-column", help="labels.csv column grouping images for the test split")
    a("--seed", type=int, help="fixes the splits and the initialisation")
    a("--image-size", type=int, help="null: the encoder's contract")
    add_tiling_arguments(parser)
    a("--batch-size", type=int, help="images per step")
    a(
        "--linear-weight-decays",
        type=float_list,
        help="linear probe: L2 strengths tried on validation, comma list",
    )
    a(
        "--linear-default-weight-decay",
        type=float,
        help="linear probe: L2 strength without a validation split",
    )
    a("--linear-iters", type=int, help="linear probe: LBFGS iterations")
    a("--steps", type=int, help="fine-tuning steps (pretrained encoder)")
    a("--scratch-steps", type=int, help="fine-tuning steps from random init")
    a("--head-lr", type=float, help="fine-tuning: head learning rate")
    a("--encoder-lr", type=float, help="fine-tuning: encoder learning rate (pretrained)")
    a("--scratch-encoder-lr", type=float, help="fine-tuning: encoder learning rate (from random init)")
    a("--weight-decay", type=float, help="fine-tuning: AdamW weight decay")
    a("--eval-every", type=int, help="steps between validation checks (model selection)")
    a("--augment", action=argparse.BooleanOptionalAction, help="flips/rotations when fine-tuning")
    a(
        "--freeze-bn",
        type=auto_or_bool,
        metavar="auto|true|false",
        help="frozen BatchNorm statistics; auto: for pretrained encoders, not for scratch",
    )
    a("--device", help="auto | cpu | cuda | cuda:N")
    add_run_policy(
        parser,
        force_help="redo a run that already finished in --out",
        resume_help=None,  # no checkpoint: an interrupted run starts again (a few minutes at most)
    )
    a("--out", type=Path, help="run folder RUNS/Y; required")


def add_tiling_arguments(parser: argparse.ArgumentParser) -> None:
    """The classification tiling flags (shared with ``study cls``); docs/encoders.md."""
    g = parser.add_argument_group(
        "frames at the encoder's scale",
        "large images are cut into native-resolution tiles, each resized to the model input, and the "
        "tile probabilities averaged; K counts images, every tile of a labeled image trains",
    )
    g.add_argument(
        "--cls-tile",
        type=int,
        help="tile side in native pixels (0: whole image resized, as before); "
        "null: the pretraining run's crop_size with --encoder RUN, else 0",
    )
    g.add_argument("--cls-stride", type=int, help="pixels between tiles (null: the tile)")
    g.add_argument(
        "--cls-pixel-size",
        type=float,
        help="nm per pixel the tile size refers to: images whose metadata give another pixel size get "
        "tiles of the same nm (null: none, tiles in pixels)",
    )
    g.add_argument(
        "--cls-min-std",
        type=float,
        help="tiles of a normalised image with intensity std below this are skipped (null/0: none)",
    )


def run(args: argparse.Namespace) -> int:
    from training import finetune_cls

    return finetune_cls.run(args)
