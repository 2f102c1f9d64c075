"""The default model, built from the project's own synthetic TEM generator.

``nanomorph demo`` runs the whole pipeline a facility would run on its own data — synth, pretrain,
finetune-cls, finetune-seg, export — with settings sized for 2 CPU cores. Every stage is skipped
when its outputs exist, so a rerun (or a rerun after an interruption) only does what is missing.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from nanomorph.cli import main as cli_main

log = logging.getLogger("nanomorph.demo")


def _stage(name: str, done: Path, argv: list[str]) -> None:
    if done.exists():
        log.info("[demo] %s: done already (%s), skipping", name, done)
        return
    log.info("[demo] %s: nanomorph %s", name, " ".join(argv))
    start = time.perf_counter()
    code = cli_main(argv)
    if code != 0:
        raise RuntimeError(f"demo stage {name!r} failed with exit code {code}")
    log.info("[demo] %s: finished in %.0f s", name, time.perf_counter() - start)
    if not done.exists():  # stages without an output file of their own (export) get a marker
        done.write_text(json.dumps({"stage": name, "argv": argv, "finished": time.time()}) + "\n")


def stages(args: argparse.Namespace) -> list[tuple[str, Path, list[str]]]:
    out: Path = args.out
    data, runs = out / "data", out / "runs"
    common = ["--seed", str(args.seed)]
    return [
        # One render: the unlabeled pool comes from other seeds than the labeled images,
        # so pretraining never sees the labeled/test images.
        (
            "synth",
            data / "synth.json",
            [
                "synth",
                "--out",
                str(data),
                "--kind",
                args.kind,
                "--n-per-class",
                str(args.n_per_class),
                "--n-unlabeled",
                str(args.n_unlabeled),
                "--size",
                str(args.size),
                *common,
            ],
        ),
        (
            "pretrain",
            runs / "pretrain" / "backbone.safetensors",
            [
                "pretrain",
                "--data",
                str(data / "unlabeled"),
                "--method",
                args.method,
                "--backbone",
                args.backbone,
                "--image-size",
                str(args.image_size),
                "--batch-size",
                str(args.pretrain_batch_size),
                "--epochs",
                str(args.pretrain_epochs),
                "--optimizer",
                args.pretrain_optimizer,
                "--base-lr",
                str(args.pretrain_base_lr),
                "--out",
                str(runs / "pretrain"),
                "--resume",
                *common,
            ],
        ),
        (
            "finetune-cls",
            runs / "classifier" / "classifier.safetensors",
            [
                "finetune-cls",
                "--encoder",
                str(runs / "pretrain" / "backbone.safetensors"),
                "--data",
                str(data / "classification"),
                "--mode",
                args.cls_mode,
                "--labels-per-class",
                "all",
                "--steps",
                str(args.cls_steps),
                "--out",
                str(runs / "classifier"),
                *common,
            ],
        ),
        (
            "finetune-seg",
            runs / "segmenter" / "segmenter.safetensors",
            [
                "finetune-seg",
                "--encoder",
                str(runs / "pretrain" / "backbone.safetensors"),
                "--data",
                str(data / "segmentation"),
                "--classes",
                "background,wire",
                "--labeled-images",
                "all",
                "--tile",
                str(args.seg_tile),
                "--steps",
                str(args.seg_steps),
                "--out",
                str(runs / "segmenter"),
                *common,
            ],
        ),
        (
            "export",
            out / "exported.json",
            [
                "export",
                "--encoder",
                str(runs / "pretrain"),
                "--classifier",
                str(runs / "classifier"),
                "--segmenter",
                str(runs / "segmenter"),
                "--name",
                args.name,
                "--store",
                args.store,
            ],
        ),
    ]


def run(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> int:
    start = time.perf_counter()
    plan = stages(args)
    for index, (name, done, argv) in enumerate(plan, 1):
        log.info("[demo] stage %d/%d: %s", index, len(plan), name)
        _stage(name, done, argv)
    log.info("[demo] default model ready in %.0f s (store: %s)", time.perf_counter() - start, args.store)
    return 0
