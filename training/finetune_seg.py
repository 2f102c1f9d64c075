"""Few-label segmentation: ``nanomorph finetune-seg`` and :func:`train_segmenter`.

A segmentation-models-pytorch U-Net (Ronneberger et al., "U-Net", MICCAI 2015) whose encoder is the
pretrained nanomorph backbone, loaded strictly (``training.models.load_encoder_into_unet``), trained
on random tiles of a few labeled frames with Dice + cross-entropy, and evaluated on a held-out split
by overlapping sliding-window inference with blending (``nanomorph.contract.tile`` / ``untile``), so
a 2048x2048 frame gets a full-resolution mask.

With a pretrained encoder and ``--no-freeze-encoder`` the decoder is trained alone first
(``decoder_warmup`` of the steps) and the encoder then joins at ``encoder_lr_scale`` times the
decoder's rate: the random decoder's first gradients would otherwise wreck the pretrained features
(the LP-FT argument of Kumar et al., "Fine-Tuning can Distort Pretrained Features", ICLR 2022). The
warm-up is what protects them; a lower encoder rate afterwards (0.1, the old default) held the SSL
encoder back on real particles at 8, 32 and 310 labelled images (docs/results.md), so it is 1.

Run folder (docs/architecture.md §3): ``config.yaml``, ``metrics.json``, ``metrics.jsonl``,
``checkpoint.pt`` (resumable), ``segmenter.safetensors``, ``classes.json``, ``overlays/*.png``,
``README.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nanomorph.atomic import atomic_path, atomic_write_text
from nanomorph.config import resolved, save_resolved, yaml_defaults
from nanomorph.contract import Contract, mask_dtype, normalise, read_image, tile, untile
from nanomorph.particles import BOUNDARY_CLASS, InstanceParams, fold_mask, semantic_classes
from nanomorph.progress import progress
from training import runs
from training.artifacts import (
    SEGMENTER_FILE,
    SEGMENTER_FORMAT,
    read_weights,
    resolve_encoder_source,
    write_weights,
)
from training.device import pick_device, pick_precision
from training.models import build_unet, load_encoder_into_unet
from training.runio import (
    MetricsLogger,
    load_checkpoint,
    save_checkpoint,
    write_model_card,
)
from training.schedule import WarmupCosine
from training.seg_data import (
    SegTileDataset,
    check_pairs,
    classes_from_data,
    find_pairs,
    load_pair,
    read_mask,
    split_indices,
)
from training.seg_instances import (
    instance_file,
    instance_params,
    load_target_pair,
    read_instances,
    tune_instances,
)
from training.seg_losses import DiceCELoss, pixel_confusion, score_prob_maps, scores_from_confusion

log = logging.getLogger("nanomorph.finetune_seg")

COMMAND = "finetune-seg"
METRIC_NOTE = (
    "hard metrics: each pixel's class is the argmax of the softmax probabilities from overlapping "
    "sliding-window inference; IoU and Dice are summed over all pixels of the held-out test images"
)
# Options that change the result: a finished run folder is reused only when these all match.
_RESULT_KEYS = (
    "encoder", "arch", "data", "classes", "labeled_images", "freeze_encoder", "tile", "tile_overlap",
    "test_fraction", "val_fraction", "seed", "epochs", "steps", "batch_size", "lr", "encoder_lr_scale",
    "decoder_warmup", "weight_decay", "fg_fraction", "invert_fraction", "dice_weight", "instances",
    "tune_instances",
)  # fmt: skip
# What runs saved before a setting existed used: no instance training, no inverted tiles, the
# post-processing defaults.
_SETTINGS_BEFORE_THEY_EXISTED = {"instances": "off", "invert_fraction": 0.0, "tune_instances": False}
# Fewer validation particles than this and the chosen post-processing is flagged as a guess (EMPS:
# choices made on 8 and 112 particles, 1 and 3 images, sat at the grid's edge; on 627, 31 images, inside it).
FEW_TUNING_PARTICLES = 200


# ----------------------------------------------------------------------------------------- config
def default_config() -> dict[str, Any]:
    """The packaged defaults (``training/configs/finetune-seg.yaml``, the only source of them)."""
    return dict(yaml_defaults(COMMAND))


def _parse_classes(value: Any, data: Path) -> list[str]:
    if value is None or value == "":
        found = classes_from_data(data)
        if not found:
            raise ValueError(f"--classes is required for {data} (e.g. --classes background,wire)")
        return found
    names = [c.strip() for c in value.split(",")] if isinstance(value, str) else [str(c) for c in value]
    names = [c for c in names if c]
    if len(names) < 2:
        raise ValueError(f"--classes needs background plus at least one class, got {value!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"--classes has duplicate names: {value!r}")
    return names


def build_segmenter(encoder: str, arch: str | None, n_classes: int) -> tuple[nn.Module, dict[str, str]]:
    """A U-Net on ``encoder`` (any :func:`training.artifacts.resolve_encoder_source` form) and facts
    for provenance."""
    src = resolve_encoder_source(encoder, arch)
    if src.kind == "run" and arch and arch != src.architecture:
        raise ValueError(
            f"--arch {arch} does not match the backbone {src.path} (architecture {src.architecture})"
        )
    unet = build_unet(src.architecture, n_classes)
    # Random init through our own backbone factory too, so scratch and pretrained share one code path.
    load_encoder_into_unet(unet, src.build().state_dict())
    info = {
        "architecture": src.architecture,
        "method": src.method,
        "encoder_source": str(src.path) if src.kind == "run" else src.init or "scratch",
    }
    if src.kind == "run":
        info["backbone_contract"] = src.meta.get("contract", "")
    return unet, info


def save_segmenter(unet: nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Writes the U-Net state dict with string metadata (format ``nanomorph-segmenter/1``), atomically."""
    meta = {"in_chans": "1", **metadata}
    return write_weights(unet, path, meta, SEGMENTER_FORMAT, required=("architecture", "classes", "contract"))


