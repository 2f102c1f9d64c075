#!/usr/bin/env python
"""Particle instances on real EM (EMPS): connected components of a semantic mask vs the instance method.

EMPS (``/work/shared/data/emps-train``; Yildirim & Cole, J. Chem. Inf. Model. 2021): RGB PNGs in
``images/``, uint16 instance maps in ``segmaps/``, ``metadata.csv`` (filename, doi). Images of one
paper (doi) never straddle splits: dois are shuffled with ``--seed`` and taken in that order into
test, then val, until each holds its share of the images; the rest is train. The split is written
to ``WORK/split.json`` (and can be committed).

Per cell (method x encoder x number of labelled images), ``finetune-seg`` (the Python API) trains on
``WORK/data`` (train + val images; masks = ids > 0; ``instances/`` = the id maps), its own held-out
part for model selection, then the doi-test images are segmented here with the same
post-processing as ``predict`` and the service (``nanomorph.particles.segment_probs``):

* ``cc``: a 2-class U-Net (``--instances off``), particles = connected components of its mask;
* ``cc-chosen``: the same U-Net (trained once for both), its connected components after a smoothing
  and a minimum particle area chosen here on the run's own held-out images by mean AP@0.5 (the
  instance method gets the same choice in ``finetune-seg``, so this is the fair comparison);
* ``instance``: the U-Net with a boundary class, particles = seeded watershed, its smoothing, seed
  threshold and minimum areas chosen by ``finetune-seg`` on that held-out part (``--tune-instances``,
  the default; never on the doi-test images).

Metrics on the test images (per image, then mean / median over images): instance AP at IoU 0.5 and
0.75 (one-to-one matches; TP / (TP + FP + FN)), |count error| / true count, |median diameter error|
/ true median (equivalent circular diameter; particles touching the frame left out on both sides).
One row per cell in ``WORK/results.csv``, one per cell and test image in ``WORK/per_image.csv``.
``--retune`` re-chooses an instance run's post-processing on its validation images over today's grid
(the run stays as saved) and writes ``results-retuned.csv`` / ``per_image-retuned.csv``.

Usage::

    nice -n 15 python scripts/eval_particles.py --data /work/shared/data/emps-train --work runs/emps \\
        --cells instance:scratch:all,cc:scratch:all --steps 300
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanomorph.particles import (  # noqa: E402
    InstanceParams,
    average_precision,
    connected_instances,
    fold_mask,
    match_instances,
    particle_table,
    segment_probs,
    summarize,
)

# What ``cc-chosen`` chooses from: the instance method's smoothings (training.seg_instances.TUNING_GRID)
# and minimum particle areas over its range (8-2,048 px, more finely), plus no minimum at all.
CC_SMOOTHING = (0.0, 1.0, 2.0)
CC_MIN_AREAS = (1, 8, 32, 64, 128, 256, 512, 1024, 2048)

log = logging.getLogger("eval_particles")
FIELDS = (
    "method", "encoder", "labels", "n_test", "ap50_mean", "ap75_mean", "count_err_median",
    "diam_err_median", "ap50_pooled", "ap75_pooled", "train_seconds", "steps", "date",
)  # fmt: skip
# One row per cell and test image in WORK/per_image.csv (per_image-retuned.csv with --retune): where a cell fails, not only how much.
IMAGE_FIELDS = (
    "method", "encoder", "labels", "image", "height", "width", "count_true", "count_pred", "ap50", "ap75",
    "count_err", "diam_true_px", "diam_pred_px", "diam_err",
)  # fmt: skip


def make_split(data: Path, seed: int, test: float, val: float) -> dict[str, list[str]]:
    """Train / val / test filenames, grouped by doi, deterministic for a seed."""
    rows = list(csv.DictReader((data / "metadata.csv").read_text().splitlines()))
    by_doi: dict[str, list[str]] = {}
    for r in rows:
        by_doi.setdefault(r["doi"], []).append(r["filename"])
    dois = sorted(by_doi)
    order = [dois[i] for i in np.random.default_rng(seed).permutation(len(dois))]
    n = len(rows)
    split: dict[str, list[str]] = {"test": [], "val": [], "train": []}
    for doi in order:
        name = "test" if len(split["test"]) < test * n else "val" if len(split["val"]) < val * n else "train"
        split[name].extend(by_doi[doi])
    return {k: sorted(v) for k, v in split.items()}


def prepare(data: Path, work: Path, split: dict[str, list[str]]) -> Path:
    """``WORK/data/{images,masks,instances}`` for train + val (links to images, derived masks)."""
    from PIL import Image

    root = work / "data"
    for sub in ("images", "masks", "instances"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name in split["train"] + split["val"]:
        img, ids = root / "images" / name, root / "instances" / name
        if not img.exists():
            img.symlink_to((data / "images" / name).resolve())
        if not ids.exists():
            ids.symlink_to((data / "segmaps" / name).resolve())
        mask = root / "masks" / name
        if not mask.exists():
            arr = np.asarray(Image.open(data / "segmaps" / name))
            Image.fromarray((arr > 0).astype(np.uint8)).save(mask)
    return root


def train_cell(
    root: Path, work: Path, method: str, encoder: str, labels: str, args: argparse.Namespace
) -> Path:
    from training.finetune_seg import train_segmenter

    method = "cc" if method == "cc-chosen" else method  # one U-Net for both ways of counting
    out = work / "runs" / f"{method}_{Path(encoder).name if encoder != 'scratch' else 'scratch'}_{labels}"
    if (out / "segmenter.safetensors").is_file():  # trained by an earlier cell (or run) of this work folder
        import yaml

        trained = json.loads((out / "metrics.json").read_text())["train"]
        scale = yaml.safe_load((out / "config.yaml").read_text()).get("encoder_lr_scale")
        wanted_scale = scale if args.encoder_lr_scale is None else args.encoder_lr_scale
        if (trained["steps"], trained["tile"], scale) != (args.steps, args.tile, wanted_scale):
            raise SystemExit(
                f"{out} holds a U-Net of {trained['steps']} steps of {trained['tile']} px tiles, encoder lr "
                f"scale {scale}, not --steps {args.steps} --tile {args.tile} --encoder-lr-scale "
                f"{wanted_scale}: use another --work folder or remove it"
            )
        return out
    train_segmenter(
        {
            "data": str(root), "classes": "background,particle", "encoder": encoder, "arch": "resnet18",
            "labeled_images": labels, "instances": "off" if method == "cc" else "on", "tile": args.tile,
            "steps": args.steps, "batch_size": args.batch_size, "test_fraction": 0.01, "val_fraction": 0.1,
            "max_val_evals": 2, "overlays": 2, "seed": args.seed, "out": str(out), "device": "cpu",
            "checkpoint_every_s": 120, "invert_fraction": args.invert_fraction,
            **({} if args.encoder_lr_scale is None else {"encoder_lr_scale": args.encoder_lr_scale}),
        }
    )  # fmt: skip
    return out


def cc_instances(probs: np.ndarray, smoothing: float, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, instances)``: connected components of the argmax of smoothed probabilities."""
    from scipy import ndimage as ndi

    if smoothing > 0:
        probs = ndi.gaussian_filter(np.asarray(probs, np.float32), (0, smoothing, smoothing))
    mask = fold_mask(probs, None)
    return mask, connected_instances(mask, min_area)


