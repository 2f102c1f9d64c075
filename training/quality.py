"""Label-free quality signals of an encoder's embeddings.

A falling SSL loss alone does not say the features are useful (measured on real TEM: a run whose
NT-Xent fell 7.1 -> 4.1 stayed at random-init probe accuracy). These signals are computed on a
fixed set of crops, before training (the starting point) and after every epoch:

* **effective rank** (RankMe, Garrido et al., ICML 2023): ``exp(entropy(σ / Σσ))`` of the singular
  values of the (N, D) embedding matrix; it tracks downstream accuracy across SSL methods, and a
  collapsed or barely trained encoder has a small one;
* **alignment** and **uniformity** (Wang & Isola, ICML 2020) of L2-normalised embeddings:
  ``E ||f(x) - f(x+)||²`` over two augmentations of the same crop (lower = more invariant) and
  ``log E exp(-2 ||f(x) - f(y)||²)`` over distinct crops (lower = more spread on the sphere).

:func:`verdict` turns them into one plain line for the end of a run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class QualitySignals:
    effective_rank: float
    embedding_dim: int
    alignment: float
    uniformity: float

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def effective_rank(features: torch.Tensor, eps: float = 1e-7) -> float:
    """RankMe: ``exp`` of the Shannon entropy of the normalised singular values of ``features``."""
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum().clamp(min=eps) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(z0: torch.Tensor, z1: torch.Tensor) -> float:
    """Mean squared distance between the normalised embeddings of positive pairs (α = 2)."""
    z0, z1 = F.normalize(z0.double(), dim=1), F.normalize(z1.double(), dim=1)
    return float((z0 - z1).pow(2).sum(dim=1).mean())


def uniformity(z: torch.Tensor, t: float = 2.0) -> float:
    """``log E exp(-t ||zi - zj||²)`` over distinct pairs of normalised embeddings."""
    z = F.normalize(z.double(), dim=1)
    return float(torch.pdist(z).pow(2).mul(-t).exp().mean().log())


@torch.no_grad()
def embed(backbone: nn.Module, x: torch.Tensor, device: torch.device, batch_size: int = 64) -> torch.Tensor:
    """Eval-mode embeddings of ``x`` (N, 1, S, S) as float32 on the CPU; restores the train flag."""
    was_training = backbone.training
    backbone.eval()
    try:
        chunks = [
            backbone(x[i : i + batch_size].to(device).contiguous(memory_format=torch.channels_last))
            for i in range(0, len(x), batch_size)
        ]
    finally:
        backbone.train(was_training)
    return torch.cat([c.float().flatten(1).cpu() for c in chunks])


@torch.no_grad()
def measure(
    backbone: nn.Module,
    crops: torch.Tensor,
    augment: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    seed: int = 0,
) -> QualitySignals:
    """Signals of ``backbone`` on native ``crops`` (N, 1, C, C): the rank and uniformity of one
    augmented view, the alignment between two. The augmentation RNG is fixed by ``seed`` and the
    global RNG state is restored, so measuring does not change what training draws next."""
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        view0, view1 = augment(crops), augment(crops)
    finally:
        torch.random.set_rng_state(state)
    h0, h1 = embed(backbone, view0, device), embed(backbone, view1, device)
    return QualitySignals(effective_rank(h0), int(h0.shape[1]), alignment(h0, h1), uniformity(h0))


def verdict(start: QualitySignals, end: QualitySignals, loss_first: float, loss_last: float) -> str:
    """One plain line: did pretraining learn something worth using?

    ``loss_first``/``loss_last`` are the losses of the first and last epochs. The thresholds are
    deliberately coarse: they separate "the embedding collapsed" (effective rank under 2 % of the
    dimension) and "the objective barely moved" (loss down by less than 10 %) from runs that
    changed the encoder, not good from excellent. The start values (a BatchNorm-recalibrated copy
    of the initial network) are printed for reference: random features are high-rank noise, so a
    trained encoder's rank may well be lower than its start; alignment should fall.
    """
    change = (loss_last - loss_first) / abs(loss_first) if loss_first else float("nan")
    rank, dim = end.effective_rank, int(end.embedding_dim)
    facts = (
        f"effective rank {rank:.0f} of {dim} (start {start.effective_rank:.0f}), "
        f"loss {change:+.0%}, alignment {end.alignment:.2f}, uniformity {end.uniformity:.2f}"
    )
    if rank < max(8.0, 0.02 * dim):
        return f"collapsed or near-collapsed: {facts}"
    if not math.isfinite(change) or change > -0.1:
        return f"learned little: {facts}"
    return f"learned: {facts}"
