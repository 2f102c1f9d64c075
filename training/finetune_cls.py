"""``nanomorph finetune-cls``: few-label image classification on a (pretrained) encoder.

Two transfer modes:

* ``linear``: the encoder is frozen, its features are computed once, and an L2-regularised
  multinomial logistic regression (class-balanced loss) is fit on them — the standard linear probe
  of self-supervised learning (Chen et al., SimCLR, ICML 2020).
* ``finetune``: LP-FT (Kumar et al., "Fine-Tuning can Distort Pretrained Features and Underperform
  Out-of-Distribution", ICLR 2022): the linear probe initialises the head, then the whole network
  trains with a lower encoder learning rate, class-balanced sampling and flips/90° rotations. The
  linear-probe state is itself a candidate of model selection, so on the validation split the
  fine-tuned model is never worse than the probe, and a network trained from random init cannot end
  up as a one-class collapse when its random-feature probe was better.

Splits (:mod:`training.splits`): test first (fixed by the seed), then K labels per class, then a
validation split carved from those labels; early stopping / model selection only ever see
validation (or, with one label per class, the training loss — recorded in ``metrics.json``).

The study (:mod:`training.study`) calls :func:`train_classifier` in-process with preloaded images
and cached features.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nanomorph.atomic import atomic_write_text
from nanomorph.config import load_yaml, resolved, save_resolved, yaml_defaults
from nanomorph.contract import Contract, frame_tiles, read_image, to_model_input
from nanomorph.contract.frames import nm_per_px
from nanomorph.progress import progress
from training import frames as frames_mod
from training import metrics as M
from training import runs
from training.artifacts import resolve_encoder_source
from training.backbones import create_backbone, git_commit, load_backbone
from training.data import LABELS_CSV, list_classification
from training.device import pick_device
from training.models import Classifier
from training.runio import write_model_card
from training.schedule import WarmupCosine
from training.splits import Split, make_split, parse_labels_per_class

log = logging.getLogger("nanomorph.finetune_cls")

COMMAND = "finetune-cls"
CLASSIFIER_FORMAT = "nanomorph-classifier/1"
OUTPUT_FILES = (
    "config.yaml",
    "metrics.json",
    "classifier.safetensors",
    "classes.json",
    "ood.json",
    "confusion_matrix.png",
    "README.md",
)
# Keys of the resolved config that do not change the result (a rerun with another value is the same run).
_NOT_RESULT_KEYS = {"force", "resume", "config", "command", "out", "device"}


# ----------------------------------------------------------------------------------------------
# data and encoders


@dataclass
class LabeledImages:
    """A classification folder decoded once through the contract: ``x`` is float32 (R, 1, S, S).

    ``paths``, ``labels`` and ``groups`` are per image (frame): splits, K and evaluation count
    frames. ``x`` holds the model inputs: one row per image, or, with the contract's
    classification tiling, every tile of every image (``frame[r]`` is the image of row ``r``,
    ``keep[r]`` False for a tile without structure).
    """

    paths: list[Path]
    labels: np.ndarray
    class_names: list[str]
    x: np.ndarray
    contract: Contract
    groups: np.ndarray | None = None
    frame: np.ndarray | None = None
    keep: np.ndarray | None = None

    @property
    def tiled(self) -> bool:
        return self.frame is not None

    def rows(self, frames: np.ndarray, kept_only: bool = False) -> np.ndarray:
        """Rows of ``x`` that belong to ``frames`` (with ``kept_only``: only tiles that count)."""
        if self.frame is None:
            return np.asarray(frames, dtype=np.int64)
        return frames_mod.rows_of(self.frame, frames, self.keep if kept_only else None)

    def row_labels(self, rows: np.ndarray) -> np.ndarray:
        return self.labels[rows] if self.frame is None else self.labels[self.frame[rows]]


def _read_groups(root: Path, paths: list[Path], column: str) -> np.ndarray:
    """Group of every image from a column of ``root/labels.csv`` (e.g. the source tile of a crop)."""
    csv_path = root / LABELS_CSV
    if not csv_path.is_file():
        raise FileNotFoundError(f"--group-column {column} needs {csv_path} (columns path,label,{column})")
    by_path: dict[Path, str] = {}
    with open(csv_path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        fields = {(f or "").strip().lower(): f for f in reader.fieldnames or []}
        if column.lower() not in fields:
            raise ValueError(f"{csv_path}: no column {column!r} (columns: {', '.join(fields)})")
        for row in reader:
            if row.get(fields["path"]):
                by_path[(csv_path.parent / row[fields["path"]].strip()).resolve()] = row[
                    fields[column.lower()]
                ]
    missing = [p for p in paths if p.resolve() not in by_path]
    if missing:
        raise ValueError(f"{csv_path}: no {column!r} value for {missing[0]}")
    return np.asarray([by_path[p.resolve()] for p in paths])


def list_labeled(data: str | Path) -> tuple[list[Path], list[int], list[str]]:
    """:func:`training.data.list_classification` plus a clear error for an empty class folder."""
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {root} does not exist (expected <class>/ folders or labels.csv)")
    paths, labels, class_names = list_classification(root)
    if not (root / LABELS_CSV).is_file():
        empty = sorted(
            p.name
            for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in class_names
        )
        if empty:
            raise ValueError(f"{root}: class folder {empty[0]!r} has 0 images")
    if len(class_names) < 2:
        raise ValueError(
            f"{root}: found {len(class_names)} class ({class_names}); classification needs at least 2"
        )
    return paths, labels, class_names


def load_images(
    data: str | Path, contract: Contract, group_column: str | None = None, show_progress: bool = True
) -> LabeledImages:
    """Lists and decodes a classification folder: ``read_image`` → ``to_model_input`` (the contract)."""
    paths, labels, class_names = list_labeled(data)
    groups = _read_groups(Path(data), paths, group_column) if group_column else None
    y = np.asarray(labels, dtype=np.int64)
    if contract.cls_tiling:
        return _load_tiled(paths, y, class_names, contract, groups, show_progress)
    x = np.empty((len(paths), 1, contract.image_size, contract.image_size), dtype=np.float32)
    for i, path in enumerate(progress(paths, desc="decode", enabled=show_progress)):
        image, _ = read_image(path)  # ImageReadError (a ValueError) names the file
        x[i] = to_model_input(image, contract)
    return LabeledImages(paths, y, class_names, x, contract, groups)


def _load_tiled(
    paths: list[Path],
    y: np.ndarray,
    class_names: list[str],
    contract: Contract,
    groups: np.ndarray | None,
    show_progress: bool,
) -> LabeledImages:
    """Every image cut into its classification inputs (:func:`nanomorph.contract.frame_tiles`), the
    same function the runtime and the service use; the file's own pixel size counts as there."""
    xs, frame, keep = [], [], []
    for i, path in enumerate(progress(paths, desc="decode+tile", enabled=show_progress)):
        image, meta = read_image(path)  # ImageReadError (a ValueError) names the file
        tiles = frame_tiles(image, contract, nm_per_px(meta))
        xs.append(tiles.x)
        frame.append(np.full(len(tiles.x), i, dtype=np.int64))
        keep.append(tiles.keep)
    x = np.concatenate(xs)
    log.info(
        "%d images -> %d classification inputs (%s)", len(paths), len(x), frames_mod.tiling_summary(contract)
    )
    return LabeledImages(
        paths, y, class_names, x, contract, groups, np.concatenate(frame), np.concatenate(keep)
    )