def load_segmenter(path: str | Path) -> tuple[nn.Module, dict[str, str]]:
    """Rebuilds a U-Net saved by ``finetune-seg`` (strict), in eval mode, with its string metadata.

    ``path`` is ``segmenter.safetensors`` or the run folder holding it. ``meta["classes"]`` and
    ``meta["contract"]`` are JSON strings (``Contract.from_json`` reads the latter).
    """
    path = Path(path)
    if path.is_dir():
        path = path / SEGMENTER_FILE
    state, meta = read_weights(path, SEGMENTER_FORMAT, required=("architecture", "classes"))
    classes = json.loads(meta["classes"])
    unet = build_unet(meta["architecture"], len(classes))
    unet.load_state_dict(state, strict=True)
    unet.eval()
    return unet, meta


# ------------------------------------------------------------------------------------- inference
@torch.no_grad()
def predict_probs(
    model: nn.Module, image01: np.ndarray, contract: Contract, device: torch.device | str, batch_size: int = 8
) -> np.ndarray:
    """Class probabilities (C, H, W) of a normalised frame by overlapping tiles stitched with blending."""
    device = torch.device(device)
    tiles, positions, _ = tile(image01, contract.tile_size, contract.tile_overlap)
    was_training = model.training
    model.eval()
    outs = []
    try:
        for start in range(0, len(tiles), batch_size):
            batch = torch.from_numpy(np.ascontiguousarray(tiles[start : start + batch_size])[:, None])
            logits = model(batch.to(device, non_blocking=True))
            outs.append(logits.float().softmax(dim=1).cpu().numpy())
    finally:
        model.train(was_training)
    return untile(np.concatenate(outs), positions, image01.shape, contract.tile_size)


def segment_image(
    model: nn.Module,
    image_raw: np.ndarray,
    contract: Contract,
    device: torch.device | str = "cpu",
    batch_size: int = 8,
) -> tuple[np.ndarray, np.ndarray]:
    """Segments a raw frame of any size at native resolution.

    The whole frame is normalised with the contract, cut into overlapping ``tile_size`` tiles (a
    multiple of 32; frames smaller than a tile are padded and cropped back), and the per-tile
    softmax maps are blended into one map.

    Returns:
        ``(mask, probs)``: (H, W) uint8 argmax mask and (C, H, W) float32 probabilities.
    """
    probs = predict_probs(model, normalise(image_raw, contract), contract, device, batch_size)
    mask = probs.argmax(axis=0).astype(mask_dtype(probs.shape[0]))
    return mask, probs.astype(np.float32, copy=False)


def evaluate(
    model: nn.Module,
    frames: list[np.ndarray],
    masks: list[np.ndarray],
    classes: list[str],
    contract: Contract,
    device: torch.device,
    batch_size: int = 8,
    inst: InstanceParams | None = None,
) -> dict[str, Any]:
    """Hard IoU / Dice of ``model`` on normalised frames with their semantic masks
    (``training.seg_losses.score_prob_maps``: an instance model's rim is folded into the particle,
    so model selection follows the particles, not rim noise)."""
    prob_maps = (predict_probs(model, frame, contract, device, batch_size) for frame in frames)
    return score_prob_maps(prob_maps, masks, classes, inst)


def _write_overlay(path: Path, image01: np.ndarray, truth: np.ndarray, pred: np.ndarray, n: int) -> None:
    """``truth | prediction`` side by side, coloured with ``nanomorph.morphology.overlay``."""
    from PIL import Image

    from nanomorph.morphology import overlay

    gap = np.full((image01.shape[0], 4, 3), 255, dtype=np.uint8)
    both = np.concatenate([overlay(image01, truth, n), gap, overlay(image01, pred, n)], axis=1)
    with atomic_path(path) as tmp:
        Image.fromarray(both).save(tmp)


