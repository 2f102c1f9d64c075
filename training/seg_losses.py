"""Segmentation loss (soft Dice + cross-entropy) and hard metrics (IoU, Dice from a confusion matrix).

Cross-entropy gives well-behaved per-pixel gradients; soft Dice (Milletari et al., "V-Net", 3DV 2016)
counters the class imbalance typical of TEM masks, where a thin wire phase covers a few percent of
the frame. Their sum is the usual compound loss (Ma et al., "Loss odyssey in medical image
segmentation", MedIA 2021).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:
    from nanomorph.particles import InstanceParams


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    n_classes: int,
    eps: float = 1.0,
    include_background: bool = True,
) -> torch.Tensor:
    """Multi-class soft Dice loss on softmax probabilities, ``1 - mean_c Dice_c``.

    Dice is computed per class over the whole batch (not per image), so that tiles without any
    foreground do not produce undefined or exploding terms; ``eps`` smooths empty classes toward 1.

    Args:
        logits: (N, C, H, W) raw scores.
        target: (N, H, W) integer class indices in ``[0, C)``.
        n_classes: C.
        eps: additive smoothing in numerator and denominator.
        include_background: average over class 0 too (helps the binary case stay calibrated).
    """
    probs = logits.float().softmax(dim=1)
    one_hot = F.one_hot(target.long(), n_classes).permute(0, 3, 1, 2).to(probs.dtype)
    dims = (0, 2, 3)
    inter = (probs * one_hot).sum(dims)
    denom = probs.sum(dims) + one_hot.sum(dims)
    dice = (2.0 * inter + eps) / (denom + eps)
    if not include_background and n_classes > 1:
        dice = dice[1:]
    return 1.0 - dice.mean()


class DiceCELoss(nn.Module):
    """``ce_weight * CrossEntropy + dice_weight * SoftDice`` for (N, C, H, W) logits and (N, H, W) targets."""

    def __init__(
        self,
        n_classes: int,
        dice_weight: float = 1.0,
        ce_weight: float = 1.0,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        if n_classes < 2:
            raise ValueError(f"segmentation needs at least 2 classes (background + one), got {n_classes}")
        self.n_classes = n_classes
        self.dice_weight = dice_weight
        self.ce_weight = ce_weight
        self.class_weights: torch.Tensor | None
        self.register_buffer("class_weights", class_weights)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.long()
        ce = F.cross_entropy(logits.float(), target, weight=self.class_weights)
        dice = soft_dice_loss(logits, target, self.n_classes)
        return self.ce_weight * ce + self.dice_weight * dice


def pixel_confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, C) pixel counts, rows = true class, columns = predicted class (as ``training.metrics``)."""
    if y_pred.shape != y_true.shape:
        raise ValueError(f"prediction shape {y_pred.shape} differs from mask shape {y_true.shape}")
    idx = y_true.astype(np.int64).ravel() * n_classes + y_pred.astype(np.int64).ravel()
    return np.bincount(idx, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def score_prob_maps(
    prob_maps: Iterable[np.ndarray],
    masks: Iterable[np.ndarray],
    classes: list[str],
    inst: InstanceParams | None = None,
) -> dict[str, Any]:
    """Hard scores (:func:`scores_from_confusion`) of (C, H, W) probability maps against their
    semantic masks. With ``inst`` (a boundary-aware model's ``InstanceParams``) the prediction is
    :func:`nanomorph.particles.fold_mask`, the mask ``predict`` and the service return (rim pixels
    count as particle), scored over the classes without the rim: scoring the 1-2 px rim as a class
    of its own averages an IoU near 0 into the foreground mean."""
    from nanomorph.particles import fold_mask, semantic_classes

    names = semantic_classes(classes, inst)
    cm = np.zeros((len(names), len(names)), dtype=np.int64)
    for probs, mask in zip(prob_maps, masks, strict=True):
        cm += pixel_confusion(mask, fold_mask(probs, inst), len(names))
    return scores_from_confusion(cm, names)


def _ratio(num: float, den: float) -> float | None:
    # A class absent from both prediction and truth has no defined IoU: report None, not 0 or 1.
    return float(num / den) if den > 0 else None


def scores_from_confusion(cm: np.ndarray, classes: list[str]) -> dict[str, Any]:
    """Hard (argmax) per-class IoU and Dice, their means over foreground classes and pixel accuracy.

    IoU_c = TP / (TP + FP + FN); Dice_c = 2 TP / (2 TP + FP + FN), summed over all pixels of the
    split (micro over images). Class 0 is background and is left out of the foreground means.
    """
    cm = np.asarray(cm, dtype=np.float64)
    tp = np.diag(cm)
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    per_class: dict[str, dict[str, Any]] = {}
    for c, name in enumerate(classes):
        per_class[name] = {
            "iou": _ratio(tp[c], tp[c] + fp[c] + fn[c]),
            "dice": _ratio(2 * tp[c], 2 * tp[c] + fp[c] + fn[c]),
            "true_pixels": int(cm[c].sum()),
            "predicted_pixels": int(cm[:, c].sum()),
        }
    fg = [per_class[name] for name in classes[1:]]
    ious = [p["iou"] for p in fg if p["iou"] is not None]
    dices = [p["dice"] for p in fg if p["dice"] is not None]
    total = cm.sum()
    return {
        "per_class": per_class,
        "mean_iou_foreground": float(np.mean(ious)) if ious else None,
        "mean_dice_foreground": float(np.mean(dices)) if dices else None,
        "pixel_accuracy": float(tp.sum() / total) if total else None,
    }
