"""``nanomorph pretrain``: self-supervised pretraining (SimCLR / Barlow Twins) on an unlabeled folder.

Leaves ``OUT/``: ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt`` (atomic, every epoch,
``weights_only=True``), ``backbone.safetensors`` and a ``README.md`` model card
(docs/architecture.md §3).

Learning rate: ``lr = base_lr * global_batch / 256`` for SGD and LARS (linear scaling, Goyal et al.
2017, as in SimCLR and Barlow Twins) and ``base_lr * sqrt(global_batch / 256)`` for AdamW (adaptive
optimisers scale with the square root; Malladi et al. 2022), linear warm-up then cosine decay to 0,
stepped every optimiser step.

Crops come only from where frames carry structure (``structured_crops``: burned-in scale-bar and
text strips and near-uniform tiles are detected and skipped, :mod:`nanomorph.contract.structure`).
Label-free quality signals (:mod:`training.quality`: effective rank, alignment, uniformity) are
measured on fixed crops before training and after every ``quality_every`` epochs, and the run ends
with one verdict line.
Runs unchanged under ``torchrun --nproc_per_node=N`` (DDP; the losses gather across processes;
only rank 0 writes).

Re-running (``training.runs``): a finished run folder is skipped (exit 0, nothing rewritten) when its
settings match; an unfinished one needs ``--resume`` (which continues from the last completed
epoch); other settings are refused with the keys that changed; ``--force`` starts over.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import random
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from nanomorph.config import save_resolved
from nanomorph.contract import Contract
from nanomorph.progress import progress
from training import distributed as dist_utils
from training import quality as quality_lib
from training import runs
from training.augment import AugmentConfig, BatchAugment
from training.backbones import create_backbone, save_backbone
from training.data import ArrayCache, LabeledFolder, UnlabeledFolder
from training.device import pick_precision
from training.runio import (
    MetricsLogger,
    load_checkpoint,
    read_metrics,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_model_card,
)
from training.schedule import WarmupCosine
from training.ssl import (
    SSLConfig,
    SSLLoss,
    SSLModel,
    build_projector,
    multi_view_loss,
    param_groups,
    resolve_config,
)

log = logging.getLogger("nanomorph.pretrain")

CHECKPOINT_FORMAT = "nanomorph-pretrain-checkpoint/1"
# (base_lr, weight_decay, how the lr scales with the global batch). AdamW 2e-3 gives lr 1e-3 at a
# batch of 64: on real frames the loss fell and the probe beat random init there, while SGD at the
# linear-scaled 0.075 barely moved in the same budget (docs/results.md).
OPTIMIZER_DEFAULTS = {
    "sgd": (0.3, 5e-4, "linear"),
    "lars": (0.3, 1e-6, "linear"),
    "adamw": (2e-3, 0.05, "sqrt"),
}
# Settings that define a run: resuming (or skipping) with different values is refused.
RUN_KEYS = (
    "data",
    "method",
    "backbone",
    "init",
    "image_size",
    "crop_size",
    "crops_per_image",
    "batch_size",
    "global_batch",
    "epochs",
    "steps_per_epoch",
    "ssl",
    "optimizer",
    "base_lr",
    "weight_decay",
    "momentum",
    "warmup_epochs",
    "lr_floor",
    "scale_min",
    "scale_max",
    "ratio_max",
    "structured_crops",
    "crop_norm",
    "noise",
    "rot90",
    "gamma",
    "resize_first",
    "local_views",
    "local_size",
    "seed",
)
# What runs saved before a setting existed used (their checkpoints lack the key); 4/3 as 1.333.
SETTINGS_BEFORE_THEY_EXISTED = {
    "lr_floor": 0.0,
    "ratio_max": 1.333,
    "crop_norm": False,
    "noise": True,
    "rot90": True,
    "gamma": 0.3,
    "resize_first": False,
    "local_views": 0,
    "local_size": 0,
}


class NonFiniteLossError(ValueError):
    """The loss became NaN/inf: training stops, the last good checkpoint is kept."""


# ---------------------------------------------------------------------------------------------
# helpers


def scaled_lr(optimizer: str, base_lr: float, global_batch: int) -> float:
    """The optimiser's lr for ``global_batch`` from its base lr at a batch of 256."""
    rule = OPTIMIZER_DEFAULTS[optimizer][2]
    factor = global_batch / 256 if rule == "linear" else math.sqrt(global_batch / 256)
    return base_lr * factor