@dataclass
class EncoderSpec:
    """Where an encoder comes from and how to rebuild it (fresh weights for every training run)."""

    source: str  # "scratch", "imagenet", the backbone file, or a foreign checkpoint (init)
    architecture: str
    method: str
    contract: Contract
    meta: dict[str, str]
    init: str | None = None  # "imagenet" or a checkpoint path: timm + training.backbones.create_backbone

    @property
    def is_scratch(self) -> bool:
        return self.source == "scratch"

    def build(self, init_seed: int, calibration: np.ndarray | None = None) -> nn.Module:
        """A new backbone: loaded from the file, or random init fixed by ``init_seed``.

        A random-init backbone's BatchNorm statistics are recalibrated on ``calibration`` images
        (unlabeled use of the non-test images): with the init statistics (mean 0, var 1) eval-mode
        activations are unnormalised and random features are needlessly poor.
        """
        if self.is_scratch:
            torch.manual_seed(init_seed)
            model = create_backbone(self.architecture)
            if calibration is not None and len(calibration):
                recalibrate_batchnorm(model, calibration)
            return model
        if self.init:
            return create_backbone(self.architecture, self.init)
        model, _ = load_backbone(self.source)
        return model


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: np.ndarray | torch.Tensor, batch_size: int = 64) -> None:
    """Re-estimates BatchNorm running statistics as the plain average over ``x`` (no weights change)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    model.train()
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        if len(chunk) > 1:  # train-mode BatchNorm needs more than one value per channel
            model(torch.as_tensor(chunk).to(next(model.parameters()).device))
    for m in bns:
        m.momentum = 0.1
    model.eval()


def resolve_encoder(
    encoder: str,
    arch: str = "resnet18",
    image_size: int | None = None,
    tiling: dict[str, Any] | None = None,
) -> EncoderSpec:
    """Parses ``--encoder`` (:func:`training.artifacts.resolve_encoder_source`) and the contract to use.

    The contract comes from the backbone's metadata; ``image_size`` overrides its input side.
    ``tiling`` (``cls_tile``, ``cls_stride``, ``cls_pixel_size``, ``cls_min_std``; None = default)
    sets how large frames are classified; by default a pretraining run's ``crop_size`` gives the
    tile, so frames are classified at the scale the encoder was pretrained on
    (:func:`training.frames.resolve_tiling`).
    """
    src = resolve_encoder_source(encoder, arch)
    if src.kind != "run":
        if src.init:
            create_backbone(src.architecture, src.init)  # fail now, naming the source, not mid-study
        contract = frames_mod.resolve_tiling(Contract(image_size=int(image_size or 224)), None, tiling)
        meta = {"architecture": src.architecture, "method": src.method}
        if src.init:
            meta["init"] = src.init
        return EncoderSpec(src.init or "scratch", src.architecture, src.method, contract, meta, init=src.init)
    assert src.path is not None and src.contract is not None
    contract = src.contract
    if image_size and int(image_size) != contract.image_size:
        log.warning("image size %d overrides the encoder's %d", image_size, contract.image_size)
        contract = dataclasses.replace(contract, image_size=int(image_size))
    contract = frames_mod.resolve_tiling(contract, str(src.path), tiling)
    return EncoderSpec(str(src.path), src.architecture, src.method, contract, src.meta)


@torch.no_grad()
def extract_features(
    backbone: nn.Module, x: np.ndarray, batch_size: int = 64, device: str | torch.device = "cpu"
) -> np.ndarray:
    """Raw (un-normalised) backbone features of every image, eval mode: float32 (N, D)."""
    backbone = backbone.to(device).eval()
    out = [
        backbone(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu().numpy()
        for i in range(0, len(x), batch_size)
    ]
    return np.concatenate(out).astype(np.float32, copy=False)


# ----------------------------------------------------------------------------------------------
# linear probe


def class_weights(y: np.ndarray, n_classes: int) -> torch.Tensor:
    """``n / (C_present * n_c)``: every class present contributes equally to the loss."""
    counts = np.bincount(y, minlength=n_classes).astype(np.float64)
    w = np.zeros(n_classes)
    present = counts > 0
    w[present] = len(y) / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Tiny full-batch problems run fastest on one thread: on a busy machine the intra-op thread
    pool's hand-offs cost more than the arithmetic (measured: ~30x slower LBFGS with 2 threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _fit_logreg(
    f: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, n_classes: int, wd: float, iters: int
) -> nn.Linear:
    head = nn.Linear(f.shape[1], n_classes)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(
        head.parameters(), lr=1.0, max_iter=iters, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(head(f), y, weight=weights) + 0.5 * wd * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def fit_linear_head(
    f_train: np.ndarray,
    y_train: np.ndarray,
    f_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    weight_decays: list[float],
    default_weight_decay: float,
    iters: int = 200,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Class-balanced multinomial logistic regression on standardised features.

    The regularisation strength is picked by validation balanced accuracy (ties: lower class-balanced
    validation loss); without a validation split ``default_weight_decay`` is used. The
    standardisation is folded into the returned weights, so they apply to the raw features:
    ``logits = f @ W.T + b``.
    """
    mean = f_train.mean(axis=0)
    std = f_train.std(axis=0) + 1e-6
    ft = torch.from_numpy((f_train - mean) / std)
    yt = torch.from_numpy(y_train)
    weights = class_weights(y_train, n_classes)
    has_val = len(y_val) > 0
    candidates = sorted(set(float(w) for w in weight_decays)) if has_val else [float(default_weight_decay)]
    best: tuple[tuple[float, float], nn.Linear, float] | None = None
    scores = {}
    for wd in candidates:
        with _single_thread():
            head = _fit_logreg(ft, yt, weights, n_classes, wd, iters)
        if has_val:
            with torch.no_grad():
                logits = head(torch.from_numpy((f_val - mean) / std))
                loss = float(
                    F.cross_entropy(logits, torch.from_numpy(y_val), weight=class_weights(y_val, n_classes))
                )
            bacc = M.balanced_accuracy(y_val, logits.argmax(1).numpy(), n_classes)
            scores[wd] = {"val_balanced_accuracy": bacc, "val_loss": loss}
            key = (bacc, -loss)
        else:
            key = (0.0, 0.0)
        if best is None or key > best[0]:
            best = (key, head, wd)
    assert best is not None
    _, head, wd = best
    with torch.no_grad():
        w = head.weight / torch.from_numpy(std).float()
        b = head.bias - w @ torch.from_numpy(mean).float()
    info = {
        "weight_decay": wd,
        "selection": "val_balanced_accuracy" if has_val else "fixed weight decay (no validation labels)",
        "candidates": scores,
    }
    return w.detach().clone(), b.detach().clone(), info


