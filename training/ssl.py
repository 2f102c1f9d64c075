"""Self-supervised objectives: thin wrappers over lightly's losses and projection heads.

* SimCLR: NT-Xent loss (:class:`lightly.loss.NTXentLoss`) on a :class:`SimCLRProjectionHead`
  (Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations", ICML 2020).
* Barlow Twins: :class:`lightly.loss.BarlowTwinsLoss` on a :class:`BarlowTwinsProjectionHead`
  (Zbontar et al., "Barlow Twins: Self-Supervised Learning via Redundancy Reduction", ICML 2021).
  Its cross-correlation matrix is computed in float32 with autocast disabled: in bf16 the
  off-diagonal sums of a 1024+-wide matrix lose the small terms the loss is made of.

Presets (``--preset``):

* ``default``: sized for small data and CPUs: SimCLR projector 512-128, temperature 0.5 (lightly's
  default); Barlow Twins projector 2048-2048-2048, lambda 0.005.
* ``paper``: the papers' temperature / lambda with smaller projectors: SimCLR temperature 0.1 (SimCLR paper, with its
  2048-128 projector); Barlow Twins lambda 0.005 and projector 128-64-1024.
* ``original``: the published ImageNet settings: SimCLR 2048-128 at temperature 0.1; Barlow
  Twins 8192-8192-8192 at lambda 0.0051 (memory-hungry).

Any of ``--projector``, ``--temperature``, ``--lambda`` overrides the preset.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

METHODS = ("simclr", "barlowtwins")

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "simclr": {"projector": [512, 128], "temperature": 0.5},
        "barlowtwins": {"projector": [2048, 2048, 2048], "lambda_param": 0.005},
    },
    "paper": {
        "simclr": {"projector": [2048, 128], "temperature": 0.1},
        "barlowtwins": {"projector": [128, 64, 1024], "lambda_param": 0.005},
    },
    "original": {
        "simclr": {"projector": [2048, 128], "temperature": 0.1},
        "barlowtwins": {"projector": [8192, 8192, 8192], "lambda_param": 0.0051},
    },
}


@dataclass
class SSLConfig:
    """Resolved objective: method, projector layer sizes (hidden..., output), loss parameter."""

    method: str
    projector: list[int]
    temperature: float = 0.5
    lambda_param: float = 0.005

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_projector(spec: str | list[int] | tuple[int, ...] | None) -> list[int] | None:
    """``"2048-2048-2048"`` / ``[2048, 2048]`` -> list of layer sizes (hidden..., output)."""
    if spec is None or spec == "":
        return None
    if isinstance(spec, str):
        try:
            dims = [int(p) for p in spec.replace(",", "-").split("-") if p.strip()]
        except ValueError as exc:
            raise ValueError(f"--projector must look like 2048-128, got {spec!r}") from exc
    else:
        dims = [int(d) for d in spec]
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"--projector needs at least two positive sizes (hidden-output), got {spec!r}")
    return dims


def resolve_config(
    method: str,
    preset: str = "default",
    projector: str | list[int] | None = None,
    temperature: float | None = None,
    lambda_param: float | None = None,
) -> SSLConfig:
    """The preset's settings for ``method`` with explicit overrides applied."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    base = dict(PRESETS[preset][method])
    cfg = SSLConfig(method=method, projector=list(base["projector"]))
    cfg.temperature = float(base.get("temperature", cfg.temperature))
    cfg.lambda_param = float(base.get("lambda_param", cfg.lambda_param))
    dims = parse_projector(projector)
    if dims:
        cfg.projector = dims
    if temperature is not None:
        if temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {temperature}")
        cfg.temperature = float(temperature)
    if lambda_param is not None:
        if lambda_param < 0:
            raise ValueError(f"--lambda must be >= 0, got {lambda_param}")
        cfg.lambda_param = float(lambda_param)
    return cfg