def _resolve(args: argparse.Namespace, world_size: int) -> dict[str, Any]:
    """The run's effective settings (what defines it; saved in config.yaml and the checkpoint)."""
    if args.data is None:
        raise ValueError("--data is required (a folder of unlabeled images)")
    if args.out is None:
        raise ValueError("--out is required (the run folder to write)")
    for name in ("image_size", "batch_size", "epochs"):
        if getattr(args, name) is None or int(getattr(args, name)) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be a positive integer")
    if int(args.batch_size) < 2:
        raise ValueError("--batch-size must be >= 2 (the losses compare samples within a batch)")
    if float(args.gamma) < 0:
        raise ValueError(f"--gamma must be >= 0 (exponents in [1/(1+g), 1+g]), got {args.gamma}")
    if not 0 <= float(args.lr_floor) <= 1:
        raise ValueError(f"--lr-floor must be in [0, 1] (a share of the lr), got {args.lr_floor}")
    if float(args.ratio_max) < 1:
        raise ValueError(f"--ratio-max must be >= 1 (aspect ratios in [1/r, r]), got {args.ratio_max}")
    local_views, local_size = _local_views(args)
    ssl_cfg = resolve_config(args.method, args.preset, args.projector, args.temperature, args.lambda_param)
    base_lr, wd, _ = OPTIMIZER_DEFAULTS[args.optimizer]
    base_lr = float(args.base_lr if args.base_lr is not None else base_lr)
    wd = float(args.weight_decay if args.weight_decay is not None else wd)
    global_batch = int(args.batch_size) * world_size
    return {
        "data": str(Path(args.data).resolve()),
        "method": args.method,
        "backbone": args.backbone,
        "init": str(args.init or "none"),
        "image_size": int(args.image_size),
        "crop_size": int(args.crop_size or args.image_size),
        "crops_per_image": int(args.crops_per_image or 1),
        "batch_size": int(args.batch_size),
        "global_batch": global_batch,
        "epochs": int(args.epochs),
        "steps_per_epoch": int(args.steps_per_epoch) if args.steps_per_epoch else None,
        "ssl": ssl_cfg.to_dict(),
        "optimizer": args.optimizer,
        "base_lr": base_lr,
        "lr": scaled_lr(args.optimizer, base_lr, global_batch),
        "weight_decay": wd,
        "momentum": float(args.momentum),
        "warmup_epochs": float(args.warmup_epochs),
        "lr_floor": float(args.lr_floor),
        "scale_min": float(args.scale_min),
        "scale_max": float(args.scale_max),
        "ratio_max": float(args.ratio_max),
        "structured_crops": bool(args.structured_crops),
        "crop_norm": bool(args.crop_norm),
        "noise": bool(args.noise),
        "rot90": bool(args.rot90),
        "gamma": float(args.gamma),
        "resize_first": bool(args.resize_first),
        "local_views": local_views,
        "local_size": local_size,
        "seed": int(args.seed),
    }


def _local_views(args: argparse.Namespace) -> tuple[int, int]:
    """(local views per crop, their side): side 0 when there are none, two thirds of the input side
    when not given (what was measured on real EM frames: docs/results.md)."""
    views = int(getattr(args, "local_views", 0) or 0)
    if views < 0:
        raise ValueError(f"--local-views must be >= 0, got {views}")
    given = int(getattr(args, "local_size", None) or 0)
    if not views:
        if given:  # a side with no views would be silently ignored
            raise ValueError(f"--local-size {given} needs --local-views >= 1 (got 0: no local views)")
        return 0, 0
    size = given or default_local_size(int(args.image_size))
    if not 8 <= size <= int(args.image_size):
        raise ValueError(f"--local-size must be in [8, --image-size {args.image_size}], got {size}")
    return views, size


def _existing_run(
    out: Path, cfg: dict[str, Any], args: argparse.Namespace, is_main: bool = True
) -> tuple[runs.Action, dict[str, Any] | None]:
    """The run-folder policy for ``out`` and the checkpoint to resume from (None: start)."""
    ckpt_path = out / "checkpoint.pt"
    if getattr(args, "force", False):
        if is_main:  # the old run's log would read as this one's
            (out / "metrics.jsonl").unlink(missing_ok=True)
        return runs.decide(out, runs.RunState(started=ckpt_path.exists()), cfg, force=True), None
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path.exists() else None
    if checkpoint is not None and checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{ckpt_path}: not a nanomorph pretraining checkpoint")
    done = int(checkpoint["epoch"]) if checkpoint is not None else 0
    state = runs.RunState(
        finished=done >= cfg["epochs"] and (out / "backbone.safetensors").exists(),
        started=checkpoint is not None or (out / "metrics.jsonl").exists(),
        saved=json.loads(checkpoint["run"]) if checkpoint is not None else None,
        progress=f"epoch {done}/{cfg['epochs']}" if checkpoint else "stopped before its first checkpoint",
    )
    action = runs.decide(
        out,
        state,
        cfg,
        resume=bool(args.resume),
        keys=RUN_KEYS,
        before_they_existed=SETTINGS_BEFORE_THEY_EXISTED,
    )
    return action, checkpoint