def run_probs(segmenter: tuple[Any, dict[str, str]], folder: Path, names: list[str]) -> Any:
    """``(name, probabilities)`` of each image, segmented by a run's ``load_segmenter`` (U-Net,
    metadata) as ``predict`` does."""
    import torch

    from nanomorph.contract import Contract, read_image
    from training.finetune_seg import segment_image

    torch.set_num_threads(max(1, torch.get_num_threads()))
    unet, meta = segmenter
    contract = Contract.from_json(meta["contract"])
    for name in names:
        raw, _ = read_image(folder / name)
        yield name, segment_image(unet, raw, contract, "cpu")[1]


def val_names(run: Path) -> list[str]:
    """File names of the images a run held out for its own model selection (its val split)."""
    return [f"{stem}.png" for stem in json.loads((run / "metrics.json").read_text())["split"]["val"]]


def choose_cc(run: Path, segmenter: tuple[Any, dict[str, str]], root: Path) -> tuple[float, int]:
    """Smoothing and minimum area with the best mean AP@0.5 on the run's held-out (val) images."""
    from PIL import Image

    val = val_names(run)
    combos = [(s, a) for s in CC_SMOOTHING for a in CC_MIN_AREAS]
    totals = dict.fromkeys(combos, 0.0)
    for name, probs in run_probs(segmenter, root / "images", val):
        truth = np.asarray(Image.open(root / "instances" / name)).astype(np.int64)
        for smoothing in CC_SMOOTHING:
            _, base = cc_instances(probs, smoothing, 1)
            for area in CC_MIN_AREAS:
                inst = connected_instances(base > 0, area) if area > 1 else base
                totals[(smoothing, area)] += average_precision(match_instances(truth, inst), 0.5)["ap"]
    best = max(combos, key=lambda c: totals[c])
    log.info("cc-chosen on %d val images: smoothing %s, min area %d (val AP@0.5 %.3f; none %.3f)",
             len(val), *best, totals[best] / len(val), totals[(0.0, 1)] / len(val))  # fmt: skip
    return best