def build_projector(cfg: SSLConfig, input_dim: int) -> nn.Module:
    """lightly's projection head for the method, with ``cfg.projector`` layer sizes.

    SimCLR: ``SimCLRProjectionHead`` (hidden layers of equal size); Barlow Twins:
    ``BarlowTwinsProjectionHead`` (two hidden layers of equal size). Other shapes (e.g. the
    128-64-1024 preset) use lightly's generic ``ProjectionHead`` with the same block structure:
    Linear-BatchNorm-ReLU per hidden layer, then a Linear output (SimCLR adds a BatchNorm, as
    lightly's head does).
    """
    from lightly.models.modules.heads import (
        BarlowTwinsProjectionHead,
        ProjectionHead,
        SimCLRProjectionHead,
    )

    dims = list(cfg.projector)
    hidden, out = dims[:-1], dims[-1]
    if cfg.method == "simclr" and len(set(hidden)) == 1:
        return SimCLRProjectionHead(input_dim, hidden[0], out, num_layers=len(dims))
    if cfg.method == "barlowtwins" and len(hidden) == 2 and hidden[0] == hidden[1]:
        return BarlowTwinsProjectionHead(input_dim, hidden[0], out)
    blocks: list[tuple[int, int, nn.Module | None, nn.Module | None]] = []
    prev = input_dim
    for size in hidden:
        blocks.append((prev, size, nn.BatchNorm1d(size), nn.ReLU()))
        prev = size
    blocks.append((prev, out, nn.BatchNorm1d(out) if cfg.method == "simclr" else None, None))
    return ProjectionHead(blocks)


class SSLLoss(nn.Module):
    """The method's lightly loss, always evaluated in float32 with autocast off.

    Args:
        cfg: resolved objective.
        gather_distributed: gather embeddings (SimCLR) / sum cross-correlations (Barlow Twins)
            across DDP processes, so the loss sees the global batch.
    """

    def __init__(self, cfg: SSLConfig, gather_distributed: bool = False) -> None:
        super().__init__()
        from lightly.loss import BarlowTwinsLoss, NTXentLoss

        self.method = cfg.method
        self.loss: nn.Module
        if cfg.method == "simclr":
            self.loss = NTXentLoss(temperature=cfg.temperature, gather_distributed=gather_distributed)
        else:
            self.loss = BarlowTwinsLoss(lambda_param=cfg.lambda_param, gather_distributed=gather_distributed)

    def forward(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        device_type = z0.device.type if z0.device.type in ("cuda", "cpu") else "cpu"
        with torch.autocast(device_type=device_type, enabled=False):
            return self.loss(z0.float(), z1.float())


class SSLModel(nn.Module):
    """Backbone + projector. ``forward(x)`` returns ``(features, projections)``."""

    def __init__(self, backbone: nn.Module, projector: nn.Module, embedding_dim: int = 0) -> None:
        super().__init__()
        self.backbone = backbone
        self.projector = projector
        self.embedding_dim = embedding_dim  # width of the backbone's features (0: not recorded)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``x``: a batch, or batches of different sides (global and local views); each batch
        goes through the backbone on its own (its own BatchNorm statistics), the features are
        concatenated in order. One call either way, so DDP sees one forward per step."""
        groups = x if isinstance(x, list) else [x]
        h = torch.cat([self.backbone(g).flatten(1) for g in groups])
        return h, self.projector(h)


def multi_view_loss(
    criterion: nn.Module, z0: torch.Tensor, z1: torch.Tensor, local: list[torch.Tensor]
) -> torch.Tensor:
    """The pairwise loss over two global views ``z0``, ``z1`` and any local views (multi-crop,
    Caron et al., NeurIPS 2020): the mean of the global pair's loss and every global-local pair's,
    so each local view is pulled towards both global views of its crop and never towards
    another local one. Without local views it is ``criterion(z0, z1)``."""
    losses = [criterion(z0, z1)]
    for z in local:
        losses += [criterion(z0, z), criterion(z1, z)]
    return torch.stack(losses).mean()


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two parameter groups: weights with ``weight_decay``; biases and normalisation weights (every
    parameter with fewer than 2 dimensions) without, as SimCLR/Barlow Twins/LARS practice does.

    lightly's LARS also skips its layer-wise adaptation for groups with zero weight decay.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