def augment_config(cfg: dict[str, Any]) -> AugmentConfig:
    """The augmentation recipe of a run's settings (``_resolve``); a setting they lack takes the
    value it had before it existed."""
    run = {**SETTINGS_BEFORE_THEY_EXISTED, **cfg}
    recipe = AugmentConfig(
        image_size=run["image_size"],
        scale=(run["scale_min"], run["scale_max"]),
        ratio=(1 / run["ratio_max"], run["ratio_max"]),
        gamma=float(run["gamma"]),
        resize_first=bool(run["resize_first"]),
    )
    if not run["rot90"]:
        recipe = replace(recipe, p_rot90=0.0)
    return recipe if run["noise"] else replace(recipe, p_gauss_noise=0.0, p_poisson_noise=0.0)


def default_local_size(image_size: int) -> int:
    """The local views' side when ``--local-size`` is not given: two thirds of the input side."""
    return image_size * 2 // 3


def local_recipe(recipe: AugmentConfig, local_size: int) -> AugmentConfig:
    """The global ``recipe`` at the local side, with the crop area shrunk by (local side / input
    side)² so that a local view shows its particles at the same magnification as the global views
    do: size stays information."""
    shrink = (local_size / recipe.image_size) ** 2
    return replace(recipe, image_size=local_size, scale=(recipe.scale[0] * shrink, recipe.scale[1] * shrink))


def local_augment_config(cfg: dict[str, Any]) -> AugmentConfig | None:
    """The recipe of a run's local views (None without them): :func:`local_recipe` of its own."""
    run = {**SETTINGS_BEFORE_THEY_EXISTED, **cfg}
    return local_recipe(augment_config(cfg), run["local_size"]) if run["local_views"] else None


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float) -> Any:
    """SGD / LARS (lightly) / AdamW over :func:`training.ssl.param_groups` (no decay on biases, norms)."""
    groups = param_groups(model, weight_decay)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "lars":
        from lightly.utils.lars import LARS

        return LARS(groups, lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}")


@torch.no_grad()
def knn_accuracy(
    backbone: nn.Module, images: torch.Tensor, labels: torch.Tensor, k: int, device: torch.device
) -> float:
    """Leave-one-out k-NN accuracy (cosine similarity, similarity-weighted vote) of the embeddings."""
    was_training = backbone.training
    backbone.eval()
    feats = torch.cat(
        [backbone(images[i : i + 64].to(device)).float().cpu() for i in range(0, len(images), 64)]
    )
    backbone.train(was_training)
    feats = F.normalize(feats.flatten(1), dim=1)
    n = len(feats)
    if n < 2:
        return float("nan")
    sims = feats @ feats.T
    sims.fill_diagonal_(-float("inf"))
    k = max(1, min(k, n - 1))
    top_sims, top_idx = sims.topk(k, dim=1)
    n_classes = int(labels.max()) + 1
    votes = torch.zeros(n, n_classes)
    votes.scatter_add_(1, labels[top_idx], top_sims.clamp(min=0) + 1e-6)
    return float((votes.argmax(1) == labels).float().mean())


def _embedding_std(features: torch.Tensor) -> float:
    """Mean over dimensions of the batch std of L2-normalised features: about 1/sqrt(D) when
    healthy, near 0 when the representation collapses (Barlow Twins / SimSiam papers' alarm)."""
    z = F.normalize(features.detach().float().flatten(1), dim=1)
    return float(z.std(dim=0).mean())


def build_ssl_model(backbone: nn.Module, ssl_cfg: SSLConfig, device: torch.device) -> SSLModel:
    """Backbone + projector on ``device`` in channels_last (see ``forward_step``)."""
    embedding_dim = int(getattr(backbone, "num_features", 0) or 0)
    if not embedding_dim:
        with torch.no_grad():
            embedding_dim = int(backbone(torch.zeros(2, 1, 64, 64)).flatten(1).shape[1])
    model = SSLModel(backbone, build_projector(ssl_cfg, embedding_dim), embedding_dim).to(device)
    return model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]


