"""``nanomorph pretrain``: self-supervised pretraining (:mod:`training.pretrain`, imported by ``run``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from nanomorph.cli.options import add_run_policy, yes_no

# Literal here so that `nanomorph pretrain --help` does not import torch; a test checks them
# against training.ssl.PRESETS and training.pretrain.OPTIMIZER_DEFAULTS.
PRESETS = ("default", "original", "paper")
OPTIMIZERS = ("adamw", "lars", "sgd")


def add_arguments(parser: argparse.ArgumentParser, name: str) -> None:
    p = parser
    p.add_argument("--data", type=Path, help="folder of unlabeled images (read recursively)")
    p.add_argument("--out", type=Path, help="run folder to write (RUNS/NAME)")
    p.add_argument("--method", choices=["simclr", "barlowtwins"], help="self-supervised objective")
    p.add_argument("--backbone", help="timm model name, e.g. resnet18, resnet50")
    p.add_argument("--init", help="none | imagenet | PATH (safetensors or .pth/.pth.tar with a state_dict)")
    p.add_argument("--image-size", type=int, help="model input side")
    p.add_argument("--crop-size", type=int, help="native-resolution crop side before augmentation")
    p.add_argument("--crops-per-image", type=int, help="crops per image per epoch")
    p.add_argument("--batch-size", type=int, help="images per process and step")
    p.add_argument("--epochs", type=int, help="passes over the unlabeled images")
    p.add_argument("--steps-per-epoch", type=int, help="cap on steps per epoch")
    p.add_argument("--preset", choices=PRESETS, help="projector/loss settings preset")
    p.add_argument("--projector", help="projector layer sizes, e.g. 2048-128 (hidden...-output)")
    p.add_argument("--temperature", type=float, help="NT-Xent temperature (SimCLR)")
    p.add_argument("--lambda", dest="lambda_param", type=float, help="off-diagonal weight (Barlow Twins)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="optimiser (LARS from lightly)")
    p.add_argument(
        "--base-lr", type=float, help="lr = base_lr * global_batch / 256 (sgd, lars) or * sqrt(...) (adamw)"
    )
    p.add_argument("--weight-decay", type=float, help="null: sgd 5e-4, lars 1e-6, adamw 0.05")
    p.add_argument("--momentum", type=float, help="sgd / lars momentum")
    p.add_argument(
        "--warmup-epochs", type=float, help="linear warm-up, then cosine (at most 10%% of the epochs)"
    )
    p.add_argument(
        "--lr-floor",
        type=float,
        help="share of the lr the cosine ends at (0 = decays to 0; 1 with --warmup-epochs 0 = constant lr)",
    )
    p.add_argument("--scale-min", type=float, help="random resized crop: smallest area fraction")
    p.add_argument("--scale-max", type=float, help="random resized crop: largest area fraction")
    p.add_argument(
        "--ratio-max", type=float, help="random resized crop: aspect ratio in [1/r, r] (1 keeps shapes)"
    )
    p.add_argument(
        "--structured-crops",
        type=yes_no,
        metavar="true|false",
        help="draw crops only where frames carry structure (skip scale-bar strips, empty tiles)",
    )
    p.add_argument(
        "--crop-norm",
        type=yes_no,
        metavar="true|false",
        help="stretch each crop to its own intensity percentiles (else the frame's)",
    )
    p.add_argument(
        "--noise",
        type=yes_no,
        metavar="true|false",
        help="Gaussian (read-out) and Poisson (shot) noise among the augmentations",
    )
    p.add_argument(
        "--rot90",
        type=yes_no,
        metavar="true|false",
        help="random 90-degree rotations among the augmentations (false: orientation is information)",
    )
    p.add_argument(
        "--resize-first",
        type=yes_no,
        metavar="true|false",
        help="resize each crop to --image-size before the random resized crop (a zoomed view is "
        "then never sharper than what classification sees; false: views from native pixels)",
    )
    p.add_argument(
        "--local-views",
        type=int,
        help="smaller views of each crop beside the two global ones (multi-crop; 0 = none); each is "
        "compared with both global views",
    )
    p.add_argument(
        "--local-size",
        type=int,
        help="side of the local views in px (default: two thirds of --image-size; their crop area shrinks "
        "with it, so particles keep the global views' magnification)",
    )
    p.add_argument(
        "--gamma", type=float, help="gamma jitter: exponent in [1/(1+g), 1+g] (0 = none; detector response)"
    )
    p.add_argument("--quality-every", type=int, help="epochs between quality-signal measurements (0 = off)")
    p.add_argument("--quality-crops", type=int, help="fixed crops the quality signals are measured on")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        help="training arithmetic: auto = bf16 autocast on CUDA and on CPUs with AMX, else fp32",
    )
    p.add_argument("--workers", type=int, help="DataLoader workers (-1 = auto)")
    p.add_argument("--cache-mb", type=int, help="memory budget for decoded images (MiB)")
    p.add_argument("--cache-dir", type=Path, help="folder for .npy copies of decoded images")
    p.add_argument("--seed", type=int, help="fixes the crops, augmentations and initialisation")
    p.add_argument("--log-every", type=int, help="steps between step records")
    p.add_argument("--knn-k", type=int, help="neighbours of the k-NN monitor")
    p.add_argument("--monitor-labels", type=Path, help="classification folder for a k-NN accuracy monitor")
    add_run_policy(
        p,
        force_help="start over: discard what --out holds",
        resume_help="continue the run in --out from its last checkpoint",
    )


def run(args: argparse.Namespace) -> int:
    from training import pretrain

    return pretrain.run(args)
