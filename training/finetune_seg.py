"""Few-label segmentation: ``nanomorph finetune-seg`` and :func:`train_segmenter`.

A segmentation-models-pytorch U-Net (Ronneberger et al., "U-Net", MICCAI 2015) whose encoder is the
pretrained nanomorph backbone, loaded strictly (``training.models.load_encoder_into_unet``), trained
on random tiles of a few labeled frames with Dice + cross-entropy, and evaluated on a held-out split
by overlapping sliding-window inference with blending (``nanomorph.contract.tile`` / ``untile``), so
a 2048x2048 frame gets a full-resolution mask.

With a pretrained encoder and ``--no-freeze-encoder`` the decoder is trained alone first
(``decoder_warmup`` of the steps) and the encoder then joins with a lower learning rate: the random
decoder's first gradients would otherwise wreck the pretrained features (the LP-FT argument of
Kumar et al., "Fine-Tuning can Distort Pretrained Features", ICLR 2022).

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
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from nanomorph.atomic import atomic_path, atomic_write_text
from nanomorph.config import resolved, save_resolved, yaml_defaults
from nanomorph.contract import Contract, mask_dtype, normalise, read_image, tile, untile
from nanomorph.particles import BOUNDARY_CLASS
from nanomorph.progress import progress
from training.backbones import create_backbone, git_commit, load_backbone
from training.device import pick_device
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
    read_mask,
    split_indices,
)
from training.seg_instances import instance_params, load_target_pair, target_mask
from training.seg_losses import DiceCELoss, pixel_confusion, scores_from_confusion

log = logging.getLogger("nanomorph.finetune_seg")

SEGMENTER_FORMAT = "nanomorph-segmenter/1"
COMMAND = "finetune-seg"
METRIC_NOTE = (
    "hard metrics: each pixel's class is the argmax of the softmax probabilities from overlapping "
    "sliding-window inference; IoU and Dice are summed over all pixels of the held-out test images"
)
# Options that change the result: a finished run folder is reused only when these all match.
_RESULT_KEYS = (
    "encoder", "arch", "data", "classes", "labeled_images", "freeze_encoder", "tile", "tile_overlap",
    "test_fraction", "val_fraction", "seed", "epochs", "steps", "batch_size", "lr", "encoder_lr_scale",
    "decoder_warmup", "weight_decay", "fg_fraction", "dice_weight", "instances",
)  # fmt: skip


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


# ----------------------------------------------------------------------------------------- model
def build_segmenter(encoder: str, arch: str | None, n_classes: int) -> tuple[nn.Module, dict[str, str]]:
    """A U-Net on ``encoder`` (``scratch`` or a backbone file / run folder) and facts for provenance."""
    if encoder == "scratch":
        architecture = arch or "resnet18"
        unet = build_unet(architecture, n_classes)
        # Random init through our own backbone factory, so scratch and pretrained share one code path.
        load_encoder_into_unet(unet, create_backbone(architecture).state_dict())
        return unet, {"architecture": architecture, "method": "none", "encoder_source": "scratch"}
    path = Path(encoder)
    if path.is_dir():
        path = path / "backbone.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"--encoder {encoder}: no backbone file {path} (or pass 'scratch')")
    backbone, meta = load_backbone(path)
    architecture = meta["architecture"]
    if arch and arch != architecture:
        raise ValueError(f"--arch {arch} does not match the backbone {path} (architecture {architecture})")
    unet = build_unet(architecture, n_classes)
    load_encoder_into_unet(unet, backbone.state_dict())
    info = {
        "architecture": architecture,
        "method": meta.get("method", "unknown"),
        "encoder_source": str(path),
        "backbone_contract": meta.get("contract", ""),
    }
    return unet, info


def save_segmenter(unet: nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Writes the U-Net state dict with string metadata (format ``nanomorph-segmenter/1``), atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = {"format": SEGMENTER_FORMAT, "git_commit": git_commit(), "in_chans": "1"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    for key in ("architecture", "classes", "contract"):
        if key not in meta:
            raise ValueError(f"segmenter metadata needs {key!r}")
    state = {k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=meta)
    return path


def load_segmenter(path: str | Path) -> tuple[nn.Module, dict[str, str]]:
    """Rebuilds a U-Net saved by ``finetune-seg`` (strict), in eval mode, with its string metadata.

    ``path`` is ``segmenter.safetensors`` or the run folder holding it. ``meta["classes"]`` and
    ``meta["contract"]`` are JSON strings (``Contract.from_json`` reads the latter).
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_dir():
        path = path / "segmenter.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"segmenter {path} does not exist")
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata() or {})
    if meta.get("format") != SEGMENTER_FORMAT:
        raise ValueError(f"{path}: not a nanomorph segmenter (format {meta.get('format')!r})")
    classes = json.loads(meta["classes"])
    unet = build_unet(meta["architecture"], len(classes))
    unet.load_state_dict(load_file(str(path)), strict=True)
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
) -> dict[str, Any]:
    """Hard IoU / Dice of ``model`` on normalised frames with their true masks."""
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for frame, mask in zip(frames, masks, strict=True):
        pred = predict_probs(model, frame, contract, device, batch_size).argmax(axis=0)
        cm += pixel_confusion(mask, pred, len(classes))
    return scores_from_confusion(cm, classes)


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