def forward_step(
    model: nn.Module,
    criterion: nn.Module,
    augment: nn.Module,
    x: torch.Tensor,
    bf16: bool,
    local_augment: nn.Module | None = None,
    local_views: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Two augmented views of the batch ``x`` (and ``local_views`` smaller ones from
    ``local_augment``) through backbone + projector in ONE forward call (channels_last
    everywhere, bf16 autocast when ``bf16``: see ``training.device.pick_precision``), then the
    loss in fp32 (:func:`training.ssl.multi_view_loss`). Returns (features, loss); the features
    start with the first global view's."""
    # channels_last: oneDNN's CPU convolutions are faster in it too (resnet18 training step +15%,
    # efficientnet_b0 +50% on the 2-core box; never slower for the timm models measured).
    views = [torch.cat([augment(x), augment(x)]).contiguous(memory_format=torch.channels_last)]
    if local_augment is not None and local_views > 0:
        local = torch.cat([local_augment(x) for _ in range(local_views)])
        views.append(local.contiguous(memory_format=torch.channels_last))
    else:
        local_views = 0  # no recipe for them: two global views only
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        h, z = model(views if local_views else views[0])
    z_views = z.chunk(2 + local_views)
    return h, multi_view_loss(criterion, z_views[0], z_views[1], list(z_views[2:]))


# ---------------------------------------------------------------------------------------------
# the command


def run(args: argparse.Namespace) -> int:
    info = dist_utils.init_distributed(args.device or "auto")
    try:
        return _run(args, info)
    finally:
        dist_utils.cleanup()


def _run(args: argparse.Namespace, info: dist_utils.DistInfo) -> int:
    cfg = _resolve(args, info.world_size)
    out = Path(args.out)
    data_dir = Path(args.data)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"--data {data_dir} is not a folder")
    action, checkpoint = _existing_run(out, cfg, args, info.is_main)
    if action is runs.Action.SKIP:
        log.info("%s is already complete (%d epochs); nothing to do", out, cfg["epochs"])
        return 0
    _seed_and_tune(cfg["seed"] + info.rank, info.device)
    data = _prepare_data(args, cfg, info, data_dir)
    trainer = _build_trainer(cfg, info, data, checkpoint, out)
    args.precision_used = pick_precision(args.precision, info.device)  # saved in config.yaml
    trainer.bf16 = args.precision_used == "bf16"
    metrics = _open_run_folder(args, cfg, info, data, out, trainer.start_epoch)
    monitor: tuple[torch.Tensor, torch.Tensor] | None = None
    if args.monitor_labels and info.is_main:
        monitor = LabeledFolder(
            args.monitor_labels, image_size=cfg["image_size"], contract=data.contract
        ).tensors()
    _log_start(cfg, info, data)
    quality = QualityMonitor(data.dataset, data.augment, info.device, args, enabled=info.is_main)
    if trainer.start_epoch == 0 and quality.enabled:
        start_signals = quality.measure_start(trainer.model.backbone)
        metrics.log({"epoch": 0, "step": 0, "kind": "quality", **start_signals.to_dict()})
    last: dict[str, float] = {}
    for epoch in range(trainer.start_epoch, cfg["epochs"]):
        epoch_start = time.perf_counter()
        losses, feats = _train_epoch(trainer, data, cfg, info, epoch, metrics, int(args.log_every), out)
        record = _epoch_record(trainer, cfg, info, epoch, losses, feats, epoch_start)
        if monitor is not None:
            record["knn_accuracy"] = knn_accuracy(
                trainer.model.backbone, *monitor, int(args.knn_k), info.device
            )
        if quality.due(epoch + 1, cfg["epochs"]):
            record.update(quality.measure(trainer.model.backbone).to_dict())
        last = {k: v for k, v in record.items() if isinstance(v, float)}
        _report_epoch(record, cfg, info, metrics)
        _save_epoch_checkpoint(trainer, cfg, info, epoch, last, out / "checkpoint.pt")
        dist_utils.barrier()

    if info.is_main:
        precision = "bf16" if trainer.bf16 else "fp32"
        _finish(out, trainer.model, cfg, data.contract, trainer.model.embedding_dim, last, precision)
    dist_utils.barrier()
    return 0