# -------------------------------------------------------------------------------------- training
def _set_encoder_trainable(unet: nn.Module, trainable: bool) -> None:
    for p in unet.encoder.parameters():  # type: ignore[union-attr]
        p.requires_grad_(trainable)


def _train_mode(unet: nn.Module, encoder_frozen: bool) -> None:
    unet.train()
    if encoder_frozen:
        # Frozen encoder: keep its BatchNorm statistics too (a few tiles would overwrite them).
        unet.encoder.eval()  # type: ignore[union-attr]


def _config(config: dict[str, Any]) -> dict[str, Any]:
    """The packaged defaults overridden by ``config``, checked and normalised (compared as text on rerun)."""
    cfg = default_config()
    if "overwrite" in config:  # the old name of "force", for one release
        warnings.warn("finetune-seg option 'overwrite' is deprecated, use 'force'", DeprecationWarning, 3)
        config = {"force": config["overwrite"], **{k: v for k, v in config.items() if k != "overwrite"}}
    unknown = sorted(set(config) - set(cfg) - {"command", "config"})
    if unknown:
        raise ValueError(f"unknown finetune-seg option(s): {', '.join(unknown)}")
    cfg.update({k: v for k, v in config.items() if k not in ("command", "config")})
    if not cfg.get("data"):
        raise ValueError("--data is required (a folder with images/ and masks/)")
    cfg["data"], cfg["out"] = str(Path(cfg["data"])), str(Path(cfg["out"]))
    cfg["labeled_images"] = str(cfg["labeled_images"]).lower()
    cfg["encoder"] = str(cfg["encoder"])  # a Path from Python callers
    tile_size = int(cfg["tile"])
    cfg["tile_overlap"] = int(cfg["tile_overlap"]) if cfg["tile_overlap"] is not None else tile_size // 4
    if tile_size % 32:
        raise ValueError(f"--tile must be a multiple of 32 (U-Net downsamples 5 times), got {tile_size}")
    if not 0.0 <= float(cfg["invert_fraction"]) <= 1.0:
        raise ValueError(f"--invert-fraction must be in [0, 1], got {cfg['invert_fraction']}")
    cfg["force"] = bool(cfg.get("force"))
    cfg["tune_instances"] = bool(cfg["tune_instances"])
    return cfg


def _fingerprint(cfg: dict[str, Any]) -> str:
    return json.dumps({k: cfg.get(k) for k in _RESULT_KEYS}, sort_keys=True)


@dataclass
class _Existing:
    """What the run folder holds: the policy's action, a finished run's metrics, a checkpoint."""

    action: runs.Action
    metrics: dict[str, Any] | None = None
    checkpoint: dict[str, Any] | None = None


def _existing_run(out: Path, cfg: dict[str, Any]) -> _Existing:
    """The run-folder policy (training.runs): metrics.json marks a finished run (with the model file
    when one is saved), checkpoint.pt an interrupted one, which resumes by itself."""
    metrics_path, ckpt_path = out / "metrics.json", out / "checkpoint.pt"
    if cfg["force"]:
        state = runs.RunState(started=metrics_path.is_file() or ckpt_path.is_file())
        return _Existing(runs.decide(out, state, cfg, force=True, force_flag="--force"))
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    finished = metrics is not None and (not cfg.get("save_model", True) or (out / SEGMENTER_FILE).is_file())
    # A checkpoint is read only when it may be resumed (it is large).
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path.is_file() and not finished else None
    saved: dict[str, Any] | None = None
    if metrics is not None:
        saved = metrics.get("config", {})
    elif checkpoint is not None and checkpoint.get("fingerprint"):
        saved = json.loads(checkpoint["fingerprint"])
    state = runs.RunState(finished, started=ckpt_path.is_file() or metrics is not None, saved=saved)
    action = runs.decide(
        out, state, cfg, keys=_RESULT_KEYS, force_flag="--force (--overwrite)",
        before_they_existed=_SETTINGS_BEFORE_THEY_EXISTED,
    )  # fmt: skip
    return _Existing(action, metrics, checkpoint)


@dataclass
class _Setup:
    """Everything a segmentation run is made of, before the first step."""

    cfg: dict[str, Any]
    data: Path
    out: Path
    pairs: list[Any]
    classes: list[str]  # the model's channels (with the boundary class for instance training)
    inst: Any  # nanomorph.particles.InstanceParams or None
    unet: nn.Module
    enc_info: dict[str, str]
    contract: Contract
    split: Any  # training.seg_data split: train / val / test indices
    train_data: list[tuple[np.ndarray, np.ndarray]]  # frame, training target (rim class with inst)
    val_data: list[tuple[np.ndarray, np.ndarray]]  # frame, semantic mask
    device: torch.device
    bf16: bool = False  # bf16 autocast in the training step (training.device.pick_precision)

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def scored_classes(self) -> list[str]:
        """The classes scores are reported over: an instance model's rim is part of its particle."""
        return semantic_classes(self.classes, self.inst)

    @property
    def pretrained(self) -> bool:
        return self.enc_info["method"] != "none"

    def stems(self) -> dict[str, list[str]]:
        return {
            name: [self.pairs[i].stem for i in getattr(self.split, name)] for name in ("train", "val", "test")
        }