def _check_finished(out: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The metrics of a finished run with the same settings, None when there is none; error on a clash."""
    metrics_path, model_path = out / "metrics.json", out / "segmenter.safetensors"
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    saved = metrics.get("config", {})
    saved.setdefault("instances", "off")  # runs from before instance training had none
    clash = {k: (saved.get(k), config.get(k)) for k in _RESULT_KEYS if saved.get(k) != config.get(k)}
    if clash:
        if config.get("force"):
            return None
        raise ValueError(
            f"{out} holds a finished run with other settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in clash.items())}); "
            "use another --out or --force (formerly --overwrite)"
        )
    if config.get("force") or (config["save_model"] and not model_path.is_file()):
        return None
    return metrics


def train_segmenter(config: dict[str, Any]) -> dict[str, Any]:
    """Trains and evaluates one segmenter; the Python API behind ``nanomorph finetune-seg``.

    Args:
        config: options by their ``finetune-seg`` names (``data``, ``classes``, ``encoder``,
            ``labeled_images``, ``seed``, ``out``, ...); missing ones take the packaged defaults.
            Studies set ``save_model`` (False skips the safetensors file) and
            ``keep_checkpoint`` (False deletes ``checkpoint.pt`` when done).

    Returns:
        The content of ``metrics.json``: ``mean_iou_foreground``, ``mean_dice_foreground``,
        ``pixel_accuracy``, ``per_class`` (IoU, Dice), ``split`` (stems), ``train`` (steps, tiles/s), ...

    Raises:
        ValueError / FileNotFoundError: bad options or data, with a message naming the file.
    """
    cfg = default_config()
    if "overwrite" in config:  # the old name of "force", for one release
        warnings.warn("finetune-seg option 'overwrite' is deprecated, use 'force'", DeprecationWarning, 2)
        config = {"force": config["overwrite"], **{k: v for k, v in config.items() if k != "overwrite"}}
    unknown = sorted(set(config) - set(cfg) - {"command", "config"})
    if unknown:
        raise ValueError(f"unknown finetune-seg option(s): {', '.join(unknown)}")
    cfg.update({k: v for k, v in config.items() if k not in ("command", "config")})
    if not cfg.get("data"):
        raise ValueError("--data is required (a folder with images/ and masks/)")
    data, out = Path(cfg["data"]), Path(cfg["out"])
    pairs = find_pairs(data)
    classes = _parse_classes(cfg["classes"], data)
    cfg["classes"] = ",".join(classes)
    cfg["data"], cfg["out"] = str(data), str(out)
    cfg["labeled_images"] = str(cfg["labeled_images"]).lower()
    cfg["encoder"] = str(cfg["encoder"])  # a Path from Python callers; compared as text on rerun
    tile_size = int(cfg["tile"])
    overlap = int(cfg["tile_overlap"]) if cfg["tile_overlap"] is not None else tile_size // 4
    cfg["tile_overlap"] = overlap
    if tile_size % 32:
        raise ValueError(f"--tile must be a multiple of 32 (U-Net downsamples 5 times), got {tile_size}")

    check_pairs(pairs, len(classes))
    inst = instance_params(cfg, data, pairs, len(classes))
    cfg["instances"] = json.dumps(inst.to_dict(), sort_keys=True) if inst else "off"
    model_classes = classes + [BOUNDARY_CLASS] if inst else classes
    finished = _check_finished(out, cfg)
    if finished is not None:
        log.info("%s: finished run with the same settings found, not retraining", out)
        return finished

    out.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out)
    torch.manual_seed(int(cfg["seed"]))
    device = pick_device(str(cfg["device"]))
    n_classes = len(model_classes)
    unet, enc_info = build_segmenter(str(cfg["encoder"]), cfg["arch"], n_classes)
    base_contract = (
        Contract.from_json(enc_info["backbone_contract"]) if enc_info.get("backbone_contract") else Contract()
    )
    # Segmentation keeps the backbone's intensity normalisation and adds its own tiling.
    contract = Contract.from_dict(
        {**base_contract.to_dict(), "tile_size": tile_size, "tile_overlap": overlap}
    )

    split = split_indices(
        len(pairs),
        float(cfg["test_fraction"]),
        float(cfg["val_fraction"]),
        cfg["labeled_images"],
        int(cfg["seed"]),
    )
    stems = {name: [pairs[i].stem for i in getattr(split, name)] for name in ("train", "val", "test")}
    log.info(
        "%d pairs: %d train, %d validation, %d test (seed %s); classes %s",
        len(pairs), len(split.train), len(split.val), len(split.test), cfg["seed"], classes,
    )  # fmt: skip
    train_data = [load_target_pair(data, pairs[i], contract, len(classes), inst) for i in split.train]
    val_data = [load_target_pair(data, pairs[i], contract, len(classes), inst) for i in split.val]
    classes = model_classes  # from here on: the model's channels (with the boundary class)

    # Steps: --steps wins; else epochs of about one pass over the labeled area in tiles.
    batch = int(cfg["batch_size"])
    train_pixels = sum(m.size for _, m in train_data)
    steps_per_epoch = max(1, math.ceil(train_pixels / tile_size**2 / batch))
    total_steps = int(cfg["steps"]) if cfg["steps"] else int(cfg["epochs"]) * steps_per_epoch
    if total_steps < 1:
        raise ValueError(f"need at least one training step, got steps={cfg['steps']} epochs={cfg['epochs']}")
    val_every = max(steps_per_epoch, math.ceil(total_steps / max(1, int(cfg["max_val_evals"]))))

    dataset = SegTileDataset(
        [f for f, _ in train_data], [m for _, m in train_data], tile_size,
        length=total_steps * batch, seed=int(cfg["seed"]), fg_fraction=float(cfg["fg_fraction"]),
    )  # fmt: skip
    pretrained = enc_info["method"] != "none"
    frozen_always = bool(cfg["freeze_encoder"])
    warmup_steps = int(round(float(cfg["decoder_warmup"]) * total_steps)) if pretrained else 0
    enc_scale = float(cfg["encoder_lr_scale"]) if pretrained else 1.0
    if frozen_always and not pretrained:
        log.warning("--freeze-encoder with a scratch encoder trains the decoder on random features")

    unet.to(device)
    if device.type == "cpu":
        unet.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN)
    lr, wd = float(cfg["lr"]), float(cfg["weight_decay"])
    decoder_params = [p for n, p in unet.named_parameters() if not n.startswith("encoder.")]
    groups: list[dict[str, Any]] = [{"params": decoder_params, "lr": lr}]
    if not frozen_always:
        groups.append({"params": list(unet.encoder.parameters()), "lr": lr * enc_scale})  # type: ignore[union-attr]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=wd)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    loss_fn = DiceCELoss(n_classes, dice_weight=float(cfg["dice_weight"])).to(device)

    # Short linear warm-up, then cosine decay to 1 % of the base rate.
    lr_factor = WarmupCosine.over(total_steps, warmup_divisor=20, floor=0.01)

    # Resume.
    ckpt_path, best_path = out / "checkpoint.pt", out / "best.pt"
    metrics_log = MetricsLogger(out / "metrics.jsonl")
    step, best_score, best_step = 0, -1.0, -1
    best_state: dict[str, torch.Tensor] | None = None
    train_seconds = 0.0
    if ckpt_path.is_file() and not cfg.get("force"):
        ckpt = load_checkpoint(ckpt_path)
        if ckpt.get("fingerprint") == json.dumps({k: cfg.get(k) for k in _RESULT_KEYS}, sort_keys=True):
            unet.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            step, best_score, best_step = int(ckpt["step"]), float(ckpt["best_score"]), int(ckpt["best_step"])
            if best_step >= 0:
                best = load_checkpoint(best_path)
                if int(best.get("step", -2)) != best_step:
                    raise ValueError(f"{best_path} does not belong to {ckpt_path}; rerun with --force")
                best_state = best["model"]
            train_seconds = float(ckpt.get("train_seconds", 0.0))
            metrics_log.truncate(lambda r: int(r.get("step", 0)) <= step)
            log.info("resuming %s at step %d/%d", ckpt_path, step, total_steps)
        else:
            log.warning("%s was written with other settings; starting afresh", ckpt_path)
            metrics_log.truncate(lambda r: False)
    elif cfg.get("force"):
        metrics_log.truncate(lambda r: False)

    best_saved_step = best_step
    last_save = time.monotonic()

    def save_ckpt() -> None:
        nonlocal best_saved_step, last_save
        if best_state is not None and best_saved_step != best_step:
            # Its own file, written only when it changed: the checkpoint stays small.
            save_checkpoint({"model": best_state, "step": best_step}, best_path)
            best_saved_step = best_step
        last_save = time.monotonic()
        save_checkpoint(
            {
                "model": unet.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "best_score": best_score, "best_step": best_step,
                "train_seconds": train_seconds,
                "fingerprint": json.dumps({k: cfg.get(k) for k in _RESULT_KEYS}, sort_keys=True),
            },
            ckpt_path,
        )  # fmt: skip

    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(step * batch, total_steps * batch)),
        batch_size=batch, shuffle=False, num_workers=int(cfg["workers"]), drop_last=False,
    )  # fmt: skip
    log.info(
        "training %s U-Net (%s encoder, %s) for %d steps of %d tiles of %d px on %s",
        enc_info["architecture"], enc_info["method"],
        "frozen" if frozen_always else f"decoder-only for {warmup_steps} steps, then encoder lr x{enc_scale}",
        total_steps, batch, tile_size, device,
    )  # fmt: skip
    bar = progress(loader, total=total_steps - step, desc="finetune-seg", logger=log)
    tiles_seen, session_seconds, t_start, running = 0, 0.0, time.perf_counter(), 0.0
    for x, y in bar:
        encoder_frozen = frozen_always or step < warmup_steps
        _set_encoder_trainable(unet, not encoder_frozen)
        _train_mode(unet, encoder_frozen)
        for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
            g["lr"] = base * lr_factor(step)
        x = x.to(device, non_blocking=True)
        if device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = unet(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        tiles_seen += x.shape[0]
        running = loss.item() if step == 1 else 0.9 * running + 0.1 * loss.item()
        bar.set_postfix(loss=running)
        if step % max(1, min(50, val_every // 2)) == 0:
            metrics_log.log(step=step, split="train", loss=loss.item(), lr=optimizer.param_groups[0]["lr"])
        if step % val_every == 0 or step == total_steps:
            elapsed = time.perf_counter() - t_start
            train_seconds += elapsed
            session_seconds += elapsed
            if val_data:
                scores = evaluate(
                    unet, [f for f, _ in val_data], [m for _, m in val_data], classes, contract, device,
                    int(cfg["infer_batch_size"]),
                )  # fmt: skip
                score = scores["mean_iou_foreground"] or 0.0
                metrics_log.log(step=step, split="val", mean_iou_foreground=score, loss_ema=running)
                log.info("step %d/%d: loss %.4f, validation mIoU %.4f", step, total_steps, running, score)
                if score > best_score:
                    best_score, best_step = score, step
                    best_state = {k: v.detach().cpu().clone() for k, v in unet.state_dict().items()}
            # Checkpoints cost seconds (~170 MB for resnet18): at most one a minute, and at the end.
            if step == total_steps or time.monotonic() - last_save > float(cfg["checkpoint_every_s"]):
                save_ckpt()
            t_start = time.perf_counter()
    if hasattr(bar, "close"):
        bar.close()
    if best_state is not None:
        unet.load_state_dict(best_state)  # model selection on the validation split only
    unet.eval()

    # Held-out test split: read raw frames from disk one at a time (they can be large).
    test_cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    per_image: list[dict[str, Any]] = []
    overlay_dir = out / "overlays"
    n_overlays = int(cfg["overlays"])
    if n_overlays:
        overlay_dir.mkdir(exist_ok=True)
    for j, i in enumerate(split.test):
        pair = pairs[i]
        raw, _ = read_image(pair.image)
        truth = target_mask(data, pair, read_mask(pair.mask, len(classes) - (1 if inst else 0)), inst)
        if raw.shape != truth.shape:
            raise ValueError(f"mask {pair.mask} has shape {truth.shape}, its image {pair.image} {raw.shape}")
        pred, _ = segment_image(unet, raw, contract, device, int(cfg["infer_batch_size"]))
        cm = pixel_confusion(truth, pred, n_classes)
        test_cm += cm
        per_image.append(
            {
                "stem": pair.stem,
                **{k: v for k, v in scores_from_confusion(cm, classes).items() if k != "per_class"},
            }
        )
        if j < n_overlays:
            _write_overlay(
                overlay_dir / f"{Path(pair.stem).name}.png", normalise(raw, contract), truth, pred, n_classes
            )
    scores = scores_from_confusion(test_cm, classes)
    total_tiles = total_steps * batch
    metrics: dict[str, Any] = {
        "task": "segment",
        "metric_type": "hard (argmax)",
        "note": METRIC_NOTE,
        "classes": classes,
        **scores,
        "confusion_matrix": test_cm.tolist(),
        "per_image": per_image,
        "best_val_mean_iou_foreground": best_score if best_state is not None else None,
        "best_step": best_step if best_state is not None else total_steps,
        "n_images": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "split": stems,
        "train": {
            "steps": total_steps,
            "batch_size": batch,
            "tile": tile_size,
            "tiles": total_tiles,
            "seconds": round(train_seconds, 2),
            "tiles_per_s": round(tiles_seen / session_seconds, 2)
            if session_seconds > 0 and tiles_seen
            else None,
            "device": str(device),
        },  # fmt: skip
        "encoder": {k: v for k, v in enc_info.items() if k != "backbone_contract"},
        "contract": contract.to_dict(),
        "config": resolved(cfg),
    }
    atomic_write_text(out / "classes.json", json.dumps(classes, indent=2) + "\n")
    if cfg["save_model"]:
        save_segmenter(
            unet,
            out / "segmenter.safetensors",
            {
                "architecture": enc_info["architecture"], "classes": classes, "contract": contract.to_json(),
                "encoder_source": enc_info["encoder_source"], "method": enc_info["method"],
                "n_classes": str(n_classes), "task": "segment",
                **({"instances": inst.to_dict()} if inst else {}),
                "metrics": {"mean_iou_foreground": scores["mean_iou_foreground"],
                            "mean_dice_foreground": scores["mean_dice_foreground"], "metric_type": "hard (argmax)"},
            },
        )  # fmt: skip
    _write_card(out, metrics, enc_info)
    # metrics.json last: its presence marks the run finished.
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    best_path.unlink(missing_ok=True)  # the selected weights live in segmenter.safetensors now
    if not cfg["keep_checkpoint"]:
        ckpt_path.unlink(missing_ok=True)
    log.info(
        "test mean IoU (foreground) %s, Dice %s on %d held-out images -> %s",
        _fmt(scores["mean_iou_foreground"]), _fmt(scores["mean_dice_foreground"]), len(split.test), out,
    )  # fmt: skip
    return metrics


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


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
                "particles": (
                    "connected components of the mask (no instances/ labels)"
                    if cfg.get("instances", "off") == "off"
                    else "boundary-watershed: trained on instances/ with a boundary class (each particle's "
                    "rim), so touching particles are split by a watershed seeded from the interiors "
                    f"(nanomorph.particles; parameters {cfg['instances']})"
                ),
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