def _seed_and_tune(seed: int, device: torch.device) -> None:
    """Seeds python, numpy and torch (per rank); on CUDA lets cuDNN pick kernels and use TF32."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass
class _Data:
    """The decoded folder and how batches are drawn from it."""

    contract: Contract
    dataset: UnlabeledFolder
    n_files: int
    workers: int
    sampler: DistributedSampler | RandomSampler
    sampler_gen: torch.Generator
    loader: DataLoader
    steps_per_epoch: int
    augment: BatchAugment
    local_augment: BatchAugment | None  # the local views' recipe (None: two global views only)
    local_views: int

    def set_epoch(self, epoch: int, seed: int) -> None:
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        else:
            self.sampler_gen.manual_seed(seed * 100003 + epoch)  # same order after a resume


def _prepare_data(
    args: argparse.Namespace, cfg: dict[str, Any], info: dist_utils.DistInfo, data_dir: Path
) -> _Data:
    """Decodes (and caches) the folder, checks it gives a batch, and builds the loader."""
    contract = Contract(image_size=cfg["image_size"])
    cache = ArrayCache(max_bytes=int(args.cache_mb) << 20, cache_dir=args.cache_dir)
    dataset = UnlabeledFolder(
        data_dir,
        cfg["crop_size"],
        contract,
        cfg["crops_per_image"],
        cache,
        cfg["structured_crops"],
        cfg["crop_norm"],
    )
    n_files = dataset.preload(
        lambda it, desc: progress(it, total=len(dataset.files), desc=desc, enabled=info.is_main)
    )
    if cfg["structured_crops"] and info.is_main:
        kept, total = dataset.tiles_kept
        log.info("structured crops: %d of %d tiles carry structure (the rest are skipped)", kept, total)
    if len(dataset) < cfg["batch_size"] * info.world_size:
        raise ValueError(
            f"{data_dir}: {len(dataset)} crops per epoch ({n_files} readable images x "
            f"{cfg['crops_per_image']}) are fewer than one batch of {cfg['batch_size']} per process; "
            "lower --batch-size or raise --crops-per-image"
        )
    workers = int(args.workers if args.workers is not None else -1)
    if workers < 0:
        # Cached arrays are just sliced: worker processes would only add IPC on 2 cores.
        fits = cache.nbytes > 0 and len(dataset.files) == n_files and cache.max_bytes >= cache.nbytes
        workers = 0 if fits else min(4, max(1, (os.cpu_count() or 2) // 2))
    sampler: DistributedSampler | RandomSampler
    sampler_gen = torch.Generator()
    if info.distributed:
        sampler = DistributedSampler(dataset, shuffle=True, seed=cfg["seed"], drop_last=True)
    else:
        sampler = RandomSampler(dataset, generator=sampler_gen)
    loader = DataLoader(
        dataset,
        batch_size=cfg["batch_size"],
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=info.device.type == "cuda",
        persistent_workers=workers > 0,
    )
    steps_per_epoch = len(loader)
    if cfg["steps_per_epoch"]:
        steps_per_epoch = min(steps_per_epoch, cfg["steps_per_epoch"])
    augment = BatchAugment(augment_config(cfg))
    local_recipe = local_augment_config(cfg)
    local_augment = BatchAugment(local_recipe) if local_recipe is not None else None
    return _Data(
        contract, dataset, n_files, workers, sampler, sampler_gen, loader, steps_per_epoch, augment,
        local_augment, int(cfg.get("local_views", 0)),
    )  # fmt: skip


@dataclass
class _Trainer:
    """Model, loss, optimiser and schedule, and where in the schedule the run stands."""

    model: SSLModel
    train_model: nn.Module  # the model, or its DDP wrapper
    criterion: SSLLoss
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LambdaLR
    bf16: bool = False  # bf16 autocast in the training step (training.device.pick_precision)
    start_epoch: int = 0
    global_step: int = 0


def _build_trainer(
    cfg: dict[str, Any],
    info: dist_utils.DistInfo,
    data: _Data,
    checkpoint: dict[str, Any] | None,
    out: Path,
) -> _Trainer:
    """Backbone + projector, loss, optimiser and warm-up + cosine schedule; restored from
    ``checkpoint`` when resuming; wrapped in DDP when distributed."""
    device = info.device
    backbone = create_backbone(cfg["backbone"], cfg["init"] if not checkpoint else "none")
    ssl_cfg = SSLConfig(**cfg["ssl"])
    model = build_ssl_model(backbone, ssl_cfg, device)
    criterion = SSLLoss(ssl_cfg, gather_distributed=info.distributed)
    optimizer = build_optimizer(model, cfg["optimizer"], cfg["lr"], cfg["weight_decay"], cfg["momentum"])
    total_steps = cfg["epochs"] * data.steps_per_epoch
    warmup_epochs = min(cfg["warmup_epochs"], 0.1 * cfg["epochs"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        WarmupCosine(round(warmup_epochs * data.steps_per_epoch), total_steps, floor=cfg["lr_floor"]),
    )
    trainer = _Trainer(model, model, criterion, optimizer, scheduler)
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        trainer.start_epoch, trainer.global_step = int(checkpoint["epoch"]), int(checkpoint["global_step"])
        rng = checkpoint["rng"][min(info.rank, len(checkpoint["rng"]) - 1)]
        set_rng_state(rng)
        log.info("resuming %s after epoch %d/%d", out, trainer.start_epoch, cfg["epochs"])
    if info.distributed:
        trainer.train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return trainer


def _open_run_folder(
    args: argparse.Namespace,
    cfg: dict[str, Any],
    info: dist_utils.DistInfo,
    data: _Data,
    out: Path,
    start_epoch: int,
) -> MetricsLogger:
    """The metrics log (cut back to the last finished epoch) and ``config.yaml`` (main process)."""
    metrics = MetricsLogger(out / "metrics.jsonl", enabled=info.is_main)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        # Drop what an interrupted epoch logged, so the log matches an uninterrupted run.
        metrics.truncate(lambda r: int(r.get("epoch", 0)) <= start_epoch)
        args.resolved = cfg
        args.contract = data.contract.to_dict()
        args.world_size = info.world_size
        args.device_used = str(info.device)
        args.workers_used = data.workers
        save_resolved(args, out)
    return metrics


def _log_start(cfg: dict[str, Any], info: dist_utils.DistInfo, data: _Data) -> None:
    (log.info if info.is_main else log.debug)(
        "pretraining %s/%s on %d images (%d steps/epoch, global batch %d, lr %.4g, %s, workers %d)",
        cfg["method"],
        cfg["backbone"],
        data.n_files,
        data.steps_per_epoch,
        cfg["global_batch"],
        cfg["lr"],
        info.device,
        data.workers,
    )
    if data.local_augment is not None and info.is_main:
        recipe = data.local_augment.config
        log.info(
            "multi-crop: %d local views of %d px per crop (area %.2f-%.2f, the global views' magnification)",
            data.local_views,
            recipe.image_size,
            *recipe.scale,
        )


def _train_epoch(
    trainer: _Trainer,
    data: _Data,
    cfg: dict[str, Any],
    info: dist_utils.DistInfo,
    epoch: int,
    metrics: MetricsLogger,
    log_every: int,
    out: Path,
) -> tuple[list[float], torch.Tensor | None]:
    """One epoch of optimiser steps; a step record every ``log_every`` steps.
    Returns the step losses and the last batch's features."""
    data.set_epoch(epoch, cfg["seed"])
    trainer.train_model.train()
    losses: list[float] = []
    feats: torch.Tensor | None = None
    t0 = time.perf_counter()
    every = max(1, log_every)
    steps = data.steps_per_epoch
    bar = progress(data.loader, total=steps, desc=f"epoch {epoch + 1}/{cfg['epochs']}", enabled=info.is_main)
    for step, batch in enumerate(bar):
        if step >= steps:
            break
        x = batch.to(info.device, non_blocking=True)
        h, loss = forward_step(
            trainer.train_model,
            trainer.criterion,
            data.augment,
            x,
            trainer.bf16,
            data.local_augment,
            data.local_views,
        )
        _check_finite(loss, info, epoch, step, out)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        trainer.optimizer.step()
        trainer.scheduler.step()
        trainer.global_step += 1
        loss_value = float(loss.detach())
        losses.append(loss_value)
        feats = h[: x.shape[0]]
        if (step + 1) % every == 0 or step + 1 == steps:
            now = time.perf_counter()
            ips = ((step % every) + 1) * cfg["global_batch"] / max(now - t0, 1e-9)
            t0 = now
            lr = trainer.optimizer.param_groups[0]["lr"]
            metrics.log(epoch=epoch + 1, step=trainer.global_step, loss=loss_value, lr=lr, images_per_s=ips)
            bar.set_postfix(loss=loss_value, lr=lr, ips=ips)
    bar.close()
    return losses, feats