def _setup(cfg: dict[str, Any], data: Path, pairs: list[Any], classes: list[str], inst: Any) -> _Setup:
    """Builds the U-Net, the contract and the splits, and loads the labeled frames."""
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(str(cfg["device"]))
    cfg["precision_used"] = pick_precision(cfg.get("precision"), device)
    save_resolved(cfg, out)
    torch.manual_seed(int(cfg["seed"]))
    model_classes = classes + [BOUNDARY_CLASS] if inst else classes
    unet, enc_info = build_segmenter(str(cfg["encoder"]), cfg["arch"], len(model_classes))
    base_contract = (
        Contract.from_json(enc_info["backbone_contract"]) if enc_info.get("backbone_contract") else Contract()
    )
    # Segmentation keeps the backbone's intensity normalisation and adds its own tiling.
    contract = Contract.from_dict(
        {**base_contract.to_dict(), "tile_size": int(cfg["tile"]), "tile_overlap": cfg["tile_overlap"]}
    )
    split = split_indices(
        len(pairs),
        float(cfg["test_fraction"]),
        float(cfg["val_fraction"]),
        cfg["labeled_images"],
        int(cfg["seed"]),
    )
    log.info(
        "%d pairs: %d train, %d validation, %d test (seed %s); classes %s",
        len(pairs), len(split.train), len(split.val), len(split.test), cfg["seed"], classes,
    )  # fmt: skip
    train_data = [load_target_pair(data, pairs[i], contract, len(classes), inst) for i in split.train]
    # Validation scores the semantic mask (evaluate folds the rim back into the particle).
    val_data = [load_pair(pairs[i], contract, len(classes)) for i in split.val]
    return _Setup(
        cfg,
        data,
        out,
        pairs,
        model_classes,
        inst,
        unet,
        enc_info,
        contract,
        split,
        train_data,
        val_data,
        device,
        bf16=cfg["precision_used"] == "bf16",
    )


@dataclass
class _Schedule:
    """How long training runs and when it validates (steps of ``batch`` tiles)."""

    batch: int
    tile: int
    steps_per_epoch: int
    total_steps: int
    val_every: int

    @classmethod
    def of(cls, s: _Setup) -> _Schedule:
        # --steps wins; else epochs of about one pass over the labeled area in tiles.
        cfg = s.cfg
        batch, tile_size = int(cfg["batch_size"]), int(cfg["tile"])
        train_pixels = sum(m.size for _, m in s.train_data)
        steps_per_epoch = max(1, math.ceil(train_pixels / tile_size**2 / batch))
        total = int(cfg["steps"]) if cfg["steps"] else int(cfg["epochs"]) * steps_per_epoch
        if total < 1:
            raise ValueError(
                f"need at least one training step, got steps={cfg['steps']} epochs={cfg['epochs']}"
            )
        val_every = max(steps_per_epoch, math.ceil(total / max(1, int(cfg["max_val_evals"]))))
        return cls(batch, tile_size, steps_per_epoch, total, val_every)


