"""training.schedule.WarmupCosine reproduces, step by step, the three schedules it replaced
(pretrain, finetune-cls, finetune-seg), each written out here as its own direct formula."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.schedule import WarmupCosine


def pretrain_formula(step: int, warmup: int, total: int) -> float:
    """``pretrain``: linear warm-up, cosine to 0, held at 0 after ``total``."""
    total = max(1, total)
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * t))


def finetune_cls_formula(step: int, steps: int) -> float:
    """``finetune-cls``: warm-up over a tenth of the steps, cosine to 0 (numpy's cos)."""
    warmup = max(1, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    return float(0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup))))


def finetune_seg_formula(step: int, total: int) -> float:
    """``finetune-seg``: warm-up over a twentieth of the steps, cosine to 1 % of the base rate."""
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t))


# (warmup_steps, total_steps) as pretrain builds them: round(min(warmup_epochs, 0.1 epochs) x
# steps/epoch) over epochs x steps/epoch, for the YAML default (warmup_epochs 10), the demo and tests.
@pytest.mark.parametrize(
    "epochs,steps_per_epoch,warmup_epochs",
    [(100, 12, 10.0), (1, 3, 10.0), (2, 4, 10.0), (4, 2, 10.0), (3, 1, 0.0), (30, 7, 2.5)],
)
def test_pretrain_schedule_is_reproduced(epochs: int, steps_per_epoch: int, warmup_epochs: float) -> None:
    total = epochs * steps_per_epoch
    warmup = round(min(warmup_epochs, 0.1 * epochs) * steps_per_epoch)
    schedule = WarmupCosine(warmup, total)
    for step in range(total + 3):  # a few past the end: held at the last value
        assert schedule(step) == pretrain_formula(step, warmup, total), step


@pytest.mark.parametrize("steps", [0, 1, 2, 5, 9, 10, 20, 200, 400, 1000])
def test_finetune_cls_schedule_is_reproduced(steps: int) -> None:
    schedule = WarmupCosine.over(steps, 10)
    for step in range(steps + 1):  # LambdaLR evaluates step 0 .. steps
        # numpy's and libm's cos may differ in the last bit: compare to a relative 1e-12.
        assert schedule(step) == pytest.approx(finetune_cls_formula(step, steps), rel=1e-12, abs=1e-15), step


@pytest.mark.parametrize("total", [1, 2, 3, 19, 20, 21, 150, 1000, 4001])
def test_finetune_seg_schedule_is_reproduced(total: int) -> None:
    schedule = WarmupCosine.over(total, 20, floor=0.01)
    for step in range(total):
        assert schedule(step) == finetune_seg_formula(step, total), step


def test_schedule_shape() -> None:
    schedule = WarmupCosine(4, 20, floor=0.1)
    values = [schedule(s) for s in range(25)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(values[3:], values[4:], strict=False))  # never rises after warm-up
    assert values[20] == pytest.approx(0.1) and values[24] == pytest.approx(0.1)


def test_lambda_lr_state_dict_records_the_schedule() -> None:
    """A callable object, not a lambda: the scheduler's state_dict keeps its settings for a resume."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(2, 10, floor=0.01))
    assert sched.state_dict()["lr_lambdas"][0] == {"warmup_steps": 2, "total_steps": 10, "floor": 0.01}
