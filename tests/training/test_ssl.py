"""Loss wrappers against plain-torch formulas; presets; projectors; losses decrease on a fixed batch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training.ssl import SSLLoss, SSLModel, build_projector, multi_view_loss, param_groups, resolve_config


def nt_xent_reference(z0: torch.Tensor, z1: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent (Chen et al. 2020, eq. 1), averaged over all 2N anchors."""
    z = F.normalize(torch.cat([z0, z1]), dim=1)
    n = z0.shape[0]
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return -(sim[torch.arange(2 * n), positives] - torch.logsumexp(sim, dim=1)).mean()


def barlow_twins_reference(z0: torch.Tensor, z1: torch.Tensor, lam: float) -> torch.Tensor:
    """Barlow Twins (Zbontar et al. 2021, eq. 1) with batch-standardised embeddings."""
    n = z0.shape[0]
    a = (z0 - z0.mean(0)) / z0.std(0, unbiased=False).add(1e-5).clamp(min=1e-12)
    b = (z1 - z1.mean(0)) / z1.std(0, unbiased=False).add(1e-5).clamp(min=1e-12)
    c = a.T @ b / n
    on = ((torch.diagonal(c) - 1) ** 2).sum()
    off = (c**2).sum() - (torch.diagonal(c) ** 2).sum()
    return on + lam * off


def test_ntxent_wrapper_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(0)
    z0, z1 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    for temperature in (0.1, 0.5):
        ours = SSLLoss(resolve_config("simclr", temperature=temperature))(z0, z1)
        assert torch.allclose(ours, nt_xent_reference(z0, z1, temperature), atol=1e-5)


def test_barlow_twins_wrapper_matches_the_formula() -> None:
    g = torch.Generator().manual_seed(1)
    z0, z1 = torch.randn(16, 12, generator=g), torch.randn(16, 12, generator=g)
    ours = SSLLoss(resolve_config("barlowtwins", lambda_param=0.005))(z0, z1)
    assert torch.allclose(ours, barlow_twins_reference(z0, z1, 0.005), rtol=1e-3)


def test_barlow_twins_loss_runs_in_fp32_under_autocast() -> None:
    z0, z1 = torch.randn(8, 32), torch.randn(8, 32)
    loss_fn = SSLLoss(resolve_config("barlowtwins"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(z0.bfloat16(), z1.bfloat16())
    assert loss.dtype == torch.float32
    assert torch.allclose(
        loss, barlow_twins_reference(z0.bfloat16().float(), z1.bfloat16().float(), 0.005), rtol=1e-3
    )


def test_presets_and_overrides() -> None:
    paper_simclr = resolve_config("simclr", "paper")
    assert paper_simclr.temperature == 0.1
    paper_bt = resolve_config("barlowtwins", "paper")
    assert paper_bt.lambda_param == 0.005 and paper_bt.projector == [128, 64, 1024]
    assert resolve_config("barlowtwins", "original").projector == [8192, 8192, 8192]
    custom = resolve_config("simclr", "paper", projector="256-64", temperature=0.2)
    assert custom.projector == [256, 64] and custom.temperature == 0.2
    with pytest.raises(ValueError, match="projector"):
        resolve_config("simclr", projector="256")
    with pytest.raises(ValueError, match="method"):
        resolve_config("byol")


@pytest.mark.parametrize(
    ("method", "dims", "out_dim"),
    [("simclr", "32-16", 16), ("barlowtwins", "32-32-64", 64), ("barlowtwins", "128-64-1024", 1024)],
)
def test_projectors_have_the_requested_sizes(method: str, dims: str, out_dim: int) -> None:
    head = build_projector(resolve_config(method, projector=dims), input_dim=24)
    assert head(torch.randn(4, 24)).shape == (4, out_dim)
    linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [int(d) for d in dims.split("-")]


def test_no_weight_decay_on_biases_and_norm_weights() -> None:
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 1, 5, 5))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.ndim == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 4


@pytest.mark.parametrize("method", ["simclr", "barlowtwins"])
def test_losses_finite_and_decreasing_on_a_fixed_batch(method: str) -> None:
    torch.manual_seed(0)
    cfg = resolve_config(method, projector="64-64-32" if method == "barlowtwins" else "64-32")
    backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten())
    model = SSLModel(backbone, build_projector(cfg, 8 * 16))
    loss_fn = SSLLoss(cfg)
    opt = torch.optim.SGD(param_groups(model, 1e-4), lr=0.05, momentum=0.9)
    x = torch.rand(16, 1, 16, 16)
    v0, v1 = x + 0.05 * torch.randn_like(x), x.flip(-1)
    losses = []
    for _ in range(15):
        _, z = model(torch.cat([v0, v1]))
        loss = loss_fn(*z.chunk(2))
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


def test_multi_view_loss_is_the_mean_over_the_global_pair_and_global_local_pairs() -> None:
    """Multi-crop: each local view against both global views, never against another local view;
    without local views the plain pairwise loss."""
    g = torch.Generator().manual_seed(2)
    z0, z1, l0, l1 = (torch.randn(8, 16, generator=g) for _ in range(4))
    loss_fn = SSLLoss(resolve_config("simclr", temperature=0.2))
    ref = [nt_xent_reference(a, b, 0.2) for a, b in ((z0, z1), (z0, l0), (z1, l0), (z0, l1), (z1, l1))]
    assert torch.allclose(multi_view_loss(loss_fn, z0, z1, [l0, l1]), torch.stack(ref).mean(), atol=1e-5)
    assert torch.allclose(multi_view_loss(loss_fn, z0, z1, []), ref[0], atol=1e-6)


def test_model_takes_views_of_two_sides_in_one_call() -> None:
    """Global and local views (different sides) in one forward call: features in order, each
    group through the backbone on its own, as separate calls would give."""
    torch.manual_seed(0)
    cfg = resolve_config("simclr", projector="16-8")
    backbone = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(2), nn.Flatten()
    )
    model = SSLModel(backbone, build_projector(cfg, 16)).eval()
    big, small = torch.rand(6, 1, 32, 32), torch.rand(4, 1, 16, 16)
    h, z = model([big, small])
    assert h.shape == (10, 16) and z.shape == (10, 8)
    assert torch.allclose(h, torch.cat([backbone(big), backbone(small)]), atol=1e-6)