def retune(run: Path, segmenter: tuple[Any, dict[str, str]], root: Path) -> tuple[Any, dict[str, str]]:
    """The segmenter with its instance post-processing chosen again on the run's held-out (val)
    images by ``finetune-seg``'s own choice (``tune_instances``) over today's grid; the run's files
    are left as they are."""
    from PIL import Image

    from training.seg_instances import tune_instances

    unet, meta = segmenter
    base = InstanceParams.from_dict(meta.get("instances"))
    if base is None:
        raise SystemExit(f"{run} is not an instance model: nothing to retune")
    val = val_names(run)
    pairs = (
        (probs, np.asarray(Image.open(root / "instances" / name)).astype(np.int64))
        for name, probs in run_probs(segmenter, root / "images", val)
    )
    tuning = tune_instances(pairs, base)
    log.info("retuned on %d val images: %s", len(val), json.dumps(tuning.to_dict()))
    return unet, {**meta, "instances": json.dumps(tuning.params.to_dict())}


def evaluate_run(
    segmenter: tuple[Any, dict[str, str]],
    data: Path,
    test: list[str],
    limit: int | None,
    cc: tuple[float, int] | None = None,
) -> dict[str, Any]:
    """Segments the doi-test images with a run's U-Net and scores the particles (``cc``: the
    connected components of ``cc_instances`` with that smoothing and minimum area instead of the
    model's own post-processing)."""
    from PIL import Image

    meta = segmenter[1]
    classes = json.loads(meta["classes"])
    params = InstanceParams.from_dict(meta.get("instances"))
    ap50, ap75, cerr, derr = [], [], [], []
    per_image: list[dict[str, Any]] = []
    tp50 = fp50 = fn50 = tp75 = fp75 = fn75 = 0.0
    for name, probs in run_probs(segmenter, data / "images", test[:limit]):
        truth = np.asarray(Image.open(data / "segmaps" / name)).astype(np.int64)
        if cc is None:
            mask, inst, sem = segment_probs(probs, classes, params)
        else:
            (mask, inst), sem = cc_instances(probs, *cc), list(classes)
        iou = match_instances(truth, inst)
        a50, a75 = average_precision(iou, 0.5), average_precision(iou, 0.75)
        ap50.append(a50["ap"])
        ap75.append(a75["ap"])
        tp50, fp50, fn50 = tp50 + a50["tp"], fp50 + a50["fp"], fn50 + a50["fn"]
        tp75, fp75, fn75 = tp75 + a75["tp"], fp75 + a75["fp"], fn75 + a75["fn"]
        st = summarize(
            particle_table(truth, (truth > 0).astype(np.uint8), ["background", "particle"]), truth.shape
        )
        sp = summarize(particle_table(inst, mask, sem), truth.shape)
        image = {"image": name, "height": truth.shape[0], "width": truth.shape[1], "count_true": st["count"],
                 "count_pred": sp["count"], "ap50": a50["ap"], "ap75": a75["ap"],
                 "diam_true_px": st["diameter_median"], "diam_pred_px": sp["diameter_median"]}  # fmt: skip
        if st["count"]:
            image["count_err"] = abs(sp["count"] - st["count"]) / st["count"]
            image["diam_err"] = (
                abs(sp["diameter_median"] - st["diameter_median"]) / st["diameter_median"]
                if sp["diameter_median"] is not None
                else 1.0  # no particle found: the whole size is wrong
            )
            cerr.append(image["count_err"])
            derr.append(image["diam_err"])
        per_image.append(image)
    return {
        "n_test": len(ap50),
        "ap50_mean": float(np.mean(ap50)),
        "ap75_mean": float(np.mean(ap75)),
        "count_err_median": float(np.median(cerr)) if cerr else None,
        "diam_err_median": float(np.median(derr)) if derr else None,
        "ap50_pooled": tp50 / max(1, tp50 + fp50 + fn50),
        "ap75_pooled": tp75 / max(1, tp75 + fp75 + fn75),
        "per_image": per_image,
    }


def append_rows(path: Path, fields: tuple[str, ...], rows: list[dict[str, Any]]) -> None:
    """Appends ``rows`` to the CSV at ``path`` (header first when the file is new); floats to 4 places."""
    new = not path.is_file()
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(fields), extrasaction="ignore")
        if new:
            w.writeheader()
        for row in rows:
            w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})


