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


Stage = tuple[str, Path, list[str]]  # (name, the file whose presence means done, nanomorph argv)


def stages(args: argparse.Namespace) -> list[Stage]:
    """The demo's stages in the order they run."""
    out: Path = args.out
    data, runs = out / "data", out / "runs"
    return [
        _synth_stage(args, data),
        _pretrain_stage(args, data, runs),
        _finetune_cls_stage(args, data, runs),
        _finetune_seg_stage(args, data, runs),
        _export_stage(args, out, runs),
    ]


def _seed(args: argparse.Namespace) -> list[str]:
    return ["--seed", str(args.seed)]


def _synth_stage(args: argparse.Namespace, data: Path) -> Stage:
    # One render: the unlabeled pool comes from other seeds than the labeled images,
    # so pretraining never sees the labeled/test images.
    argv = [
        "synth", "--out", str(data), "--kind", args.kind, "--n-per-class", str(args.n_per_class),
        "--n-unlabeled", str(args.n_unlabeled), "--size", str(args.size), *_seed(args),
    ]  # fmt: skip
    return "synth", data / "synth.json", argv


def _pretrain_stage(args: argparse.Namespace, data: Path, runs: Path) -> Stage:
    argv = [
        "pretrain", "--data", str(data / "unlabeled"), "--method", args.method, "--backbone", args.backbone,
        "--image-size", str(args.image_size), "--batch-size", str(args.pretrain_batch_size),
        "--epochs", str(args.pretrain_epochs), "--optimizer", args.pretrain_optimizer,
        "--base-lr", str(args.pretrain_base_lr), "--out", str(runs / "pretrain"), "--resume", *_seed(args),
    ]  # fmt: skip
    return "pretrain", runs / "pretrain" / "backbone.safetensors", argv


def _finetune_cls_stage(args: argparse.Namespace, data: Path, runs: Path) -> Stage:
    argv = [
        "finetune-cls", "--encoder", str(runs / "pretrain" / "backbone.safetensors"),
        "--data", str(data / "classification"), "--mode", args.cls_mode, "--labels-per-class", "all",
        "--steps", str(args.cls_steps), "--out", str(runs / "classifier"), *_seed(args),
    ]  # fmt: skip
    return "finetune-cls", runs / "classifier" / "classifier.safetensors", argv


def _finetune_seg_stage(args: argparse.Namespace, data: Path, runs: Path) -> Stage:
    argv = [
        "finetune-seg", "--encoder", str(runs / "pretrain" / "backbone.safetensors"),
        "--data", str(data / "segmentation"), "--classes", "background,wire", "--labeled-images", "all",
        "--tile", str(args.seg_tile), "--steps", str(args.seg_steps), "--out", str(runs / "segmenter"),
        *_seed(args),
    ]  # fmt: skip
    return "finetune-seg", runs / "segmenter" / "segmenter.safetensors", argv


def _export_stage(args: argparse.Namespace, out: Path, runs: Path) -> Stage:
    argv = [
        "export", "--encoder", str(runs / "pretrain"), "--classifier", str(runs / "classifier"),
        "--segmenter", str(runs / "segmenter"), "--name", args.name, "--store", args.store,
        # int8 beside fp32 when the accuracy check passes: served on CPU by default (1.8x the U-Net's speed
        # on AMX/VNNI CPUs), fp32 on CUDA (docs/service.md).
        "--quantize", "int8",
    ]  # fmt: skip
    return "export", out / "exported.json", argv


def run(args: argparse.Namespace, progress: Callable[[str], None] | None = None) -> int:
    start = time.perf_counter()
    plan = stages(args)
    for index, (name, done, argv) in enumerate(plan, 1):
        log.info("[demo] stage %d/%d: %s", index, len(plan), name)
        _stage(name, done, argv)
    log.info("[demo] default model ready in %.0f s (store: %s)", time.perf_counter() - start, args.store)
    return 0