# ----------------------------------------------------------------------------------------------
# LP-FT fine-tuning


def augment_batch(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random horizontal/vertical flips and 90° rotations per image (TEM has no up or down)."""
    out = []
    flips = torch.randint(0, 2, (len(x), 2), generator=generator)
    rots = torch.randint(0, 4, (len(x),), generator=generator)
    for img, (fh, fv), k in zip(x, flips.tolist(), rots.tolist(), strict=True):
        if fh:
            img = img.flip(-1)
        if fv:
            img = img.flip(-2)
        out.append(torch.rot90(img, int(k), dims=(-2, -1)))
    return torch.stack(out)


def _set_bn_eval(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


@torch.no_grad()
def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int, device: torch.device) -> torch.Tensor:
    model.eval()
    outs = [
        model(torch.from_numpy(x[i : i + batch_size]).to(device)).float().cpu()
        for i in range(0, len(x), batch_size)
    ]
    return torch.cat(outs) if outs else torch.empty(0)


class _Selection:
    """Model selection while fine-tuning: validation balanced accuracy, ties broken by the
    class-balanced validation loss; without validation labels the training loss (eval mode, no
    augmentation). Keeps the best state seen."""

    def __init__(
        self,
        model: nn.Module,
        x: np.ndarray,
        y: np.ndarray,
        n_classes: int,
        has_val: bool,
        device: torch.device,
    ) -> None:
        self.model, self.x, self.y, self.n_classes = model, x, y, n_classes
        self.has_val, self.device = has_val, device
        self.weights = class_weights(y, n_classes).to(device)
        self.best_key: tuple[float, float] = (-np.inf, -np.inf)
        self.best_state: dict[str, Any] = {}
        self.best_step = 0

    def offer(self, step: int) -> dict[str, float]:
        """Scores the model now; keeps its state if it is the best so far (the first always is)."""
        logits = predict_logits(self.model, self.x, 64, self.device)
        target = torch.from_numpy(self.y).to(self.device)
        loss = float(F.cross_entropy(logits.to(self.device), target, weight=self.weights))
        bacc = M.balanced_accuracy(self.y, logits.argmax(1).numpy(), self.n_classes)
        key = (bacc, -loss) if self.has_val else (-loss, 0.0)
        if not self.best_state or key > self.best_key:
            self.best_key, self.best_step = key, step
            self.best_state = copy.deepcopy(self.model.state_dict())
        return {"balanced_accuracy": bacc, "loss": loss}


def _finetune_optimizer(
    model: Classifier, cfg: dict[str, Any], enc_lr: float, steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    opt = torch.optim.AdamW(
        [
            {"params": model.backbone.parameters(), "lr": enc_lr},
            {"params": model.head.parameters(), "lr": float(cfg["head_lr"])},
        ],
        weight_decay=float(cfg["weight_decay"]),
    )
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine.over(steps, warmup_divisor=10))


def finetune(
    model: Classifier,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_val: np.ndarray,
    y_val: np.ndarray,
    n_classes: int,
    cfg: dict[str, Any],
    scratch: bool,
    device: torch.device,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Trains the whole network from the linear-probe head (LP-FT), keeping the best state.

    Selection (:class:`_Selection`): validation balanced accuracy, ties broken by the class-balanced
    validation loss; the starting (linear-probe) state is the first candidate. Without validation
    labels the training loss selects. ``model`` is left holding the selected weights.
    """
    steps = int(cfg["scratch_steps"] if scratch else cfg["steps"])
    enc_lr = float(cfg["scratch_encoder_lr"] if scratch else cfg["encoder_lr"])
    freeze_bn = cfg["freeze_bn"]
    freeze_bn = (not scratch) if freeze_bn in ("auto", None) else bool(freeze_bn)
    eval_every = max(1, int(cfg["eval_every"]))
    batch = int(cfg["batch_size"])
    has_val = len(y_val) > 0
    x_sel, y_sel = (x_val, y_val) if has_val else (x_train, y_train)
    selection = _Selection(model, x_sel, y_sel, n_classes, has_val, device)
    model.to(device)
    history = [{"step": 0, **selection.offer(0)}]
    opt, sched = _finetune_optimizer(model, cfg, enc_lr, steps)
    gen = torch.Generator().manual_seed(int(cfg["seed"]) + 17)
    rng = np.random.default_rng(int(cfg["seed"]) + 17)
    # Class-balanced sampling: a class is drawn uniformly, then one of its images.
    probs = 1.0 / np.bincount(y_train, minlength=n_classes)[y_train]
    probs = probs / probs.sum()
    bar = progress(range(1, steps + 1), desc="finetune", enabled=show_progress)
    for step in bar:
        model.train()
        if freeze_bn:
            _set_bn_eval(model)
        idx = rng.choice(len(y_train), size=batch, replace=True, p=probs)
        xb = torch.from_numpy(x_train[idx])
        if cfg["augment"]:
            xb = augment_batch(xb, gen)
        loss = F.cross_entropy(model(xb.to(device)), torch.from_numpy(y_train[idx]).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % eval_every == 0 or step == steps:
            info = selection.offer(step)
            history.append({"step": step, "train_loss": loss.item(), **info})
            if hasattr(bar, "set_postfix"):
                bar.set_postfix(loss=loss.item(), sel=info["balanced_accuracy"])
    model.load_state_dict(selection.best_state)
    model.eval()
    best_step = selection.best_step
    return {
        "steps": steps,
        "encoder_lr": enc_lr,
        "head_lr": float(cfg["head_lr"]),
        "frozen_batchnorm": freeze_bn,
        "best_step": best_step,
        "selected": "linear probe (step 0)" if best_step == 0 else f"step {best_step}",
        "selection": "val_balanced_accuracy (ties: val loss)"
        if has_val
        else "training loss (no validation labels: K=1)",
        "history": history,
    }


# ----------------------------------------------------------------------------------------------
# the whole run


def ood_reference(
    emb_train: np.ndarray, y_train: np.ndarray, emb_trainval: np.ndarray, n_classes: int
) -> dict[str, Any]:
    """Cosine out-of-distribution reference: unit class centroids of the L2-normalised training
    embeddings and the 99th percentile of ``1 - max cosine similarity`` over train+val embeddings."""
    centroids = np.stack([emb_train[y_train == c].mean(axis=0) for c in range(n_classes)])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True) + 1e-12
    dist = 1.0 - (emb_trainval @ centroids.T).max(axis=1)
    return {"centroids": centroids.tolist(), "threshold": float(np.percentile(dist, 99)), "metric": "cosine"}


def _config(config: dict[str, Any]) -> dict[str, Any]:
    cfg = dict(yaml_defaults(COMMAND))
    cfg.update({k: v for k, v in config.items() if v is not None or k not in cfg})
    for key in ("data",):
        if not cfg.get(key):
            raise ValueError(f"finetune-cls needs --{key}")
    if cfg["mode"] not in ("linear", "finetune"):
        raise ValueError(f"--mode must be linear or finetune, got {cfg['mode']!r}")
    return cfg


@dataclass
class _Fitted:
    """A trained classifier's outputs: the network (None for a cached-feature linear cell), the
    logits of every test and validation input, and how head and fine-tuning went."""

    model: Classifier | None
    test_logits: torch.Tensor
    val_logits: torch.Tensor
    n_train_inputs: int
    linear: dict[str, Any]
    finetune: dict[str, Any] | None


def _fit(
    cfg: dict[str, Any],
    images: LabeledImages,
    split: Split,
    spec: EncoderSpec,
    features: np.ndarray | None,
    device: torch.device,
    show_progress: bool,
) -> _Fitted:
    """The linear probe on frozen features, then (``mode: finetune``) LP-FT of the whole network."""
    seed = int(cfg["seed"])
    n_classes = len(images.class_names)
    pool = np.setdiff1d(np.arange(len(images.labels)), split.test)
    # A study's linear cell with cached features needs no network at all (nothing is saved).
    need_net = features is None or cfg["mode"] == "finetune" or bool(cfg.get("out"))
    init_seed = int(cfg.get("init_seed", seed))
    backbone = spec.build(init_seed, calibration=images.x[images.rows(pool)]) if need_net else None
    if features is None:
        assert backbone is not None
        features = extract_features(backbone, images.x, device=device)
    # K and the splits count images (frames); training uses every input (tile) of the train frames.
    rows_train = images.rows(split.train, kept_only=True)
    rows_val = images.rows(split.val, kept_only=True)
    y_train, y_val = images.row_labels(rows_train), images.row_labels(rows_val)
    w, b, linear_info = fit_linear_head(
        features[rows_train],
        y_train,
        features[rows_val],
        y_val,
        n_classes,
        list(cfg["linear_weight_decays"]),
        float(cfg["linear_default_weight_decay"]),
        int(cfg["linear_iters"]),
    )
    model = None
    if backbone is not None:
        model = Classifier(backbone, n_classes)
        with torch.no_grad():
            model.head.weight.copy_(w)
            model.head.bias.copy_(b)
    test_rows, val_rows = images.rows(split.test), images.rows(split.val)
    if cfg["mode"] != "finetune":
        test_logits = torch.from_numpy(features[test_rows]) @ w.T + b
        val_logits = torch.from_numpy(features[val_rows]) @ w.T + b
        return _Fitted(model, test_logits, val_logits, int(rows_train.size), linear_info, None)
    assert model is not None
    finetune_info = finetune(
        model,
        images.x[rows_train],
        y_train,
        images.x[rows_val],
        y_val,
        n_classes,
        {**cfg, "seed": seed},
        spec.is_scratch,
        device,
        show_progress,
    )
    test_logits = predict_logits(model, images.x[test_rows], 64, device)
    val_logits = predict_logits(model, images.x[val_rows], 64, device)
    return _Fitted(model, test_logits, val_logits, int(rows_train.size), linear_info, finetune_info)


def _result(
    cfg: dict[str, Any], images: LabeledImages, split: Split, spec: EncoderSpec, fitted: _Fitted
) -> dict[str, Any]:
    """The test metrics and facts of one classifier (``metrics.json`` less ``seconds``)."""
    names, y = images.class_names, images.labels
    k = parse_labels_per_class(cfg["labels_per_class"])
    # Evaluation is per image: a tiled frame's label is the mean of its tiles' probabilities.
    report = M.classification_report(
        y[split.test], frame_predictions(images, fitted.test_logits, split.test), names
    )
    return {
        **{
            k_: report[k_]
            for k_ in ("accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix")
        },
        "confusion_matrix_axes": report["confusion_matrix_axes"],
        "evaluated_on": "test split (never used for training, early stopping or model selection)",
        **split.counts(y, names),
        "val": M.classification_report(
            y[split.val], frame_predictions(images, fitted.val_logits, split.val), names
        )
        if split.val.size
        else None,
        "classes": names,
        "mode": cfg["mode"],
        "encoder_source": spec.source,
        "architecture": spec.architecture,
        "method": spec.method,
        "labels_per_class": "all" if k is None else k,
        "seed": int(cfg["seed"]),
        "image_size": spec.contract.image_size,
        "tiling": frames_mod.tiling_summary(spec.contract),
        "n_train_inputs": fitted.n_train_inputs,
        "linear": fitted.linear,
        "finetune": fitted.finetune,
        "selection": (fitted.finetune or fitted.linear)["selection"],
    }


def train_classifier(
    config: dict[str, Any],
    *,
    images: LabeledImages | None = None,
    split: Split | None = None,
    features: np.ndarray | None = None,
    encoder: EncoderSpec | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Trains one classifier and returns its metrics (the content of ``metrics.json``).

    Args:
        config: the finetune-cls options (keys as the CLI flags with underscores; missing keys take the
            YAML defaults). ``out`` None writes nothing (the study's cells).
        images: preloaded images (the study decodes the folder once).
        split: precomputed split (the study shares one per repeat and label count).
        features: frozen-encoder features of *all* images (N, D), for the linear probe.
        encoder: a resolved encoder (default: from ``config["encoder"]``).
        show_progress: progress bars / log lines for the inner loops.

    Returns:
        ``{"accuracy", "balanced_accuracy", "macro_f1", "per_class", "confusion_matrix", "n_train",
        "n_val", "n_test", "label_counts", "val", "linear", "finetune", ...}``, metrics on the test split.
    """
    start = time.perf_counter()
    cfg = _config(config)
    seed = int(cfg["seed"])
    k = parse_labels_per_class(cfg["labels_per_class"])
    spec = encoder or resolve_encoder(str(cfg["encoder"]), str(cfg["arch"]), cfg.get("image_size"), cfg)
    if images is None:
        images = load_images(cfg["data"], spec.contract, cfg.get("group_column"), show_progress)
    if split is None:
        split = make_split(
            images.labels,
            k,
            float(cfg["val_fraction"]),
            float(cfg["test_fraction"]),
            seed,
            groups=images.groups,
            class_names=images.class_names,
        )
    split.check()  # early stopping and model selection never see the test split
    device = pick_device(str(cfg.get("device", "auto")))
    torch.manual_seed(seed)
    fitted = _fit(cfg, images, split, spec, features, device, show_progress)
    result = {**_result(cfg, images, split, spec, fitted), "seconds": round(time.perf_counter() - start, 2)}
    if cfg.get("out"):
        assert fitted.model is not None
        _write_outputs(Path(cfg["out"]), cfg, result, fitted.model, images, split, spec, device)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def frame_predictions(images: LabeledImages, logits: torch.Tensor, frames: np.ndarray) -> np.ndarray:
    """Predicted class of each of ``frames`` from the logits of their inputs (``images.rows(frames)``)."""
    if not images.tiled:
        return logits.argmax(1).numpy()
    assert images.frame is not None and images.keep is not None
    probs = frames_mod.softmax(logits.numpy())
    agg = frames_mod.frame_probabilities(
        probs, images.frame, images.keep, frames, images.contract.cls_aggregate
    )
    return agg.argmax(1)


@torch.no_grad()
def _frame_embeddings(
    model: Classifier, images: LabeledImages, frames: np.ndarray, device: torch.device
) -> np.ndarray:
    """Embeddings of ``frames``: one per frame, as the runtime computes it (a tiled frame's is the
    normalised mean of its tiles')."""
    rows = images.rows(frames)  # tiled: every tile of those frames, in row order
    model.eval().to(device)
    emb = np.concatenate(
        [
            model.embed(torch.from_numpy(images.x[rows[i : i + 64]]).to(device)).cpu().numpy()
            for i in range(0, len(rows), 64)
        ]
    )
    if images.tiled:  # OOD is per frame
        assert images.frame is not None and images.keep is not None
        emb = frames_mod.frame_embeddings(emb, images.frame, images.keep, frames)
    return emb


def _save_classifier(
    path: Path, cfg: dict[str, Any], result: dict[str, Any], model: Classifier, spec: EncoderSpec
) -> None:
    from training.backbones import save_backbone

    contract = spec.contract
    metadata = {
        "format": CLASSIFIER_FORMAT,
        "architecture": spec.architecture,
        "in_chans": str(contract.in_chans),
        "method": spec.method,
        "image_size": str(contract.image_size),
        "contract": contract.to_json(),
        "classes": json.dumps(result["classes"]),
        "mode": str(cfg["mode"]),
        "encoder_source": spec.source,
        "embedding_dim": str(int(model.head.in_features)),
        "metrics": json.dumps(
            {k: result[k] for k in ("accuracy", "balanced_accuracy", "macro_f1", "n_test")}
        ),
    }
    save_backbone(model, path, metadata)


def _write_card(
    out: Path, cfg: dict[str, Any], result: dict[str, Any], spec: EncoderSpec, ood: dict[str, Any]
) -> None:
    names, contract = result["classes"], spec.contract
    per_class = {
        f"{c} precision / recall": f"{v['precision']:.3f} / {v['recall']:.3f} (n={v['support']})"
        for c, v in result["per_class"].items()
    }
    write_model_card(
        out / "README.md",
        f"Classifier: {', '.join(names)}",
        {
            "Model": {
                "task": "classify",
                "mode": cfg["mode"] + (" (LP-FT)" if cfg["mode"] == "finetune" else " (frozen encoder)"),
                "architecture": spec.architecture,
                "encoder": spec.source,
                "pretraining method": spec.method,
                "input": f"1 x {contract.image_size} x {contract.image_size}, nanomorph.contract",
                "frames": frames_mod.tiling_summary(contract),
                "git commit": git_commit(),
            },
            "Data": {
                "folder": str(cfg["data"]),
                "labels per class": result["labels_per_class"],
                "train / val / test images": f"{result['n_train']} / {result['n_val']} / {result['n_test']}",
                "seed": result["seed"],
                "test split grouped by": cfg.get("group_column") or "image",
            },
            "Test metrics": {
                "accuracy": result["accuracy"],
                "balanced accuracy": result["balanced_accuracy"],
                "macro F1": result["macro_f1"],
                **per_class,
            },
            "Selection": (
                f"{result['selection']}"
                + (f"; selected {result['finetune']['selected']}" if result.get("finetune") else "")
                + ". The test split was used for nothing but these numbers."
            ),
            "Out-of-distribution": (
                f"cosine distance to the nearest class centroid above {ood['threshold']:.4f} "
                "(99th percentile on train+val) flags an image as unlike the training data (ood.json)."
            ),
        },
    )


def _write_outputs(
    out: Path,
    cfg: dict[str, Any],
    result: dict[str, Any],
    model: Classifier,
    images: LabeledImages,
    split: Split,
    spec: EncoderSpec,
    device: torch.device,
) -> None:
    """The run folder: ood.json, classes.json, the model, the confusion matrix, the card, then
    metrics.json (its presence marks the run as finished: reruns skip it)."""
    out.mkdir(parents=True, exist_ok=True)
    names = images.class_names
    emb = _frame_embeddings(model, images, np.concatenate([split.train, split.val]), device)
    ood = ood_reference(emb[: split.train.size], images.labels[split.train], emb, len(names))
    atomic_write_text(out / "ood.json", json.dumps(ood))
    atomic_write_text(out / "classes.json", json.dumps(names))
    _save_classifier(out / "classifier.safetensors", cfg, result, model, spec)
    M.plot_confusion_matrix(
        result["confusion_matrix"],
        names,
        out / "confusion_matrix.png",
        title=f"Confusion matrix (test, n={result['n_test']})",
    )
    _write_card(out, cfg, result, spec, ood)
    atomic_write_text(out / "metrics.json", json.dumps(result, indent=2))


# ----------------------------------------------------------------------------------------------
# CLI


def _comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in resolved(cfg).items() if k not in _NOT_RESULT_KEYS}


def _run_action(out: Path, cfg: dict[str, Any], force: bool) -> runs.Action:
    """The run-folder policy (training.runs). metrics.json is written last and marks a finished run;
    without it there is nothing to resume (no checkpoint), so the run starts afresh."""
    config = out / "config.yaml"
    finished = (out / "metrics.json").is_file()
    saved = _comparable(load_yaml(config)) if finished and config.is_file() else {}
    return runs.decide(out, runs.RunState(finished=finished, saved=saved), _comparable(cfg), force=force)


def run(args: argparse.Namespace) -> int:
    if args.data is None:
        raise ValueError("--data DIR is required (a folder of <class>/ sub-folders or a labels.csv)")
    if args.out is None:
        raise ValueError("--out RUNS/Y is required")
    cfg = {k: v for k, v in vars(args).items() if k != "config"}
    out: Path = args.out
    if _run_action(out, cfg, bool(args.force)) is runs.Action.SKIP:
        log.info("%s holds this finished run already (metrics.json); nothing to do (--force redoes it)", out)
        return 0
    parse_labels_per_class(args.labels_per_class)  # fail before any work on a bad value
    save_resolved(cfg, out)
    result = train_classifier(cfg)
    log.info(
        "test: accuracy %.3f, balanced accuracy %.3f, macro-F1 %.3f (n=%d) -> %s",
        result["accuracy"],
        result["balanced_accuracy"],
        result["macro_f1"],
        result["n_test"],
        out,
    )
    return 0
