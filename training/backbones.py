"""Encoders (timm, single channel) and their safetensors files.

A backbone is ``timm.create_model(architecture, in_chans=1, num_classes=0)``: any timm name works.
``backbone.safetensors`` holds its state dict plus string metadata (format, architecture, method,
contract, ...) so that downstream commands rebuild the exact network from the file alone.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

# git_commit and read_metadata are imported from here by older callers; they live in artifacts.
from training.artifacts import (  # noqa: F401
    BACKBONE_FILE,
    BACKBONE_FORMAT,
    git_commit,
    read_metadata,
    read_weights,
    write_weights,
)

log = logging.getLogger(__name__)


def offline() -> bool:
    """True when the model hub must not be contacted (``HF_HUB_OFFLINE`` / ``NANOMORPH_OFFLINE``,
    with huggingface_hub's truthy spellings), so ``--init imagenet`` fails at once instead of
    waiting on a network that is not there."""
    return any(
        os.environ.get(v, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for v in ("HF_HUB_OFFLINE", "NANOMORPH_OFFLINE")
    )


def create_backbone(architecture: str, init: str = "none") -> nn.Module:
    """Builds a single-channel timm encoder without classifier (``num_classes=0``).

    Args:
        architecture: any timm model name, e.g. ``resnet18``, ``resnet50``.
        init: ``none`` (random), ``imagenet`` (timm's pretrained weights; needs a network) or a path
            to a local checkpoint (see :func:`load_init_checkpoint`).
    """
    import timm

    if architecture not in timm.list_models() and not timm.is_model(architecture):
        raise ValueError(f"unknown backbone {architecture!r}: not a timm model name")
    if init == "imagenet":
        if offline():
            raise ValueError(
                "--init imagenet needs network access to the model hub (HF_HUB_OFFLINE=1 is set); "
                "download the weights elsewhere and pass --init PATH"
            )
        try:
            return timm.create_model(architecture, pretrained=True, in_chans=1, num_classes=0)
        except Exception as exc:  # network errors come in many types
            raise ValueError(
                f"could not fetch ImageNet weights for {architecture} ({exc}); "
                "pass a local checkpoint with --init PATH"
            ) from exc
    model = timm.create_model(architecture, pretrained=False, in_chans=1, num_classes=0)
    if init not in ("none", "", None):
        load_init_checkpoint(model, init)
    return model


def _extract_state_dict(obj: Any) -> dict[str, torch.Tensor]:
    # MoCo/CEM500K: {"state_dict": ...}; DeiT/MAE: {"model": ...}; DINO/DINOv2 training
    # checkpoints: {"teacher": ..., "student": ...} (the teacher is the one to use).
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "teacher", "backbone"):
            if key in obj and isinstance(obj[key], dict):
                return _extract_state_dict(obj[key])
        return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    raise ValueError("checkpoint holds no state dict")


def _strip_prefixes(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Removes wrapper prefixes (``module.``, ``encoder.``, ``backbone.``, MoCo's ``module.encoder_q.``)."""
    prefixes = ("module.encoder_q.", "module.", "encoder_q.", "encoder.", "backbone.", "model.")
    best = state
    for prefix in prefixes:
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if len(set(stripped) & model_keys) > len(set(best) & model_keys):
            best = stripped
    return best


def load_init_checkpoint(model: nn.Module, path: str | Path) -> dict[str, list[str]]:
    """Loads a local checkpoint into ``model``: safetensors, or a torch ``.pth``/``.pth.tar``.

    A 3-channel first convolution is adapted to 1 channel by summing over input channels (the
    response to a gray image is then unchanged). Classifier keys (``fc.*``, ``head.*``) and MoCo
    projector keys are dropped and reported; every other key must match (strict).

    Returns:
        ``{"missing": [...], "unexpected": [...], "dropped": [...], "adapted": [...]}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        state, _ = read_weights(path)
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ValueError(
                f"{path}: not a loadable torch checkpoint with weights_only=True ({exc})"
            ) from exc
        state = _extract_state_dict(obj)
    target = model.state_dict()
    state = _strip_prefixes(state, set(target))
    report: dict[str, list[str]] = {"missing": [], "unexpected": [], "dropped": [], "adapted": []}
    cleaned: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in target:
            # classifier / projection heads and DINOv2's masked-modelling token: unused by an encoder
            if key.split(".")[0] in ("fc", "head", "classifier", "fc_q", "projector", "mask_token"):
                report["dropped"].append(key)
            else:
                report["unexpected"].append(key)
            continue
        expected = target[key].shape
        if value.ndim == 4 and value.shape[1] == 3 and expected[1] == 1 and value.shape[0] == expected[0]:
            value = value.sum(dim=1, keepdim=True)
            report["adapted"].append(key)
        if value.shape != expected:
            raise ValueError(
                f"{path}: {key} has shape {tuple(value.shape)}, the model expects {tuple(expected)}"
            )
        cleaned[key] = value
    report["missing"] = sorted(set(target) - set(cleaned))
    if report["missing"] or report["unexpected"]:
        raise ValueError(
            f"{path} does not fit {type(model).__name__}: missing keys {report['missing'][:10]}"
            f"{'...' if len(report['missing']) > 10 else ''}, unexpected keys {report['unexpected'][:10]}"
        )
    model.load_state_dict(cleaned, strict=True)
    log.info(
        "loaded %s: %d tensors, adapted %s, dropped %d classifier/projector keys",
        path,
        len(cleaned),
        report["adapted"] or "none",
        len(report["dropped"]),
    )
    return report


def save_backbone(model: nn.Module, path: str | Path, metadata: dict[str, Any]) -> Path:
    """Saves an encoder's weights with string metadata (non-strings are JSON-encoded), atomically."""
    return write_weights(model, path, metadata, BACKBONE_FORMAT, required=("architecture",))


def load_backbone(path: str | Path) -> tuple[nn.Module, dict[str, str]]:
    """Rebuilds the encoder saved by :func:`save_backbone` (strict) and returns it with its metadata.

    ``path`` may be the ``backbone.safetensors`` file or the run folder holding it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / BACKBONE_FILE
    state, meta = read_weights(path, BACKBONE_FORMAT, required=("architecture",))
    model = create_backbone(meta["architecture"])
    model.load_state_dict(state, strict=True)
    return model, meta
