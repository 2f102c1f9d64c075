"""TEM augmentations: shapes, ranges, per-sample randomness, exact geometry, the v2 pipeline."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from training.augment import AugmentConfig, BatchAugment, tem_transforms

OFF: dict[str, Any] = dict(p_jitter=0.0, p_blur=0.0, p_gauss_noise=0.0, p_poisson_noise=0.0)


def _batch(b: int = 6, size: int = 48) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 1, size, size, generator=g)


def test_batch_augment_shape_range_and_per_sample_variety() -> None:
    x = _batch()
    aug = BatchAugment(AugmentConfig(image_size=32), generator=torch.Generator().manual_seed(1))
    y = aug(x)
    assert y.shape == (6, 1, 32, 32) and y.dtype == torch.float32
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.isfinite(y).all()
    # Two views of the same batch differ (that is the point of SSL views) ...
    assert not torch.allclose(y, aug(x))
    # ... and the same generator seed reproduces them exactly.
    again = BatchAugment(AugmentConfig(image_size=32), generator=torch.Generator().manual_seed(1))(x)
    assert torch.equal(y, again)


def test_identity_geometry_reproduces_the_input() -> None:
    x = _batch(size=32)
    cfg = AugmentConfig(image_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_rot90=0.0, **OFF)
    assert torch.allclose(BatchAugment(cfg)(x), x, atol=1e-5)


def test_flips_and_rotations_are_exact_pixel_permutations() -> None:
    x = _batch(b=32, size=16)
    cfg = AugmentConfig(image_size=16, scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.5, p_rot90=1.0, **OFF)
    y = BatchAugment(cfg, generator=torch.Generator().manual_seed(3))(x)
    for i in range(len(x)):
        candidates = []
        for k in range(4):
            r = torch.rot90(x[i, 0], k, dims=(0, 1))
            candidates += [r, r.flip(0), r.flip(1), r.flip(0).flip(1)]
        assert any(torch.allclose(y[i, 0], c, atol=1e-5) for c in candidates), i


def test_photometric_jitter_blur_and_noise_change_intensities() -> None:
    x = torch.full((8, 1, 32, 32), 0.5)
    x[:, :, 8:24, 8:24] = 0.8
    geo: dict[str, Any] = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_rot90=0.0)
    noisy = AugmentConfig(image_size=32, **geo, **{**OFF, "p_poisson_noise": 1.0})
    y = BatchAugment(noisy, generator=torch.Generator().manual_seed(0))(x)
    assert float((y - x).abs().mean()) > 0.01
    blurred = AugmentConfig(image_size=32, **geo, **{**OFF, "p_blur": 1.0, "blur_sigma": (0.05, 0.06)})
    yb = BatchAugment(blurred)(x)
    # Blur softens the square's edge but keeps the mean intensity.
    assert float(yb[:, :, 16, 7:9].diff(dim=-1).abs().max()) < 0.3 * 0.3
    assert abs(float(yb.mean() - x.mean())) < 0.01


def test_blur_and_poisson_touch_only_the_chosen_images_with_the_right_statistics() -> None:
    """Blur and shot noise are computed only for the images drawn for them (a speed-up on CPU):
    the others come out bit-identical, the chosen ones follow the configured distribution."""
    x = torch.full((64, 1, 32, 32), 0.5)
    x[:, :, 8:24, 8:24] = 0.8
    geo: dict[str, Any] = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), p_flip=0.0, p_rot90=0.0)
    clean = BatchAugment(AugmentConfig(image_size=32, **geo, **OFF))(x)
    for extra in ({"p_poisson_noise": 0.5, "poisson_peak": (100.0, 100.0)}, {"p_blur": 0.5}):
        cfg = AugmentConfig(image_size=32, **geo, **{**OFF, **extra})
        y = BatchAugment(cfg, generator=torch.Generator().manual_seed(5))(x)
        changed = [i for i in range(len(x)) if not torch.equal(y[i], clean[i])]
        assert 16 <= len(changed) <= 48, (extra, len(changed))  # ~ Binomial(64, 0.5)
        assert all(torch.equal(y[i], clean[i]) for i in set(range(len(x))) - set(changed))
    # Shot noise at 100 counts per unit intensity on the 0.5 background: Poisson(50) / 100, so
    # mean 0.5 and variance 50 / 100**2 = 0.005.
    cfg = AugmentConfig(
        image_size=32, **geo, **{**OFF, "p_poisson_noise": 1.0, "poisson_peak": (100.0, 100.0)}
    )
    y = BatchAugment(cfg, generator=torch.Generator().manual_seed(6))(x)
    background = y[:, :, :8, :].flatten()
    assert abs(float(background.mean()) - 0.5) < 0.005
    assert abs(float(background.var()) - 0.005) < 0.0005


def test_large_inputs_and_bad_shapes() -> None:
    aug = BatchAugment(AugmentConfig(image_size=24))
    assert aug(torch.rand(2, 1, 200, 120)).shape == (2, 1, 24, 24)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        aug(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match="scale"):
        AugmentConfig(scale=(0.0, 1.0))


def test_torchvision_v2_pipeline_on_single_images() -> None:
    torch.manual_seed(0)
    pipeline = tem_transforms(AugmentConfig(image_size=32))
    outs = [pipeline(torch.rand(1, 64, 48)) for _ in range(4)]
    for out in outs:
        assert out.shape == (1, 32, 32)
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.allclose(outs[0], outs[1])


def test_resize_first_makes_views_from_what_classification_sees() -> None:
    """``resize_first``: at full area the view is the contract's antialiased resize of the crop, and
    a zoomed view of a pattern finer than the model's pixels is flat (the resize averaged it away),
    while views sampled from native pixels alias it into a visible pattern."""
    from nanomorph.contract.transform import resize

    geo: dict[str, Any] = dict(ratio=(1.0, 1.0), p_flip=0.0, p_rot90=0.0, **OFF)
    x = _batch(b=2, size=64)
    whole = AugmentConfig(image_size=16, scale=(1.0, 1.0), resize_first=True, **geo)
    expected = torch.tensor(resize(x[0, 0].numpy(), 16))
    assert torch.allclose(BatchAugment(whole)(x)[0, 0], expected, atol=0.02)
    checker = (torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2  # 1-px period
    fine = checker.float().expand(16, 1, 64, 64)
    zoomed = dict(image_size=16, scale=(0.3, 0.5), **geo)
    native = BatchAugment(AugmentConfig(**zoomed), torch.Generator().manual_seed(0))(fine)
    resized = BatchAugment(AugmentConfig(**zoomed, resize_first=True), torch.Generator().manual_seed(0))(fine)
    assert float(native.std(dim=(1, 2, 3)).mean()) > 0.1
    assert float(resized.std(dim=(1, 2, 3)).max()) < 0.02
    # The per-image pipeline does the same.
    one = tem_transforms(AugmentConfig(**zoomed, resize_first=True))(fine[0])
    assert one.shape == (1, 16, 16) and float(one.std()) < 0.02