def _check_finite(loss: torch.Tensor, info: dist_utils.DistInfo, epoch: int, step: int, out: Path) -> None:
    """Stops every process together when any of them saw a NaN/inf loss."""
    finite = torch.isfinite(loss.detach()).float()
    if info.distributed:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    if finite.item() < 1:
        raise NonFiniteLossError(
            f"the loss became {loss.item()} at epoch {epoch + 1}, step {step + 1}; stopping. "
            f"{out} keeps the last good checkpoint ({epoch} "
            "epochs); lower --base-lr or use --optimizer lars/adamw, then --resume"
        )


def _epoch_record(
    trainer: _Trainer,
    cfg: dict[str, Any],
    info: dist_utils.DistInfo,
    epoch: int,
    losses: list[float],
    feats: torch.Tensor | None,
    epoch_start: float,
) -> dict[str, Any]:
    """The epoch's ``metrics.jsonl`` record: mean loss over processes, embedding spread, speed."""
    epoch_loss = dist_utils.all_reduce_mean(sum(losses) / max(1, len(losses)), info.device)
    epoch_s = time.perf_counter() - epoch_start
    return {
        "epoch": epoch + 1,
        "step": trainer.global_step,
        "kind": "epoch",
        "loss": epoch_loss,
        "embedding_std": _embedding_std(feats) if feats is not None else float("nan"),
        "embedding_std_healthy": 1 / math.sqrt(trainer.model.embedding_dim),
        "images_per_s": len(losses) * cfg["global_batch"] / max(epoch_s, 1e-9),
        "epoch_s": epoch_s,
    }


