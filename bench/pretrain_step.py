"""Images/s of one nanomorph pretraining step vs a plain reference loop (not a timed test).

nanomorph: images on disk -> ``UnlabeledFolder`` (decoded once, cached) -> DataLoader ->
``BatchAugment`` (two views, plus ``--local-views`` small ones, pretrain's default) -> timm
backbone + lightly projector -> lightly loss -> SGD, i.e. the code ``nanomorph pretrain`` runs
(``training.pretrain.forward_step``), at the precision ``nanomorph pretrain --precision auto``
picks on this machine (bf16 autocast on CPUs with AMX) or the one given with ``--precision``.
Reference: timm resnet18 + lightly SimCLRProjectionHead + NTXentLoss + SGD on PRE-MADE view
tensors (no data loading, no augmentation), two forward passes as in lightly's examples.
Both in the same process, same batch, size and head. Prints the ratio (target >= 1.0), and
the ratio against the same reference in channels_last memory format (which nanomorph uses on every
device), i.e. the share of the step the data side still costs.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/pretrain_step.py --image-size 96 --batch-size 32
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, RandomSampler


def _write_images(folder: Path, n: int, size: int) -> None:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n):
        img = rng.normal(90, 12, (size, size))
        for _ in range(8):
            cy, cx, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(4, size / 8)]
            img[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] += 100
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def _default_local_views() -> int:
    """``nanomorph pretrain``'s default, so the bench measures what a user runs unless told otherwise."""
    from nanomorph.config import yaml_defaults

    return int(yaml_defaults("pretrain")["local_views"])


def _images_per_s(
    loss_fn: Callable[[], torch.Tensor], opt: torch.optim.Optimizer, args: argparse.Namespace
) -> float:
    """Median images/s of ``args.steps`` timed training steps (loss, backward, optimiser step)
    after ``args.warmup`` untimed ones; the batch fetch inside ``loss_fn`` is timed too."""
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return args.batch_size / float(np.median(times))


def bench_nanomorph(data: Path, args: argparse.Namespace) -> float:
    from nanomorph.contract import Contract
    from training.augment import AugmentConfig, BatchAugment
    from training.backbones import create_backbone
    from training.data import UnlabeledFolder
    from training.device import pick_precision
    from training.pretrain import (
        build_optimizer,
        build_ssl_model,
        default_local_size,
        forward_step,
        local_recipe,
    )
    from training.ssl import SSLLoss, resolve_config

    torch.manual_seed(0)
    ds = UnlabeledFolder(data, args.image_size, Contract(image_size=args.image_size))
    ds.preload()
    loader = DataLoader(ds, args.batch_size, sampler=RandomSampler(ds), drop_last=True, num_workers=0)
    cfg = resolve_config("simclr", projector="512-128")
    model = build_ssl_model(create_backbone(args.backbone), cfg, torch.device("cpu"))
    criterion = SSLLoss(cfg)
    recipe = AugmentConfig(image_size=args.image_size)
    augment = BatchAugment(recipe)
    local_size = default_local_size(args.image_size)
    local = BatchAugment(local_recipe(recipe, local_size)) if args.local_views else None
    opt = build_optimizer(model, "sgd", 0.03, 5e-4, 0.9)
    batches = itertools.cycle(loader)
    bf16 = pick_precision(args.precision, torch.device("cpu")) == "bf16"
    return _images_per_s(
        lambda: forward_step(model, criterion, augment, next(batches), bf16, local, args.local_views)[1],
        opt,
        args,
    )


def bench_reference(args: argparse.Namespace, channels_last: bool = False) -> float:
    import timm
    from lightly.loss import NTXentLoss
    from lightly.models.modules.heads import SimCLRProjectionHead

    torch.manual_seed(0)
    backbone = timm.create_model(args.backbone, in_chans=1, num_classes=0)
    head = SimCLRProjectionHead(backbone.num_features, 512, 128)
    criterion = NTXentLoss()
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.SGD(params, lr=0.03, momentum=0.9, weight_decay=5e-4)
    v0 = torch.rand(args.batch_size, 1, args.image_size, args.image_size)
    v1 = torch.rand(args.batch_size, 1, args.image_size, args.image_size)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
        v0 = v0.contiguous(memory_format=torch.channels_last)
        v1 = v1.contiguous(memory_format=torch.channels_last)
    return _images_per_s(lambda: criterion(head(backbone(v0)), head(backbone(v1))), opt, args)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--source-size", type=int, default=256, help="side of the images on disk")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternate ours/reference this many times")
    parser.add_argument("--precision", default="auto", help="nanomorph's --precision: auto | fp32 | bf16")
    parser.add_argument(
        "--local-views",
        type=int,
        default=_default_local_views(),
        help="nanomorph's --local-views (at its default side, 2/3 of --image-size): work per step the two-view "
        "reference does not do; default: pretrain's own default (%(default)s), 0 for the two-view recipe",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        _write_images(data, max(2 * args.batch_size, 64), args.source_size)
        ours, ref, ref_cl = [], [], []
        for _ in range(args.rounds):  # alternate, so load from other processes hits both alike
            ours.append(bench_nanomorph(data, args))
            ref.append(bench_reference(args))
            ref_cl.append(bench_reference(args, channels_last=True))
    o, r, rc = max(ours), max(ref), max(ref_cl)
    from training.device import pick_precision

    precision = pick_precision(args.precision, torch.device("cpu"))
    print(
        f"{args.backbone} ({precision}) image {args.image_size} batch {args.batch_size} threads {torch.get_num_threads()}"
        f"{f' local views {args.local_views}' if args.local_views else ''}: "
        f"nanomorph {o:.1f} images/s, reference {r:.1f} images/s, ratio {o / r:.2f}\n"
        f"  the reference in channels_last, as nanomorph runs: {rc:.1f} images/s; nanomorph / that "
        f"{o / rc:.2f} (the share of the step data loading and augmentation still cost shows as < 1)"
    )


if __name__ == "__main__":
    main()
