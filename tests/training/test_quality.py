"""Label-free quality signals, each checked against a direct computation from its definition."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from training import quality


def test_effective_rank_matches_definition_and_known_cases() -> None:
    torch.manual_seed(0)
    x = torch.randn(200, 16) @ torch.diag(torch.linspace(1, 4, 16))
    s = np.linalg.svd(x.numpy().astype(np.float64), compute_uv=False)
    p = s / s.sum()
    expected = math.exp(-(p * np.log(p)).sum())
    assert abs(quality.effective_rank(x) - expected) < 1e-4
    # Equal singular values: the rank is the dimension; a rank-one matrix: 1.
    assert abs(quality.effective_rank(torch.eye(8)) - 8) < 1e-3
    assert abs(quality.effective_rank(torch.ones(50, 8)) - 1) < 1e-3


def test_alignment_and_uniformity_match_wang_isola() -> None:
    torch.manual_seed(1)
    z0, z1 = torch.randn(64, 8), torch.randn(64, 8)
    n0, n1 = F.normalize(z0, dim=1), F.normalize(z1, dim=1)
    assert abs(quality.alignment(z0, z1) - float((n0 - n1).norm(dim=1).pow(2).mean())) < 1e-5
    assert quality.alignment(z0, 3 * z0) < 1e-9  # scale does not matter: embeddings are normalised
    sq = torch.cdist(n0.double(), n0.double()).pow(2)
    off = sq[~torch.eye(64, dtype=torch.bool)]
    assert abs(quality.uniformity(z0) - float(off.mul(-2).exp().mean().log())) < 1e-6
    # Collapsed embeddings are as non-uniform as can be (log 1 = 0).
    assert abs(quality.uniformity(torch.ones(10, 4))) < 1e-9


def test_measure_keeps_the_global_rng_and_the_train_flag() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).train()
    crops = torch.rand(16, 1, 12, 12)
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    first = quality.measure(model, crops, lambda x: x + 0.01 * torch.randn_like(x), torch.device("cpu"))
    assert torch.equal(torch.rand(3), expected_next)
    assert model.training
    second = quality.measure(model, crops, lambda x: x + 0.01 * torch.randn_like(x), torch.device("cpu"))
    assert first == second  # fixed augmentation seed: the same crops give the same signals
    assert first.embedding_dim == 4


def test_verdict_lines() -> None:
    start = quality.QualitySignals(effective_rank=40, embedding_dim=512, alignment=0.1, uniformity=-0.5)
    good = quality.QualitySignals(effective_rank=120, embedding_dim=512, alignment=0.4, uniformity=-2.5)
    collapsed = quality.QualitySignals(effective_rank=3, embedding_dim=512, alignment=0.0, uniformity=-0.1)
    assert quality.verdict(start, good, 4.8, 3.1).startswith("learned: effective rank 120 of 512")
    assert quality.verdict(start, good, 4.8, 4.7).startswith("learned little:")
    assert "loss -2%" in quality.verdict(start, good, 4.8, 4.7)
    assert quality.verdict(start, collapsed, 4.8, 2.0).startswith("collapsed or near-collapsed:")