def _report_epoch(
    record: dict[str, Any], cfg: dict[str, Any], info: dist_utils.DistInfo, metrics: MetricsLogger
) -> None:
    """Warns of a collapsing representation; logs the epoch (main process)."""
    if record["embedding_std"] < 0.2 * record["embedding_std_healthy"] and info.is_main:
        log.warning(
            "embedding std %.4g is far below %.4g: the representation may be collapsing",
            record["embedding_std"],
            record["embedding_std_healthy"],
        )
    if info.is_main:
        metrics.log(record)
        log.info(
            "epoch %d/%d loss %.4f emb_std %.4f%s (%.1f images/s)",
            record["epoch"],
            cfg["epochs"],
            record["loss"],
            record["embedding_std"],
            f" knn {record['knn_accuracy']:.3f}" if "knn_accuracy" in record else "",
            record["images_per_s"],
        )


def _save_epoch_checkpoint(
    trainer: _Trainer,
    cfg: dict[str, Any],
    info: dist_utils.DistInfo,
    epoch: int,
    last: dict[str, float],
    path: Path,
) -> None:
    """Rank 0 writes the checkpoint, with every rank's RNG state so that a resume continues each."""
    states = [rng_state()]
    if info.distributed:
        gathered: list[Any] = [None] * info.world_size
        torch.distributed.all_gather_object(gathered, states[0])
        states = gathered
    if info.is_main:
        save_checkpoint(
            {
                "format": CHECKPOINT_FORMAT,
                "run": json.dumps(cfg, sort_keys=True),
                "epoch": epoch + 1,
                "global_step": trainer.global_step,
                "model": trainer.model.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict(),
                "rng": states,
                "metrics": last,
            },
            path,
        )


class QualityMonitor:
    """Measures :mod:`training.quality` signals on a fixed set of crops (drawn once, seeded)."""

    def __init__(
        self, dataset: UnlabeledFolder, augment: nn.Module, device: torch.device, args: Any, enabled: bool
    ) -> None:
        self.every = int(getattr(args, "quality_every", 1) or 0)
        n = int(getattr(args, "quality_crops", 128) or 0)
        self.enabled = enabled and n >= 2
        self.augment, self.device = augment, device
        self.crops = torch.empty(0)
        if self.enabled:
            state = torch.random.get_rng_state()
            torch.manual_seed(12345)
            try:
                picks = torch.randint(0, len(dataset), (n,)).tolist()
                self.crops = torch.stack([dataset[i] for i in picks])
            finally:
                torch.random.set_rng_state(state)

    def due(self, epoch: int, epochs: int) -> bool:
        return self.enabled and (epoch == epochs or (self.every > 0 and epoch % self.every == 0))

    def measure(self, backbone: nn.Module) -> quality_lib.QualitySignals:
        return quality_lib.measure(backbone, self.crops, self.augment, self.device)

    def measure_start(self, backbone: nn.Module) -> quality_lib.QualitySignals:
        """The starting point, measured on a copy whose BatchNorm statistics come from the crops:
        a fresh network's init statistics (mean 0, var 1) would make random features look
        collapsed (effective rank ~3 of 512 on real frames) and every run look like progress."""
        from training.finetune_cls import recalibrate_batchnorm

        probe = copy.deepcopy(backbone)
        state = torch.random.get_rng_state()
        try:
            views = self.augment(self.crops).contiguous(memory_format=torch.channels_last)
            recalibrate_batchnorm(probe, views)
        finally:
            torch.random.set_rng_state(state)
        return self.measure(probe)


