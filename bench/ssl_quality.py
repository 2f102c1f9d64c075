#!/usr/bin/env python
"""Does pretraining pay off on real frames? ``nanomorph pretrain`` (its defaults) vs a plain
reference loop (timm + lightly, written below) vs random init, on the same frames and the same
optimiser-step budget (``--plain-match-cpu``: the loop gets the CPU seconds nanomorph's run took, the
issue's same-budget comparison), then identical linear-probe splits. Not a test: it prints measured numbers.

Data: the EMPS particle set (``images/``, ``segmaps/`` instance maps, ``metadata.csv`` with the
source paper's doi). All frames are used WITHOUT labels for pretraining. The downstream task is
frame classification, spheres vs rods, the question a real TEM set asks: a frame's
label comes from its instance map (median aspect ratio of the particles that do not touch the
border: <= 1.25 spheres, >= 1.8 rods; other frames and frames with < 3 particles are not
labelled). Splits are by paper (doi), K labelled frames per class, test = the rest of the papers.

Or the DeepSEM nanowire set (real SEM; detected by its ``crops/labels.csv``): the 90 tiles unlabeled
for pretraining, and one task, ``crop-class``: the class of each labelled box (NW / Parasitic /
Nanospade), seen as the ``--crop-size`` window centred on it, K boxes per class, split by source tile.
Use it at its object scale, e.g. ``--crop-size 32 --image-size 64``.

Every encoder sees a frame the same way: tiles of ``--crop-size`` native px resized to
``--image-size`` (the pretraining scale), frame-normalised by the preprocessing contract; the
frame's feature is the mean of its tile embeddings; a class-balanced logistic regression on K
frames per class is scored by balanced accuracy on the test papers.

Usage::

    python bench/ssl_quality.py --data ../shared/data/emps-train --work runs/ssl_quality
    python bench/ssl_quality.py ... --steps 60 --splits 5        # a quicker look

Re-running reuses finished pretraining runs (their folders under ``--work``); delete a folder to train it again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nanomorph.contract import Contract, normalise, read_image, resize  # noqa: E402
from training.finetune_cls import fit_linear_head, recalibrate_batchnorm  # noqa: E402
from training.metrics import balanced_accuracy  # noqa: E402
from training.splits import make_split  # noqa: E402

SPHERE_MAX_AR, ROD_MIN_AR, MIN_PARTICLES = 1.25, 1.8, 3
CROPS_PER_FRAME = 8  # nanomorph pretrain --crops-per-image of every run


# ---------------------------------------------------------------------------------------------
# data


def whole_particles(seg: np.ndarray) -> list[Any]:
    """Region properties of the particles of an instance map that lie wholly inside it (not
    touching its border), with at least 30 px and a measurable minor axis."""
    from skimage.measure import regionprops

    h, w = seg.shape
    return [
        r
        for r in regionprops(seg)
        if r.area >= 30
        and r.axis_minor_length >= 1
        and min(r.bbox[:2]) > 0
        and r.bbox[2] < h
        and r.bbox[3] < w
    ]


def frame_labels(root: Path) -> dict[str, dict[str, tuple[str, str]]]:
    """Two frame-level tasks from the instance maps, ``{task: {filename: (label, doi)}}``:

    * ``shape``: spheres (median aspect ratio <= 1.25) vs rods (>= 1.8);
    * ``size``: small vs large particles (median equivalent diameter in the lowest vs the highest
      third of the frames), a scale-dependent property an encoder at a fixed scale should see.

    Only particles that do not touch the border count; frames with fewer than 3 are not labelled.
    """
    from PIL import Image

    with open(root / "metadata.csv", newline="") as fh:
        dois = {r["filename"]: r["doi"] for r in csv.DictReader(fh)}
    ratio, diameter = {}, {}
    for name in sorted(dois):
        seg = np.array(Image.open(root / "segmaps" / name))
        h, w = seg.shape
        props = whole_particles(seg)
        if len(props) >= MIN_PARTICLES:
            ratio[name] = float(np.median([r.axis_major_length / r.axis_minor_length for r in props]))
            diameter[name] = float(np.median([r.equivalent_diameter_area for r in props]))
    shape = {n: ("spheres" if a <= SPHERE_MAX_AR else "rods", dois[n]) for n, a in ratio.items()
             if a <= SPHERE_MAX_AR or a >= ROD_MIN_AR}  # fmt: skip
    lo, hi = np.percentile(list(diameter.values()), (100 / 3, 200 / 3))
    size = {n: ("small" if d <= lo else "large", dois[n]) for n, d in diameter.items() if d <= lo or d >= hi}
    return {"frame-shape": shape, "frame-size": size}


def frame_tiles(path: Path, crop: int, size: int) -> np.ndarray:
    """Non-overlapping-as-possible tiles of ``crop`` native px covering the frame, resized to
    ``size``: (T, 1, size, size) float32. A frame smaller than ``crop`` is one tile."""
    image = normalise(read_image(path)[0], Contract())
    h, w = image.shape
    if min(h, w) < crop:
        s = crop / min(h, w)
        image = resize(image, (max(crop, round(h * s)), max(crop, round(w * s))))
        h, w = image.shape
    tiles = [resize(image[y : y + crop, x : x + crop], (size, size)) for y, x in tile_origins_of(h, w, crop)]
    return np.stack(tiles)[:, None].astype(np.float32)


def tile_origins_of(h: int, w: int, crop: int) -> list[tuple[int, int]]:
    ys = np.linspace(0, h - crop, max(1, int(np.ceil(h / crop)))).round().astype(int)
    xs = np.linspace(0, w - crop, max(1, int(np.ceil(w / crop)))).round().astype(int)
    return [(int(y), int(x)) for y in ys for x in xs]


def tile_particles(seg: np.ndarray, crop: int) -> list[tuple[float, float, int]]:
    """Per tile of ``frame_tiles``' grid: (median aspect ratio, median equivalent diameter, count)
    of the particles lying wholly inside the tile (nan, nan, n when fewer than 3)."""

    h, w = seg.shape
    if min(h, w) < crop:  # frame_tiles resizes such frames up: keep their one tile unlabeled
        return [(float("nan"), float("nan"), 0)] * len(tile_origins_of(max(h, crop), max(w, crop), crop))
    out = []
    for y, x in tile_origins_of(h, w, crop):
        sub = seg[y : y + crop, x : x + crop]
        props = whole_particles(sub)
        if len(props) < MIN_PARTICLES:
            out.append((float("nan"), float("nan"), len(props)))
            continue
        ar = float(np.median([r.axis_major_length / r.axis_minor_length for r in props]))
        out.append((ar, float(np.median([r.equivalent_diameter_area for r in props])), len(props)))
    return out


def tile_tasks(
    root: Path, names: list[str], crop: int, dois: dict[str, str]
) -> dict[str, dict[str, tuple[str, str]]]:
    """Tile-level tasks (items are ``name#index`` into that frame's tiles), grouped by paper:
    ``tile-shape`` (spheres vs rods, as for frames) and ``tile-size`` (small vs large particles,
    lowest vs highest third of the tiles' median diameter)."""
    from PIL import Image

    ratio, diameter = {}, {}
    for name in names:
        for i, (ar, ecd, _) in enumerate(tile_particles(np.array(Image.open(root / "segmaps" / name)), crop)):
            if np.isfinite(ar):
                ratio[f"{name}#{i}"], diameter[f"{name}#{i}"] = ar, ecd
    group = {item: dois[item.split("#")[0]] for item in ratio}
    shape = {t: ("spheres" if a <= SPHERE_MAX_AR else "rods", group[t]) for t, a in ratio.items()
             if a <= SPHERE_MAX_AR or a >= ROD_MIN_AR}  # fmt: skip
    lo, hi = np.percentile(list(diameter.values()), (100 / 3, 200 / 3))
    size = {t: ("small" if d <= lo else "large", group[t]) for t, d in diameter.items() if d <= lo or d >= hi}
    return {"tile-shape": shape, "tile-size": size}


def emps_items(args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """EMPS: every frame unlabeled for pretraining; frame and tile tasks from the instance maps,
    grouped by paper (doi); each frame's tiles at the pretraining scale."""
    unlabeled = link_unlabeled(args.data / "images", args.work)
    with open(args.data / "metadata.csv", newline="") as fh:
        dois = {r["filename"]: r["doi"] for r in csv.DictReader(fh)}
    names = sorted(dois)
    tasks = {**frame_labels(args.data), **tile_tasks(args.data, names, args.crop_size, dois)}
    tiles = {n: frame_tiles(args.data / "images" / n, args.crop_size, args.image_size) for n in names}
    return unlabeled, tasks, tiles


DEEPSEM_LABELS = Path("crops/labels.csv")
DEEPSEM_TILES = Path("nanowire_yield/datasets/NWs-8kMag-subdivided")


def deepsem_items(args: argparse.Namespace) -> tuple[Path, dict[str, Any], dict[str, np.ndarray]]:
    """DeepSEM nanowires (real SEM): all 90 tiles unlabeled for pretraining; one task, the class of
    each labelled box (NW / Parasitic / Nanospade), grouped by source tile. Each box is seen at the
    pretraining scale: the ``--crop-size`` native-px window of its frame-normalised tile centred on
    the box (shifted inside the tile), resized to ``--image-size``."""
    unlabeled = link_unlabeled(args.data / DEEPSEM_TILES, args.work)
    labels: dict[str, tuple[str, str]] = {}
    tiles: dict[str, np.ndarray] = {}
    frames: dict[str, np.ndarray] = {}
    crop, size = args.crop_size, args.image_size
    with open(args.data / DEEPSEM_LABELS, newline="") as fh:
        for row in csv.DictReader(fh):
            src = row["source_image"]
            if src not in frames:
                frames[src] = normalise(read_image(args.data / DEEPSEM_TILES / src)[0], Contract())
            frame = frames[src]
            cy = int(row["top"]) + int(row["height"]) // 2
            cx = int(row["left"]) + int(row["width"]) // 2
            y0 = min(max(0, cy - crop // 2), frame.shape[0] - crop)
            x0 = min(max(0, cx - crop // 2), frame.shape[1] - crop)
            window = resize(frame[y0 : y0 + crop, x0 : x0 + crop], (size, size))
            tiles[row["crop"]] = window[None, None].astype(np.float32)
            labels[row["crop"]] = (row["label"], src)
    return unlabeled, {"crop-class": labels}, tiles


def link_unlabeled(images: Path, work: Path) -> Path:
    folder = work / "unlabeled"
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(images.glob("*.png")):
        dst = folder / src.name
        if not dst.exists():
            dst.symlink_to(src.resolve())
    return folder


# ---------------------------------------------------------------------------------------------
# the three encoders


def run_nanomorph(unlabeled: Path, out: Path, args: argparse.Namespace, extra: str) -> tuple[Path, float]:
    """``nanomorph pretrain`` with its defaults, told only the data, the budget and the scale."""
    # An epoch is at most one pass over the frames' crops: count epochs from the steps it really has.
    full_pass = len(list(unlabeled.glob("*.png"))) * CROPS_PER_FRAME // args.batch_size
    steps_per_epoch = max(1, min(args.epoch_steps, full_pass))
    epochs = max(1, round(args.steps / steps_per_epoch))
    print(
        f"nanomorph run {out.name}: {epochs} epochs x {steps_per_epoch} steps = {epochs * steps_per_epoch} steps"
    )
    cmd = [
        sys.executable, "-m", "nanomorph.cli", "pretrain", "--data", str(unlabeled), "--out", str(out),
        "--epochs", str(epochs), "--steps-per-epoch", str(steps_per_epoch),
        "--batch-size", str(args.batch_size), "--image-size", str(args.image_size),
        "--crop-size", str(args.crop_size), "--crops-per-image", str(CROPS_PER_FRAME),
    ] + extra.split()  # fmt: skip
    if (out / "bench_cpu.json").exists():
        return out / "backbone.safetensors", json.loads((out / "bench_cpu.json").read_text())["cpu_s"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, check=True, env=env, cwd=ROOT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    (out / "bench_cpu.json").write_text(json.dumps({"cpu_s": cpu, "command": cmd}))
    return out / "backbone.safetensors", cpu


def structured_tiles(
    unlabeled: Path, crop: int, size: int
) -> tuple[np.ndarray, list[tuple[np.ndarray, int, int]]]:
    """The reference loop's data: fixed tiles that hold structure (tile std above the 25th
    percentile of all tiles), each normalised to its own 1st-99th percentiles, (N, 1, size, size);
    and where each kept tile lies, (raw frame, y, x), for ``--plain-crops shifted``."""
    tiles, where = [], []
    for path in sorted(unlabeled.glob("*.png")):
        raw = read_image(path)[0]
        for y, x in grid_origins(raw.shape, crop):
            tiles.append(tile_normalised(raw[y : y + crop, x : x + crop], size))
            where.append((raw, y, x))
    stack = np.stack(tiles).astype(np.float32)
    spread = stack.std(axis=(1, 2))
    keep = spread > np.percentile(spread, 25)
    return stack[keep][:, None], [w for w, k in zip(where, keep, strict=True) if k]


def tile_normalised(tile: np.ndarray, size: int) -> np.ndarray:
    lo, hi = np.percentile(tile, (1, 99))
    return resize(np.clip((tile - lo) / max(hi - lo, 1e-6), 0, 1), (size, size))


def grid_origins(shape: tuple[int, ...], crop: int) -> list[tuple[int, int]]:
    h, w = shape[:2]
    return [(y, x) for y in range(0, h - crop + 1, crop) for x in range(0, w - crop + 1, crop)]


def shifted_batch(
    where: list[tuple[np.ndarray, int, int]], idx: torch.Tensor, crop: int, size: int
) -> torch.Tensor:
    """The kept tiles ``idx``, each moved by up to half a tile in y and x (inside its frame), so the
    loop trains off the probe's grid, as nanomorph's random crop positions do."""
    out = []
    for i in idx.tolist():
        raw, y, x = where[i]
        dy, dx = (int(v) for v in torch.randint(-crop // 2, crop // 2 + 1, (2,)))
        y = min(max(0, y + dy), raw.shape[0] - crop)
        x = min(max(0, x + dx), raw.shape[1] - crop)
        out.append(tile_normalised(raw[y : y + crop, x : x + crop], size))
    return torch.from_numpy(np.stack(out).astype(np.float32))[:, None]


def run_plain_loop(
    unlabeled: Path, out: Path, args: argparse.Namespace, cpu_budget: float | None = None
) -> tuple[Path, float]:
    """A plain SimCLR loop: timm resnet18 + lightly's NT-Xent, AdamW lr 1e-3 (constant), torchvision
    augs; ``args.plain_steps`` steps, or with ``cpu_budget`` as many as fit in that many CPU seconds
    (this process's, data preparation included, as nanomorph's count its whole run)."""
    import timm
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead
    from torchvision.transforms import v2

    weights = out / "backbone.pt"
    if weights.exists():
        return weights, json.loads((out / "cpu.json").read_text())["cpu_s"]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.process_time()
    torch.manual_seed(args.plain_seed)  # the loop's init, batches and augmentations
    # native: tiles kept at --crop-size, so a view is sampled from native pixels (never upsampled
    # from the downsized tile); the same keep rule, on the std of the native tile.
    tile_side = args.crop_size if args.plain_crops == "native" else args.image_size
    tiles, where = structured_tiles(unlabeled, args.crop_size, tile_side)
    data = torch.from_numpy(tiles)
    s = args.image_size
    aug = v2.Compose([
        v2.RandomResizedCrop(s, scale=(0.2, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.RandomVerticalFlip(), v2.RandomApply([v2.ColorJitter(0.4, 0.4)], p=0.8),
        v2.RandomApply([v2.GaussianBlur(5, (0.1, 2.0))], p=0.5),
    ])  # fmt: skip
    backbone = timm.create_model("resnet18", in_chans=1, num_classes=0)
    head = SimCLRProjectionHead(512, 512, 128)
    model = torch.nn.Sequential(backbone, head).to(memory_format=torch.channels_last)
    loss_fn = NTXentLoss()  # lightly's default temperature (0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    losses: list[float] = []
    step = 0

    def more() -> bool:  # a step budget, or a CPU-seconds one
        return step < args.plain_steps if cpu_budget is None else time.process_time() - t0 < cpu_budget

    while more():
        idx = torch.randint(0, len(data), (args.batch_size,))
        x = shifted_batch(where, idx, args.crop_size, s) if args.plain_crops == "shifted" else data[idx]
        v0 = torch.stack([aug(t) for t in x]).contiguous(memory_format=torch.channels_last)
        v1 = torch.stack([aug(t) for t in x]).contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(v0), model(v1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if step % 10 == 0:
            budget = f"{args.plain_steps}" if cpu_budget is None else f"? ({cpu_budget:.0f} CPU s)"
            print(f"plain loop step {step}/{budget} loss {loss.item():.3f}", flush=True)
        step += 1
    torch.save(backbone.state_dict(), weights)
    cpu = time.process_time() - t0
    (out / "cpu.json").write_text(
        json.dumps({"cpu_s": cpu, "steps": step, "loss_first": losses[0], "loss_last": losses[-1]})
    )
    return weights, cpu


def load_encoder(name: str, path: Path | None, calibration: np.ndarray) -> torch.nn.Module:
    import timm

    from training.backbones import load_backbone

    if name == "nanomorph":
        model, _ = load_backbone(path)  # type: ignore[arg-type]
    else:
        torch.manual_seed(0)
        model = timm.create_model("resnet18", in_chans=1, num_classes=0)
        if path is not None:
            model.load_state_dict(torch.load(path, weights_only=True))
        else:  # random init: BatchNorm statistics from the data, as `nanomorph study` does
            recalibrate_batchnorm(model, calibration)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# probe


@torch.no_grad()
def item_features(model: torch.nn.Module, tiles: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Embeddings of every tile (``name#i``) and of every frame (``name``: the mean of its tiles)."""
    out: dict[str, np.ndarray] = {}
    for name, t in tiles.items():
        f = model(torch.from_numpy(t).contiguous(memory_format=torch.channels_last)).float().numpy()
        out[name] = f.mean(0)
        out.update({f"{name}#{i}": row for i, row in enumerate(f)})
    return out


def probe(features: np.ndarray, y: np.ndarray, groups: np.ndarray, k: int, seed: int) -> float:
    n_classes = int(y.max()) + 1
    try:
        split = make_split(y, k, 0.0, 0.3, seed, groups=groups)
    except ValueError:  # fewer than k labelled items of a class outside the test groups
        return float("nan")
    w, b, _ = fit_linear_head(features[split.train], y[split.train], features[:0], y[:0], n_classes, [], 1e-2)
    pred = (torch.from_numpy(features[split.test]) @ w.T + b).argmax(1).numpy()
    return balanced_accuracy(y[split.test], pred, n_classes)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data/emps-train")
    p.add_argument("--work", type=Path, default=ROOT / "runs/ssl_quality")
    p.add_argument("--steps", type=int, default=200, help="optimiser steps of each pretraining")
    p.add_argument(
        "--epoch-steps",
        type=int,
        default=10,
        help="optimiser steps per nanomorph epoch (the quality signals and checkpoint come once an epoch)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128)
    p.add_argument("--crop-size", type=int, default=256, help="native px of a tile / crop")
    p.add_argument("--splits", type=int, default=20)
    p.add_argument("--k", default="1,2,4,8", help="labelled frames per class (frame tasks)")
    p.add_argument("--k-tiles", default="4,16,32", help="labelled tiles per class (tile tasks)")
    p.add_argument(
        "--run",
        action="append",
        metavar="TAG=FLAGS",
        help="a nanomorph pretrain run: its name under --work and extra flags (repeatable); "
        "default: one run 'default' with no extra flags",
    )
    p.add_argument("--skip-plain", action="store_true")
    p.add_argument(
        "--plain-steps",
        type=int,
        default=None,
        help="optimiser steps of the plain loop (default --steps); raise it to give the loop the CPU seconds "
        "nanomorph's run took (the table prints both), or use --plain-match-cpu",
    )
    p.add_argument(
        "--plain-match-cpu",
        action="store_true",
        help="run the plain loop for the CPU seconds the first nanomorph run took instead of --plain-steps "
        "(the same-budget comparison; its folder is named by the budget)",
    )
    p.add_argument(
        "--plain-crops",
        choices=["grid", "shifted", "native"],
        default="grid",
        help="the plain loop's data: the probe's own fixed grid tiles (resized to --image-size before the "
        "random resized crop), each tile shifted at random by up to half a tile per draw (off the probe's "
        "grid, as nanomorph's crops are), or the grid tiles at native resolution (the random resized crop "
        "samples --crop-size px directly, as nanomorph's views do)",
    )
    p.add_argument(
        "--plain-seed",
        type=int,
        default=0,
        help="seed of the plain loop (its initialisation, batches and augmentations); another seed gets its "
        'own folder, so a seed-to-seed spread can be read beside nanomorph\'s --run "tag=--seed N"',
    )
    args = p.parse_args()
    args.plain_steps = args.plain_steps or args.steps
    torch.set_num_threads(os.cpu_count() or 2)

    args.work.mkdir(parents=True, exist_ok=True)
    is_deepsem = (args.data / DEEPSEM_LABELS).exists()
    unlabeled, tasks, tiles = (deepsem_items if is_deepsem else emps_items)(args)
    for task, labels in tasks.items():
        counts = {c: sum(v[0] == c for v in labels.values()) for c in sorted({v[0] for v in labels.values()})}
        print(f"task {task}: {counts} from {len({v[1] for v in labels.values()})} groups")
    print(f"{len(list(unlabeled.glob('*.png')))} unlabeled frames for pretraining")
    pooled = np.concatenate(list(tiles.values()))
    calibration = pooled[:: max(1, len(pooled) // 512)]

    encoders: dict[str, tuple[str, Path | None, float]] = {"random init": ("random", None, 0.0)}
    for spec in args.run or ["default="]:
        tag, _, extra = spec.partition("=")
        nm_path, nm_cpu = run_nanomorph(unlabeled, args.work / tag, args, extra)
        encoders[f"nanomorph ({tag})"] = ("nanomorph", nm_path, nm_cpu)
    if not args.skip_plain:
        # A plain loop of other length than --steps gets its own folder (e.g. to match CPU seconds).
        nanomorph_cpu = [cpu for kind, _, cpu in encoders.values() if kind == "nanomorph"]
        budget = nanomorph_cpu[0] if args.plain_match_cpu else None
        if budget is not None:
            folder = f"plain-cpu{budget:.0f}"
        else:
            folder = "plain" if args.plain_steps == args.steps else f"plain-{args.plain_steps}"
        folder += "" if args.plain_crops == "grid" else f"-{args.plain_crops}"
        folder += "" if args.plain_seed == 0 else f"-seed{args.plain_seed}"
        plain_path, plain_cpu = run_plain_loop(unlabeled, args.work / folder, args, budget)
        encoders["plain loop"] = ("plain", plain_path, plain_cpu)

    ks = [int(k) for k in args.k.split(",")]
    ks_tiles = [int(k) for k in args.k_tiles.split(",")]

    def task_ks(task: str) -> list[int]:  # K counts frames for frame tasks, else tiles / crops
        return ks if task.startswith("frame") else ks_tiles

    table: dict[str, dict[str, dict[int, tuple[float, float]]]] = {task: {} for task in tasks}
    signals: dict[str, dict[str, float]] = {}
    for label, (kind, path, _) in encoders.items():
        model = load_encoder(kind, path, calibration)
        feats = item_features(model, tiles)
        signals[label] = tile_signals(model, pooled)
        for task, labels in tasks.items():
            classes = sorted({v[0] for v in labels.values()})
            task_names = sorted(labels)
            f = np.stack([feats[n] for n in task_names])
            y = np.array([classes.index(labels[n][0]) for n in task_names])
            groups = np.array([labels[n][1] for n in task_names])
            table[task][label] = {}
            for k in task_ks(task):
                scores = [probe(f, y, groups, k, seed) for seed in range(args.splits)]
                ok = [v for v in scores if np.isfinite(v)]
                table[task][label][k] = (float(np.mean(ok)), float(np.std(ok))) if ok else (float("nan"), 0.0)
    for task in tasks:
        report(task, table[task], encoders, task_ks(task), args)
    print("\nlabel-free signals on the probe tiles (training.quality):")
    for label, sig in signals.items():
        print(f"  {label}: " + ", ".join(f"{k} {v:.3f}" for k, v in sig.items()))


def tile_signals(model: torch.nn.Module, pooled: np.ndarray) -> dict[str, float]:
    """Effective rank, alignment and uniformity of the encoder on up to 512 probe tiles."""
    from training.augment import AugmentConfig, BatchAugment
    from training.quality import measure

    x = torch.from_numpy(pooled[:: max(1, len(pooled) // 512)])
    augment = BatchAugment(AugmentConfig(image_size=x.shape[-1]))
    return measure(model, x, augment, torch.device("cpu")).to_dict()


def report(task: str, table: dict, encoders: dict, ks: list[int], args: argparse.Namespace) -> None:
    print(
        f"\ntask {task}: balanced accuracy, mean ± std over {args.splits} splits by group (paper or source tile)"
    )
    print("| encoder | CPU s | " + " | ".join(f"K={k}" for k in ks) + " |")
    print("|---|---|" + "---|" * len(ks))
    for label, row in table.items():
        cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in (row[k] for k in ks))
        print(f"| {label} | {encoders[label][2]:.0f} | {cells} |")
    base = table["random init"]
    gains = {
        label: [row[k][0] - base[k][0] for k in ks] for label, row in table.items() if label != "random init"
    }
    for label, g in gains.items():
        print(
            f"gain over random init, {label}: "
            + ", ".join(f"K={k} {v:+.3f}" for k, v in zip(ks, g, strict=False))
        )
    for label, nm in gains.items():
        if not label.startswith("nanomorph") or "plain loop" not in gains:
            continue
        pl = gains["plain loop"]
        print(f"gain ratio {label} / plain loop: " + ", ".join(
            f"K={k} {a / b:.2f}" if abs(b) > 1e-9 else f"K={k} n/a" for k, a, b in zip(ks, nm, pl, strict=False)))  # fmt: skip


if __name__ == "__main__":
    main()
