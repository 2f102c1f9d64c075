"""Downstream networks built on a nanomorph backbone: classifier and U-Net segmenter."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Classifier(nn.Module):
    """Backbone + linear head. ``forward`` returns logits; :meth:`embed` the L2-normalised features.

    State dict keys are ``backbone.*`` and ``head.*`` (see docs/architecture.md).
    """

    def __init__(self, backbone: nn.Module, n_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        features = int(backbone.num_features)  # type: ignore[arg-type]  # timm models set an int
        self.head = nn.Linear(features, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.backbone(x), dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def build_unet(architecture: str, n_classes: int) -> nn.Module:
    """smp U-Net whose encoder is the timm ``architecture`` (``tu-`` universal encoder), single channel.

    ``encoder_weights=None`` always: smp's default reaches for a hub. The encoder's state dict keys
    are the timm backbone's with a ``model.`` prefix, so :func:`load_encoder_into_unet` can load a
    nanomorph backbone strictly.
    """
    import segmentation_models_pytorch as smp

    return smp.Unet(f"tu-{architecture}", encoder_weights=None, in_channels=1, classes=n_classes)


def load_encoder_into_unet(unet: nn.Module, backbone_state: dict[str, torch.Tensor]) -> None:
    """Loads a backbone state dict into the U-Net's encoder, strictly.

    timm's ``features_only`` wrapper keeps every backbone parameter for ResNet-style models. Keys the
    wrapper drops (e.g. a final conv head some architectures have) are reported in the error.
    """
    encoder: nn.Module = unet.encoder  # type: ignore[assignment]
    target = encoder.state_dict()
    state = {f"model.{k}": v for k, v in backbone_state.items()}
    extra = sorted(set(state) - set(target))
    if extra:
        raise ValueError(f"backbone keys the U-Net encoder does not have: {extra[:10]}")
    # smp's encoder load_state_dict returns None; strict=True raises on any missing key.
    encoder.load_state_dict(state, strict=True)