def _finish(
    out: Path,
    model: SSLModel,
    cfg: dict[str, Any],
    contract: Contract,
    embedding_dim: int,
    last: dict[str, float],
    precision: str = "fp32",
) -> None:
    """Writes ``backbone.safetensors``, the verdict and the ``README.md`` model card
    (``precision``: the training step's arithmetic, fp32 or bf16 autocast)."""
    records = read_metrics(out / "metrics.jsonl")
    if not last:  # resumed a run whose last epoch was already done: take the numbers from the log
        epochs = [r for r in records if r.get("kind") == "epoch"]
        last = {k: v for k, v in (epochs[-1] if epochs else {}).items() if isinstance(v, float)}
    signals = quality_summary(records)
    if signals:
        MetricsLogger(out / "metrics.jsonl").log(kind="verdict", **signals)
        log.info("verdict: %s", signals["verdict"])
    meta = {
        "architecture": cfg["backbone"],
        "in_chans": "1",
        "method": cfg["method"],
        "image_size": str(cfg["image_size"]),
        # Native px of a pretraining crop: with image_size it fixes the scale the encoder knows,
        # which classification and segmentation tile at.
        "crop_size": str(cfg["crop_size"]),
        "contract": contract.to_json(),
        "epochs": str(cfg["epochs"]),
        "embedding_dim": str(embedding_dim),
        "init": cfg["init"],
        "ssl": json.dumps(cfg["ssl"], sort_keys=True),
        "quality": json.dumps(signals, sort_keys=True),
    }
    save_backbone(model.backbone, out / "backbone.safetensors", meta)
    write_model_card(
        out / "README.md",
        f"nanomorph encoder: {cfg['backbone']} pretrained with {cfg['method']}",
        {
            "Summary": (
                f"A single-channel `{cfg['backbone']}` encoder (timm, `in_chans=1`, `num_classes=0`, "
                f"{embedding_dim}-d embedding) pretrained self-supervised with {cfg['method']} on the "
                f"unlabeled images in `{cfg['data']}` for {cfg['epochs']} epochs. No labels were used."
            ),
            "Training": {
                "method": cfg["method"],
                "projector": "-".join(str(d) for d in cfg["ssl"]["projector"]),
                "temperature" if cfg["method"] == "simclr" else "lambda": (
                    cfg["ssl"]["temperature"] if cfg["method"] == "simclr" else cfg["ssl"]["lambda_param"]
                ),
                "init": cfg["init"],
                "image size": cfg["image_size"],
                "global batch": cfg["global_batch"],
                "optimizer": cfg["optimizer"],
                "lr (base_lr * batch / 256)": cfg["lr"],
                "weight decay": cfg["weight_decay"],
                "epochs": cfg["epochs"],
                "arithmetic": precision if precision == "fp32" else f"{precision} autocast (loss in fp32)",
            },
            "Last epoch": last or "no metrics",
            "Quality signals (no labels used)": _quality_card(signals),
            "Preprocessing contract": f"```json\n{contract.to_json()}\n```",
            "Use": (
                "`training.backbones.load_backbone(path)` rebuilds the encoder; `nanomorph finetune-cls "
                "--encoder RUN` / `finetune-seg` transfer it with few labels; `nanomorph export` writes "
                "an ONNX `embed` model."
            ),
            "Limits": [
                "The self-supervised loss alone says little about downstream accuracy; the quality "
                "signals above are label-free hints, not accuracy: confirm with k-NN accuracy "
                "(--monitor-labels) or `nanomorph study cls` on held-out labels.",
                "Embeddings reflect the imaging conditions of the training folder; other microscopes, "
                "magnifications or detectors may need pretraining on their own images.",
            ],
        },
    )
    log.info("wrote %s", out / "backbone.safetensors")


def quality_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Start and end quality signals, the loss change and the verdict line from a run's records
    (empty when the run measured no quality signals)."""
    measured = [r for r in records if "effective_rank" in r]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    steps = [r for r in records if "loss" in r and r.get("kind") is None]
    if len(measured) < 2 or not epochs:
        return {}
    keys = ("effective_rank", "embedding_dim", "alignment", "uniformity")
    start, end = (
        quality_lib.QualitySignals(**{k: int(r[k]) if k == "embedding_dim" else r[k] for k in keys})
        for r in (measured[0], measured[-1])
    )
    first, final = (
        (epochs[0]["loss"], epochs[-1]["loss"]) if len(epochs) > 1 else (steps[0]["loss"], steps[-1]["loss"])
    )
    return {
        "verdict": quality_lib.verdict(start, end, float(first), float(final)),
        "loss_change": (float(final) - float(first)) / abs(float(first)) if first else float("nan"),
        "start": start.to_dict(),
        "end": end.to_dict(),
    }


def _quality_card(signals: dict[str, Any]) -> Any:
    if not signals:
        return "not measured (--quality-crops 0)"
    s, e = signals["start"], signals["end"]
    return {
        "verdict": signals["verdict"],
        "effective rank (RankMe), start -> end": f"{s['effective_rank']:.1f} -> {e['effective_rank']:.1f} "
        f"of {int(e['embedding_dim'])}",
        "alignment (lower = more invariant)": f"{s['alignment']:.3f} -> {e['alignment']:.3f}",
        "uniformity (lower = more spread)": f"{s['uniformity']:.3f} -> {e['uniformity']:.3f}",
        "loss change, first -> last epoch": f"{signals['loss_change']:+.1%}",
    }