def pretrain(work: Path, data: Path, split: dict[str, list[str]], flags: str) -> Path:
    """``nanomorph pretrain`` on the train images only (subprocess, its defaults plus ``flags``); the
    backbone file. Never on val / test images, not even unlabeled."""
    import subprocess

    unl = work / "unlabeled"
    unl.mkdir(parents=True, exist_ok=True)
    for name in split["train"]:
        link = unl / name
        if not link.exists():
            link.symlink_to((data / "images" / name).resolve())
    out = work / "pretrain"
    if not (out / "backbone.safetensors").is_file():
        cmd = [sys.executable, "-m", "nanomorph.cli", "pretrain", "--data", str(unl), "--out", str(out),
               "--backbone", "resnet18", *flags.split()]  # fmt: skip
        log.info("pretraining: %s", " ".join(cmd))
        subprocess.run(cmd, check=True, cwd=ROOT)
    return out / "backbone.safetensors"


def replace_cell_rows(path: Path, key: dict[str, str], rows: list[dict[str, Any]]) -> None:
    """Writes one cell's per-image ``rows`` to ``path`` in place of any it held for that cell (a cell
    scored again after an interruption, or re-scored, is never listed twice)."""
    kept = []
    if path.is_file():
        kept = [
            r for r in csv.DictReader(path.read_text().splitlines()) if any(r[k] != v for k, v in key.items())
        ]
    tmp = path.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    append_rows(tmp, IMAGE_FIELDS, kept + rows)
    tmp.replace(path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--cells", default="instance:scratch:all,cc:scratch:all",
                   help="method:encoder:labels,... (method cc|cc-chosen|instance, encoder scratch|ssl, labels N|all)")  # fmt: skip
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument(
        "--invert-fraction", type=float, default=0.0, help="share of training tiles with inverted intensity"
    )
    p.add_argument(
        "--encoder-lr-scale",
        type=float,
        default=None,
        help="finetune-seg's learning-rate factor of a pretrained encoder (default: finetune-seg's own); "
        "use a fresh --work folder per value",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--pretrain-flags",
        default="--epochs 30 --image-size 128 --crop-size 128 --crops-per-image 8 --batch-size 64",
        help="flags of the ssl cells' `nanomorph pretrain` (default: native scale, the segmentation's)",
    )
    p.add_argument("--test-limit", type=int, default=None, help="score only the first N test images")
    p.add_argument(
        "--retune",
        action="store_true",
        help="instance cells: choose the post-processing again on the run's validation images with today's "
        "grid (training.seg_instances.TUNING_GRID) before scoring, written to results-retuned.csv and "
        "per_image-retuned.csv; for runs trained before the grid grew",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    split = make_split(args.data, args.seed, 0.15, 0.15)
    (args.work / "split.json").write_text(json.dumps({"seed": args.seed, **split}, indent=1) + "\n")
    log.info("split by doi: %s", {k: len(v) for k, v in split.items()})
    root = prepare(args.data, args.work, split)
    suffix = "-retuned" if args.retune else ""  # retuned scores never mix with the stored choice's
    results = args.work / f"results{suffix}.csv"
    done = (
        {(r["method"], r["encoder"], r["labels"]) for r in csv.DictReader(results.read_text().splitlines())}
        if results.is_file()
        else set()
    )
    from training.finetune_seg import load_segmenter

    for cell in args.cells.split(","):
        method, enc, labels = cell.split(":")
        if (method, enc, labels) in done:
            continue
        encoder = (
            str(pretrain(args.work, args.data, split, args.pretrain_flags)) if enc == "ssl" else "scratch"
        )
        t0 = time.perf_counter()
        run = train_cell(root, args.work, method, encoder, labels, args)
        segmenter = load_segmenter(run)  # once: the choice and the test share it
        cc = choose_cc(run, segmenter, root) if method == "cc-chosen" else None
        if args.retune and method == "instance":
            segmenter = retune(run, segmenter, root)
        metrics = json.loads((run / "metrics.json").read_text())
        key = {"method": method, "encoder": enc, "labels": labels}
        scores = evaluate_run(segmenter, args.data, split["test"], args.test_limit, cc)
        images = [{**key, **image} for image in scores.pop("per_image")]
        row = {**key, **scores, "train_seconds": metrics["train"]["seconds"], "steps": metrics["train"]["steps"],
               "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}  # fmt: skip
        log.info("%s (%.0f s): %s", cell, time.perf_counter() - t0, row)
        replace_cell_rows(
            args.work / f"per_image{suffix}.csv", key, images
        )  # before results.csv marks the cell done
        append_rows(results, FIELDS, [row])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
