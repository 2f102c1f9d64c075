"""TEM augmentations on single-channel float tensors in [0, 1].

Two implementations of one recipe (:class:`AugmentConfig`):

* :class:`BatchAugment` augments a whole batch ``(B, 1, H, W)`` at once with per-sample random
  parameters, on whatever device the batch is on: random resized crop + flips + 90° rotations
  are ONE ``affine_grid``/``grid_sample`` call, blur is one grouped convolution. Pretraining uses
  it, so augmentation costs a few percent of a training step instead of saturating the 2 CPU
  cores with per-image work.
* :func:`tem_transforms` builds the same recipe as a per-image ``torchvision.transforms.v2``
  pipeline (``(1, H, W)`` tensors), for datasets that augment in DataLoader workers.

TEM-specific choices: no hue/saturation/colour (single channel throughout); 90° rotations and
both flips (no preferred orientation in a micrograph); gamma as well as brightness/contrast
(detector response); Gaussian (read-out) and Poisson (shot, dose-dependent) noise.
SimCLR-style random resized crops follow Chen et al., "A Simple Framework for Contrastive
Learning of Visual Representations", ICML 2020, but narrower by default (area 0.5-1, no
stretch instead of 0.08-1 and 3:4-4:3): particle size and aspect ratio are what a micrograph is
analysed for, so the encoder should not learn to ignore them (docs/results.md).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AugmentConfig:
    """Parameters of the TEM augmentation recipe.

    Attributes:
        image_size: output side.
        scale: (min, max) area fraction of the random resized crop.
        ratio: (min, max) aspect ratio of the crop.
        p_flip: probability of each of the horizontal / vertical flips.
        p_rot90: probability of a rotation by a random multiple of 90°.
        brightness: multiplicative brightness jitter, factor in [1-b, 1+b].
        contrast: contrast jitter around the mean, factor in [1-c, 1+c].
        gamma: gamma exponent in [1/(1+g), 1+g] (log-uniform).
        p_jitter: probability of applying the brightness/contrast/gamma jitter.
        p_blur: probability of a Gaussian blur.
        blur_sigma: (min, max) blur sigma as a fraction of ``image_size`` (0.1%–2% by default).
        p_gauss_noise: probability of additive Gaussian noise.
        gauss_sigma: maximum noise standard deviation (images are in [0, 1]).
        p_poisson_noise: probability of Poisson (shot) noise.
        poisson_peak: (min, max) expected counts at intensity 1 (lower = noisier), log-uniform.
        resize_first: resize the input to ``image_size`` (antialiased, as the preprocessing
            contract resizes a tile) before the random resized crop, so a zoomed view is
            upsampled from what classification sees instead of sampled from finer native pixels.
    """

    image_size: int = 224
    scale: tuple[float, float] = (0.5, 1.0)
    ratio: tuple[float, float] = (1.0, 1.0)
    p_flip: float = 0.5
    p_rot90: float = 0.75
    brightness: float = 0.4
    contrast: float = 0.4
    gamma: float = 0.3
    p_jitter: float = 0.8
    p_blur: float = 0.5
    blur_sigma: tuple[float, float] = (0.001, 0.02)
    p_gauss_noise: float = 0.3
    gauss_sigma: float = 0.05
    p_poisson_noise: float = 0.3
    poisson_peak: tuple[float, float] = (20.0, 500.0)
    resize_first: bool = False

    def __post_init__(self) -> None:
        self.scale = (float(self.scale[0]), float(self.scale[1]))
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < min <= max <= 1, got {self.scale}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be >= 8, got {self.image_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AugmentConfig:
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in known
        }
        return cls(**values)


def _uniform(
    n: int, low: float, high: float, device: torch.device, gen: torch.Generator | None
) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) * (high - low) + low


def _bernoulli(n: int, p: float, device: torch.device, gen: torch.Generator | None) -> torch.Tensor:
    return torch.rand(n, device=device, generator=gen) < p


def _resize_shorter_side(x: torch.Tensor, size: int) -> torch.Tensor:
    """``(B, C, H, W)`` resized so its shorter side is ``size``, antialiased (a triangle filter
    when shrinking, as Pillow's bilinear resize in the preprocessing contract)."""
    h, w = x.shape[-2:]
    out = (max(1, round(h * size / min(h, w))), max(1, round(w * size / min(h, w))))
    if out == (h, w):
        return x
    return F.interpolate(x, size=out, mode="bilinear", antialias=True, align_corners=False)


class BatchAugment(nn.Module):
    """Applies :class:`AugmentConfig` to a batch, each sample with its own random parameters.

    Input ``(B, 1, H, W)`` float in [0, 1] (any H, W; crops are taken relative to the input),
    output ``(B, 1, S, S)`` float32 in [0, 1] on the same device.
    """

    def __init__(self, config: AugmentConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.generator = generator

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != 1:
            raise ValueError(f"BatchAugment expects (B, 1, H, W), got {tuple(x.shape)}")
        x = x.float()
        if self.config.resize_first:
            x = _resize_shorter_side(x, self.config.image_size)
        x = self._geometry(x)
        x = self._jitter(x)
        x = self._blur(x)
        x = self._noise(x)
        return x.clamp_(0.0, 1.0)

    def _geometry(self, x: torch.Tensor) -> torch.Tensor:
        """Random resized crop, flips and 90° rotations as one affine resampling."""
        cfg, gen, dev = self.config, self.generator, x.device
        b, _, h, w = x.shape
        area = _uniform(b, cfg.scale[0], cfg.scale[1], dev, gen)
        log_r = _uniform(b, math.log(cfg.ratio[0]), math.log(cfg.ratio[1]), dev, gen)
        ratio = torch.exp(log_r)
        # Crop size as fractions of the input's width / height (relative to its shorter side
        # for non-square inputs, so the crop is square-ish in pixels).
        side = min(h, w)
        cw = (torch.sqrt(area * ratio) * side / w).clamp(max=1.0)
        ch = (torch.sqrt(area / ratio) * side / h).clamp(max=1.0)
        cx = (torch.rand(b, device=dev, generator=gen) * 2 - 1) * (1 - cw)
        cy = (torch.rand(b, device=dev, generator=gen) * 2 - 1) * (1 - ch)
        flip_x = torch.where(_bernoulli(b, cfg.p_flip, dev, gen), -1.0, 1.0).to(dev)
        flip_y = torch.where(_bernoulli(b, cfg.p_flip, dev, gen), -1.0, 1.0).to(dev)
        k = torch.randint(1, 4, (b,), device=dev, generator=gen)
        k = torch.where(_bernoulli(b, cfg.p_rot90, dev, gen), k, torch.zeros_like(k))
        angle = k.float() * (math.pi / 2)
        cos, sin = torch.cos(angle).round(), torch.sin(angle).round()
        # theta maps output coords to input coords: diag(cw, ch) @ R @ diag(flip_x, flip_y).
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = cw * cos * flip_x
        theta[:, 0, 1] = -cw * sin * flip_y
        theta[:, 1, 0] = ch * sin * flip_x
        theta[:, 1, 1] = ch * cos * flip_y
        theta[:, 0, 2] = cx
        theta[:, 1, 2] = cy
        s = cfg.image_size
        grid = F.affine_grid(theta, [b, 1, s, s], align_corners=False)
        # Shrinking by more than 2x with bilinear sampling aliases: pre-filter with area pooling.
        factor = int(min(h, w) * math.sqrt(cfg.scale[1]) // (2 * s))
        if factor >= 2:
            x = F.avg_pool2d(x, factor, ceil_mode=True)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _jitter(self, x: torch.Tensor) -> torch.Tensor:
        cfg, gen, dev = self.config, self.generator, x.device
        b = x.shape[0]
        apply = _bernoulli(b, cfg.p_jitter, dev, gen).float().view(b, 1, 1, 1)
        bright = _uniform(b, 1 - cfg.brightness, 1 + cfg.brightness, dev, gen).view(b, 1, 1, 1)
        contrast = _uniform(b, 1 - cfg.contrast, 1 + cfg.contrast, dev, gen).view(b, 1, 1, 1)
        g = math.log1p(cfg.gamma)
        gamma = torch.exp(_uniform(b, -g, g, dev, gen)).view(b, 1, 1, 1)
        mean = x.mean(dim=(2, 3), keepdim=True)
        y = ((x - mean) * contrast + mean) * bright
        y = y.clamp(0.0, 1.0).pow(gamma)
        return apply * y + (1 - apply) * x

    def _blur(self, x: torch.Tensor) -> torch.Tensor:
        cfg, gen, dev = self.config, self.generator, x.device
        b, _, h, w = x.shape
        s_max = cfg.blur_sigma[1] * cfg.image_size
        radius = max(1, math.ceil(3 * s_max))
        if cfg.p_blur <= 0 or s_max < 0.3:
            return x
        sigma = _uniform(b, cfg.blur_sigma[0], cfg.blur_sigma[1], dev, gen) * cfg.image_size
        chosen = _bernoulli(b, cfg.p_blur, dev, gen).nonzero().flatten()
        n = chosen.numel()
        if n == 0:
            return x
        # Only the chosen images are convolved (half the work at p_blur 0.5).
        t = torch.arange(-radius, radius + 1, device=dev, dtype=torch.float32)
        kernel = torch.exp(-0.5 * (t[None, :] / sigma[chosen, None].clamp(min=1e-3)) ** 2)
        kernel = kernel / kernel.sum(dim=1, keepdim=True)  # (n, K)
        # One grouped convolution per axis: the chosen images become the channels.
        y = x[chosen].reshape(1, n, h, w)
        y = F.pad(y, (radius, radius, radius, radius), mode="reflect")
        y = F.conv2d(y, kernel.view(n, 1, 1, -1), groups=n)
        y = F.conv2d(y, kernel.view(n, 1, -1, 1), groups=n)
        return x.index_copy(0, chosen, y.reshape(n, 1, h, w))

    def _noise(self, x: torch.Tensor) -> torch.Tensor:
        cfg, gen, dev = self.config, self.generator, x.device
        b = x.shape[0]
        if cfg.p_poisson_noise > 0:
            lo, hi = math.log(cfg.poisson_peak[0]), math.log(cfg.poisson_peak[1])
            peak = torch.exp(_uniform(b, lo, hi, dev, gen)).view(b, 1, 1, 1)
            chosen = _bernoulli(b, cfg.p_poisson_noise, dev, gen).nonzero().flatten()
            if chosen.numel():  # sampling is the costly op on CPU: only for the chosen images
                counts = x[chosen].clamp(min=0.0) * peak[chosen]
                x = x.index_copy(0, chosen, torch.poisson(counts, generator=gen) / peak[chosen])
        if cfg.p_gauss_noise > 0:
            sigma = _uniform(b, 0.0, cfg.gauss_sigma, dev, gen).view(b, 1, 1, 1)
            sigma = sigma * _bernoulli(b, cfg.p_gauss_noise, dev, gen).float().view(b, 1, 1, 1)
            x = x + torch.randn(x.shape, device=dev, generator=gen) * sigma
        return x


class RandomRot90(nn.Module):
    """Rotates a ``(..., H, W)`` tensor by a random multiple of 90° with probability ``p``."""

    def __init__(self, p: float = 0.75) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.rand(()) >= self.p:
            return x
        return torch.rot90(x, int(torch.randint(1, 4, ())), dims=(-2, -1))


class RandomGamma(nn.Module):
    """``x ** g`` with ``g`` log-uniform in ``[1/(1+gamma), 1+gamma]`` (x clamped to [0, 1])."""

    def __init__(self, gamma: float = 0.3) -> None:
        super().__init__()
        self.gamma = gamma

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = math.exp((float(torch.rand(())) * 2 - 1) * math.log1p(self.gamma))
        return x.clamp(0.0, 1.0).pow(g)


class PoissonNoise(nn.Module):
    """Shot noise: ``poisson(x * peak) / peak`` with ``peak`` log-uniform in ``peak_range``."""

    def __init__(self, peak_range: tuple[float, float] = (20.0, 500.0)) -> None:
        super().__init__()
        self.peak_range = peak_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = math.log(self.peak_range[0]), math.log(self.peak_range[1])
        peak = math.exp(lo + float(torch.rand(())) * (hi - lo))
        return torch.poisson(x.clamp(min=0.0) * peak) / peak


class Clamp01(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(0.0, 1.0)


def tem_transforms(config: AugmentConfig) -> nn.Module:
    """The recipe of :class:`AugmentConfig` as a per-image torchvision v2 pipeline on ``(1, H, W)``
    float tensors in [0, 1]."""
    from torchvision.transforms import v2

    s = config.image_size
    sigma = (config.blur_sigma[0] * s, config.blur_sigma[1] * s)
    kernel = 2 * max(1, math.ceil(3 * sigma[1])) + 1
    steps: list[nn.Module] = [v2.Resize(s, antialias=True)] if config.resize_first else []
    steps += [
        v2.RandomResizedCrop(s, scale=config.scale, ratio=config.ratio, antialias=True),
        v2.RandomHorizontalFlip(config.p_flip),
        v2.RandomVerticalFlip(config.p_flip),
        RandomRot90(config.p_rot90),
        v2.RandomApply(
            [
                v2.ColorJitter(brightness=config.brightness, contrast=config.contrast),
                RandomGamma(config.gamma),
            ],
            p=config.p_jitter,
        ),
        v2.RandomApply([v2.GaussianBlur(kernel, sigma=sigma)], p=config.p_blur),
        v2.RandomApply([PoissonNoise(config.poisson_peak)], p=config.p_poisson_noise),
        v2.RandomApply([v2.GaussianNoise(sigma=config.gauss_sigma / 2, clip=False)], p=config.p_gauss_noise),
        Clamp01(),
    ]
    return v2.Compose(steps)
