#!/usr/bin/env python
"""Real-data evaluation on the DeepSEM nanowire set: pretrain on its unlabeled tiles, then a
label-efficiency study on its labeled crops with the test split by source tile.

The data (``/work/shared/data/deepsem-nanowires``; see its README): 90 SEM tiles of GaAs nanowire
arrays, 56 without labels (the pretraining pool) and 34 whose boxes were cut into 5,328 crops of
3 classes (NW 2240, Parasitic 2986, Nanospade 102). Crops of one tile are never split between
training and test (``--group-column source_image``); the pretraining tiles are disjoint from the
labeled ones.

Steps, each skipped when its output exists (rerun to resume):

1. ``WORK/unlabeled/``: links to the 56 unlabeled tiles (``image_split.csv``, ``has_labels == 0``);
2. ``nanomorph pretrain`` on them (subprocess) -> ``WORK/pretrain/backbone.safetensors``;
3. ``WORK/classification/labels.csv`` (path,label,source_image) over the crops;
4. ``nanomorph study cls`` (subprocess) -> ``WORK/study/{results.csv,summary.md,curve.png}``.

Usage::

    python scripts/eval_deepsem.py --data /work/shared/data/deepsem-nanowires --work runs/deepsem
    python scripts/eval_deepsem.py --data ... --quick      # a small CPU version (minutes)
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

QUICK = {
    "pretrain_epochs": 8,
    "labels": "1,4,16,all",
    "repeats": 2,
    "modes": "linear",
    "steps": 100,
}


def _nanomorph() -> list[str]:
    exe = Path(sys.executable).parent / "nanomorph"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "nanomorph.cli"]


def _run(argv: list[str]) -> None:
    print("+ nanomorph " + " ".join(argv), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    code = subprocess.call([*_nanomorph(), *argv], env=env)
    if code != 0:
        raise SystemExit(f"nanomorph {argv[0]} failed with exit code {code}")


def link_unlabeled(data: Path, dest: Path) -> int:
    """Links (or copies) the tiles without labels into ``dest``; returns how many."""
    split_csv = data / "image_split.csv"
    tiles = data / "nanowire_yield" / "datasets" / "NWs-8kMag-subdivided"
    if not split_csv.is_file() or not tiles.is_dir():
        raise FileNotFoundError(
            f"{data}: expected image_split.csv and nanowire_yield/datasets/NWs-8kMag-subdivided/"
        )
    dest.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(split_csv, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            if str(row["has_labels"]).strip() != "0":
                continue
            src, dst = tiles / row["image"], dest / row["image"]
            if not src.is_file():
                raise FileNotFoundError(f"{split_csv}: tile {src} is missing")
            if not dst.exists():
                try:
                    dst.symlink_to(src.resolve())
                except OSError:
                    shutil.copy2(src, dst)
            n += 1
    return n


def write_crop_labels(data: Path, dest: Path) -> int:
    """``dest/labels.csv`` with columns path,label,source_image (absolute paths); returns the rows."""
    src = data / "crops" / "labels.csv"
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    dest.mkdir(parents=True, exist_ok=True)
    rows = []
    with open(src, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            path = (data / row["crop"]).resolve()
            rows.append({"path": str(path), "label": row["label"], "source_image": row["source_image"]})
    tmp = dest / "labels.csv.tmp"
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "source_image"])
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(dest / "labels.csv")
    return len(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="the deepsem-nanowires folder")
    p.add_argument("--work", type=Path, default=Path("runs/deepsem"), help="working folder")
    p.add_argument("--quick", action="store_true", help="small settings for a CPU run of minutes")
    p.add_argument("--backbone", default="resnet18")
    p.add_argument("--method", default="simclr", choices=("simclr", "barlowtwins"))
    p.add_argument("--image-size", type=int, default=64, help="crops are ~19x39 px: upsampled to this")
    p.add_argument(
        "--crop-size", type=int, default=32, help="native-resolution pretraining crop (~object scale)"
    )
    p.add_argument("--crops-per-image", type=int, default=16)
    p.add_argument("--pretrain-epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--labels", default="1,2,4,8,16,32,all", help="labels per class grid")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--modes", default="linear,finetune")
    p.add_argument("--steps", type=int, default=200, help="fine-tuning steps per cell")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    if not args.data.is_dir():
        raise SystemExit(f"--data {args.data} does not exist")
    work = args.work

    n_tiles = link_unlabeled(args.data, work / "unlabeled")
    print(f"{n_tiles} unlabeled tiles -> {work / 'unlabeled'}")
    backbone = work / "pretrain" / "backbone.safetensors"
    if not backbone.is_file():
        _run(
            ["pretrain", "--data", str(work / "unlabeled"), "--out", str(work / "pretrain"),
             "--method", args.method, "--backbone", args.backbone, "--image-size", str(args.image_size),
             "--crop-size", str(args.crop_size), "--crops-per-image", str(args.crops_per_image),
             "--batch-size", str(args.batch_size), "--epochs", str(args.pretrain_epochs),
             "--seed", str(args.seed), "--device", args.device, "--resume"]
        )  # fmt: skip
    n_crops = write_crop_labels(args.data, work / "classification")
    print(f"{n_crops} labeled crops -> {work / 'classification' / 'labels.csv'}")
    _run(
        ["study", "cls", "--data", str(work / "classification"), "--group-column", "source_image",
         "--encoders", f"{args.method}={backbone}", "--labels-per-class", args.labels,
         "--repeats", str(args.repeats), "--modes", args.modes, "--steps", str(args.steps),
         "--scratch-steps", str(2 * args.steps), "--seed", str(args.seed), "--device", args.device,
         "--out", str(work / "study")]
    )  # fmt: skip
    print((work / "study" / "summary.md").read_text())
    print(f"curve: {work / 'study' / 'curve.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