class _Trainer:
    """The optimiser, the learning-rate schedule and the resumable state of one segmentation run."""

    def __init__(self, s: _Setup, sched: _Schedule) -> None:
        cfg, unet = s.cfg, s.unet
        self.s, self.sched = s, sched
        self.frozen_always = bool(cfg["freeze_encoder"])
        self.warmup_steps = (
            int(round(float(cfg["decoder_warmup"]) * sched.total_steps)) if s.pretrained else 0
        )
        self.enc_scale = float(cfg["encoder_lr_scale"]) if s.pretrained else 1.0
        if self.frozen_always and not s.pretrained:
            log.warning("--freeze-encoder with a scratch encoder trains the decoder on random features")
        unet.to(s.device)
        if s.device.type == "cpu":
            unet.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN)
        lr, wd = float(cfg["lr"]), float(cfg["weight_decay"])
        decoder_params = [p for n, p in unet.named_parameters() if not n.startswith("encoder.")]
        groups: list[dict[str, Any]] = [{"params": decoder_params, "lr": lr}]
        if not self.frozen_always:
            groups.append({"params": list(unet.encoder.parameters()), "lr": lr * self.enc_scale})  # type: ignore[union-attr]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.loss_fn = DiceCELoss(s.n_classes, dice_weight=float(cfg["dice_weight"])).to(s.device)
        self.ckpt_path, self.best_path = s.out / "checkpoint.pt", s.out / "best.pt"
        self.metrics_log = MetricsLogger(s.out / "metrics.jsonl")
        self.step, self.best_score, self.best_step = 0, -1.0, -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.train_seconds = 0.0
        self.best_saved_step = -1
        self.last_save = time.monotonic()
        # Short linear warm-up, then cosine decay to 1 % of the base rate.
        self._schedule = WarmupCosine.over(sched.total_steps, warmup_divisor=20, floor=0.01)

    def lr_factor(self, step: int) -> float:
        return self._schedule(step)

    def restore(self, existing: _Existing) -> None:
        """Continues from the checkpoint of an interrupted run with the same settings."""
        ckpt = existing.checkpoint
        if existing.action is not runs.Action.RESUME or ckpt is None:
            self.metrics_log.truncate(lambda r: False)
            return
        if ckpt.get("fingerprint") != _fingerprint(self.s.cfg):
            log.warning("%s was written with other settings; starting afresh", self.ckpt_path)
            self.metrics_log.truncate(lambda r: False)
            return
        self.s.unet.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.step, self.best_score, self.best_step = (
            int(ckpt["step"]),
            float(ckpt["best_score"]),
            int(ckpt["best_step"]),
        )
        if self.best_step >= 0:
            best = load_checkpoint(self.best_path)
            if int(best.get("step", -2)) != self.best_step:
                raise ValueError(f"{self.best_path} does not belong to {self.ckpt_path}; rerun with --force")
            self.best_state = best["model"]
        self.train_seconds = float(ckpt.get("train_seconds", 0.0))
        self.best_saved_step = self.best_step
        self.metrics_log.truncate(lambda r: int(r.get("step", 0)) <= self.step)
        log.info("resuming %s at step %d/%d", self.ckpt_path, self.step, self.sched.total_steps)

    def save(self) -> None:
        if self.best_state is not None and self.best_saved_step != self.best_step:
            # Its own file, written only when it changed: the checkpoint stays small.
            save_checkpoint({"model": self.best_state, "step": self.best_step}, self.best_path)
            self.best_saved_step = self.best_step
        self.last_save = time.monotonic()
        save_checkpoint(
            {
                "model": self.s.unet.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "best_score": self.best_score, "best_step": self.best_step,
                "train_seconds": self.train_seconds, "fingerprint": _fingerprint(self.s.cfg),
            },
            self.ckpt_path,
        )  # fmt: skip

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """One optimiser step; the encoder waits frozen during the decoder warm-up."""
        s, device = self.s, self.s.device
        encoder_frozen = self.frozen_always or self.step < self.warmup_steps
        _set_encoder_trainable(s.unet, not encoder_frozen)
        _train_mode(s.unet, encoder_frozen)
        for g, base in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            g["lr"] = base * self.lr_factor(self.step)
        x = x.to(device, non_blocking=True)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=s.bf16):
            logits = s.unet(x)
        loss = self.loss_fn(logits.float(), y)  # the loss in fp32 whatever the step ran in
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        return float(loss.item())

    def validate(self, running: float) -> None:
        """Validation mIoU now; keeps the best weights (model selection never sees the test split)."""
        s = self.s
        if not s.val_data:
            return
        scores = evaluate(
            s.unet, [f for f, _ in s.val_data], [m for _, m in s.val_data], s.classes, s.contract, s.device,
            int(s.cfg["infer_batch_size"]), s.inst,
        )  # fmt: skip
        score = scores["mean_iou_foreground"] or 0.0
        self.metrics_log.log(step=self.step, split="val", mean_iou_foreground=score, loss_ema=running)
        log.info(
            "step %d/%d: loss %.4f, validation mIoU %.4f", self.step, self.sched.total_steps, running, score
        )
        if score > self.best_score:
            self.best_score, self.best_step = score, self.step
            self.best_state = {k: v.detach().cpu().clone() for k, v in s.unet.state_dict().items()}

    def fit(self, dataset: SegTileDataset) -> dict[str, Any]:
        """Trains to the last step and selects the best validated weights; returns speed facts."""
        s, sched, cfg = self.s, self.sched, self.s.cfg
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, range(self.step * sched.batch, sched.total_steps * sched.batch)),
            batch_size=sched.batch, shuffle=False, num_workers=int(cfg["workers"]), drop_last=False,
        )  # fmt: skip
        log.info(
            "training %s U-Net (%s encoder, %s) for %d steps of %d tiles of %d px on %s",
            s.enc_info["architecture"], s.enc_info["method"],
            "frozen" if self.frozen_always
            else f"decoder-only for {self.warmup_steps} steps, then encoder lr x{self.enc_scale}",
            sched.total_steps, sched.batch, sched.tile, s.device,
        )  # fmt: skip
        bar = progress(loader, total=sched.total_steps - self.step, desc="finetune-seg", logger=log)
        tiles_seen, session_seconds, t_start, running = 0, 0.0, time.perf_counter(), 0.0
        for x, y in bar:
            loss = self.train_step(x, y)
            tiles_seen += x.shape[0]
            running = loss if self.step == 1 else 0.9 * running + 0.1 * loss
            bar.set_postfix(loss=running)
            if self.step % max(1, min(50, sched.val_every // 2)) == 0:
                lr = self.optimizer.param_groups[0]["lr"]
                self.metrics_log.log(step=self.step, split="train", loss=loss, lr=lr)
            if self.step % sched.val_every == 0 or self.step == sched.total_steps:
                elapsed = time.perf_counter() - t_start
                self.train_seconds += elapsed
                session_seconds += elapsed
                self.validate(running)
                # Checkpoints cost seconds (~170 MB for resnet18): at most one a minute, and at the end.
                since = time.monotonic() - self.last_save
                if self.step == sched.total_steps or since > float(cfg["checkpoint_every_s"]):
                    self.save()
                t_start = time.perf_counter()
        if hasattr(bar, "close"):
            bar.close()
        if self.best_state is not None:
            s.unet.load_state_dict(self.best_state)  # model selection on the validation split only
        s.unet.eval()
        return {
            "tiles_per_s": round(tiles_seen / session_seconds, 2)
            if session_seconds > 0 and tiles_seen
            else None
        }


def _test(s: _Setup) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Confusion matrix and per-image scores on the held-out test split, raw frames read one at a
    time from disk (they can be large); the first ``overlays`` get an overlay PNG. An instance
    model is scored like validation (see ``evaluate``): its rim folded into the particle, against
    the semantic mask, over ``s.scored_classes``."""
    n = len(s.scored_classes)
    test_cm = np.zeros((n, n), dtype=np.int64)
    per_image: list[dict[str, Any]] = []
    overlay_dir = s.out / "overlays"
    n_overlays = int(s.cfg["overlays"])
    if n_overlays:
        overlay_dir.mkdir(exist_ok=True)
    n_label_classes = s.n_classes - (1 if s.inst else 0)
    for j, i in enumerate(s.split.test):
        pair = s.pairs[i]
        raw, _ = read_image(pair.image)
        truth = read_mask(pair.mask, n_label_classes)
        if raw.shape != truth.shape:
            raise ValueError(f"mask {pair.mask} has shape {truth.shape}, its image {pair.image} {raw.shape}")
        pred, probs = segment_image(s.unet, raw, s.contract, s.device, int(s.cfg["infer_batch_size"]))
        if s.inst:
            pred = fold_mask(probs, s.inst)
        cm = pixel_confusion(truth, pred, n)
        test_cm += cm
        scores = {k: v for k, v in scores_from_confusion(cm, s.scored_classes).items() if k != "per_class"}
        per_image.append({"stem": pair.stem, **scores})
        if j < n_overlays:
            overlay = overlay_dir / f"{Path(pair.stem).name}.png"
            _write_overlay(overlay, normalise(raw, s.contract), truth, pred, n)
    return test_cm, per_image


def _choose_postprocessing(s: _Setup) -> dict[str, Any] | None:
    """An instance model's watershed parameters chosen on the validation images (``s.inst`` is
    replaced, so the saved model, the test scores and export carry them); what was tried and how
    it scored, or None for a model without instances or with ``--no-tune-instances``."""
    if s.inst is None or not s.cfg["tune_instances"]:
        return None
    if not s.split.val:
        log.warning("no validation images: the default instance post-processing is kept")
        return {"chosen": s.inst.to_dict(), "images": 0, "note": "no validation images: defaults kept"}

    def pairs() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for (frame, _), i in zip(s.val_data, s.split.val, strict=True):
            probs = predict_probs(s.unet, frame, s.contract, s.device, int(s.cfg["infer_batch_size"]))
            path = instance_file(s.data, s.pairs[i])
            assert path is not None  # every pair has one (instance_params checked)
            yield probs, read_instances(path)

    t0 = time.perf_counter()
    tuning = tune_instances(progress(pairs(), total=len(s.split.val), desc="choose post-processing"), s.inst)
    s.inst = tuning.params
    log.info(
        "instance post-processing chosen on %d validation images (%d particles) in %.0f s: validation AP@0.5 "
        "%.3f (defaults %.3f) with %s",
        tuning.images, tuning.particles, time.perf_counter() - t0, tuning.ap50, tuning.ap50_default,
        tuning.params.to_dict(),
    )  # fmt: skip
    if tuning.particles < FEW_TUNING_PARTICLES:
        log.warning(
            "the post-processing was chosen on only %d validation particles: it may not carry to other images "
            "(raise --val-fraction or label more images)", tuning.particles,
        )  # fmt: skip
    return tuning.to_dict()


def _metrics(s: _Setup, trainer: _Trainer, speed: dict[str, Any]) -> dict[str, Any]:
    """The content of ``metrics.json``: held-out test scores, split, training facts, config."""
    test_cm, per_image = _test(s)
    sched, selected = trainer.sched, trainer.best_state is not None
    return {
        "task": "segment",
        "metric_type": "hard (argmax)",
        "note": METRIC_NOTE,
        "classes": s.classes,
        **scores_from_confusion(test_cm, s.scored_classes),
        "confusion_matrix": test_cm.tolist(),
        "per_image": per_image,
        "best_val_mean_iou_foreground": trainer.best_score if selected else None,
        "best_step": trainer.best_step if selected else sched.total_steps,
        "n_images": {"train": len(s.split.train), "val": len(s.split.val), "test": len(s.split.test)},
        "split": s.stems(),
        "train": {
            "steps": sched.total_steps,
            "batch_size": sched.batch,
            "tile": sched.tile,
            "tiles": sched.total_steps * sched.batch,
            "seconds": round(trainer.train_seconds, 2),
            "tiles_per_s": speed["tiles_per_s"],
            "device": str(s.device),
            "precision": "bf16" if s.bf16 else "fp32",
        },
        "encoder": {k: v for k, v in s.enc_info.items() if k != "backbone_contract"},
        "contract": s.contract.to_dict(),
        "config": resolved(s.cfg),
    }


def _write_outputs(s: _Setup, metrics: dict[str, Any]) -> None:
    """classes.json, the model, the card, then metrics.json (its presence marks the run finished)."""
    atomic_write_text(s.out / "classes.json", json.dumps(s.classes, indent=2) + "\n")
    if s.cfg["save_model"]:
        save_segmenter(
            s.unet,
            s.out / SEGMENTER_FILE,
            {
                "architecture": s.enc_info["architecture"], "classes": s.classes, "contract": s.contract.to_json(),
                "encoder_source": s.enc_info["encoder_source"], "method": s.enc_info["method"],
                "n_classes": str(s.n_classes), "task": "segment",
                **({"instances": s.inst.to_dict()} if s.inst else {}),
                "metrics": {"mean_iou_foreground": metrics["mean_iou_foreground"],
                            "mean_dice_foreground": metrics["mean_dice_foreground"], "metric_type": "hard (argmax)"},
            },
        )  # fmt: skip
    _write_card(s.out, metrics, s.enc_info)
    atomic_write_text(s.out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    (s.out / "best.pt").unlink(missing_ok=True)  # the selected weights live in segmenter.safetensors now
    if not s.cfg["keep_checkpoint"]:
        (s.out / "checkpoint.pt").unlink(missing_ok=True)


def train_segmenter(config: dict[str, Any]) -> dict[str, Any]:
    """Trains and evaluates one segmenter; the Python API behind ``nanomorph finetune-seg``.

    Args:
        config: options by their ``finetune-seg`` names (``data``, ``classes``, ``encoder``,
            ``labeled_images``, ``seed``, ``out``, ...); missing ones take the packaged defaults.
            Besides the CLI flags: ``save_model`` (False skips the safetensors file) and
            ``keep_checkpoint`` (False deletes ``checkpoint.pt`` when done), for studies.

    Returns:
        The content of ``metrics.json``: ``mean_iou_foreground``, ``mean_dice_foreground``,
        ``pixel_accuracy``, ``per_class`` (IoU, Dice), ``split`` (stems), ``train`` (steps, tiles/s), ...

    Raises:
        ValueError / FileNotFoundError: bad options or data, with a message naming the file.
    """
    cfg = _config(config)
    data, out = Path(cfg["data"]), Path(cfg["out"])
    pairs = find_pairs(data)
    classes = _parse_classes(cfg["classes"], data)
    cfg["classes"] = ",".join(classes)
    check_pairs(pairs, len(classes))
    inst = instance_params(cfg, data, pairs, len(classes))
    cfg["instances"] = json.dumps(inst.to_dict(), sort_keys=True) if inst else "off"
    existing = _existing_run(out, cfg)
    if existing.action is runs.Action.SKIP:
        log.info("%s: finished run with the same settings found, not retraining", out)
        assert existing.metrics is not None
        return existing.metrics

    s = _setup(cfg, data, pairs, classes, inst)
    sched = _Schedule.of(s)
    dataset = SegTileDataset(
        [f for f, _ in s.train_data], [m for _, m in s.train_data], sched.tile,
        length=sched.total_steps * sched.batch, seed=int(cfg["seed"]), fg_fraction=float(cfg["fg_fraction"]),
        invert_fraction=float(cfg["invert_fraction"]),
    )  # fmt: skip
    trainer = _Trainer(s, sched)
    trainer.restore(existing)
    speed = trainer.fit(dataset)
    tuning = _choose_postprocessing(s)
    metrics = _metrics(s, trainer, speed)
    if tuning is not None:
        metrics["instances"] = tuning
    _write_outputs(s, metrics)
    log.info(
        "test mean IoU (foreground) %s, Dice %s on %d held-out images -> %s",
        _fmt(metrics["mean_iou_foreground"]), _fmt(metrics["mean_dice_foreground"]), len(s.split.test), out,
    )  # fmt: skip
    return metrics


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def _particles_card(cfg: dict[str, Any], tuning: dict[str, Any] | None) -> str:
    """The model card's line on how particles are drawn from the masks."""
    if cfg.get("instances", "off") == "off":
        return "connected components of the mask (no instances/ labels)"
    text = (
        "boundary-watershed: trained on instances/ with a boundary class (each particle's rim), so touching "
        "particles are split by a watershed seeded from the interiors (nanomorph.particles)"
    )
    if not tuning or not tuning.get("images"):
        return f"{text}; parameters {cfg['instances']}"
    return (
        f"{text}; parameters {json.dumps(tuning['chosen'], sort_keys=True)}, chosen on {tuning['images']} "
        f"validation images from {tuning['candidates']} candidates: validation AP@0.5 {tuning['val_ap50']:.3f} "
        f"(defaults {tuning['val_ap50_default']:.3f})"
    )


def _write_card(out: Path, metrics: dict[str, Any], enc_info: dict[str, str]) -> None:
    per_class = "\n".join(
        ["| class | IoU | Dice | true pixels |", "|---|---|---|---|"]
        + [
            f"| {name} | {_fmt(v['iou'])} | {_fmt(v['dice'])} | {v['true_pixels']} |"
            for name, v in metrics["per_class"].items()
        ]
    )
    cfg = metrics["config"]
    write_model_card(
        out / "README.md",
        "nanomorph segmenter",
        {
            "Model": {
                "network": f"U-Net (segmentation-models-pytorch), encoder {enc_info['architecture']}",
                "encoder": f"{enc_info['encoder_source']} (method {enc_info['method']})",
                "encoder training": "frozen" if cfg["freeze_encoder"] else "fine-tuned",
                "classes": ", ".join(metrics["classes"]),
                "tile / overlap": f"{metrics['contract']['tile_size']} / {metrics['contract']['tile_overlap']} px",
                "particles": _particles_card(cfg, metrics.get("instances")),
            },
            "Data": {
                "data": cfg["data"],
                "labeled images": f"{metrics['n_images']['train']} train + {metrics['n_images']['val']} validation",
                "held-out test images": metrics["n_images"]["test"],
                "seed": cfg["seed"],
            },
            "Held-out test metrics": (
                f"{METRIC_NOTE}. Class 0 is background; means are over the foreground classes.\n\n"
                f"- mean IoU (foreground): {_fmt(metrics['mean_iou_foreground'])}\n"
                f"- mean Dice (foreground): {_fmt(metrics['mean_dice_foreground'])}\n"
                f"- pixel accuracy: {_fmt(metrics['pixel_accuracy'])}\n\n{per_class}"
            ),
            "Training": {
                "steps": metrics["train"]["steps"],
                "tiles per step": metrics["train"]["batch_size"],
                "seconds": metrics["train"]["seconds"],
                "tiles/s": metrics["train"]["tiles_per_s"],
                "device": metrics["train"]["device"],
                "arithmetic": "bf16 autocast (loss in fp32)"
                if metrics["train"]["precision"] == "bf16"
                else "fp32",
                "model selection": "best validation mean IoU" if metrics["n_images"]["val"] else "last step",
            },
            "Files": [
                "segmenter.safetensors: U-Net state dict; metadata architecture, classes, contract",
                "classes.json: class names in index order",
                "overlays/*.png: test images, ground truth (left) and prediction (right)",
                "metrics.json, metrics.jsonl, config.yaml, checkpoint.pt (resumable)",
            ],
            "Limitations": (
                "Few labeled images: the numbers above come from a small held-out split and carry "
                "large uncertainty; check the overlays before trusting measurements from the masks."
            ),
        },
    )


# --------------------------------------------------------------------------- the command (nanomorph.cli calls run)
def run(args: argparse.Namespace) -> int:
    metrics = train_segmenter(dict(vars(args)))
    print(
        f"finetune-seg: mean IoU (foreground, hard) {_fmt(metrics['mean_iou_foreground'])}, "
        f"Dice {_fmt(metrics['mean_dice_foreground'])} on {metrics['n_images']['test']} test images; "
        f"wrote {metrics['config']['out']}"
    )
    return 0
