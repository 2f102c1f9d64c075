"""The one learning-rate schedule of every training command: linear warm-up, then cosine decay.

``pretrain`` warms up over ``warmup_epochs`` and decays to ``lr_floor`` (default 0; with no
warm-up and a floor of 1 its lr is constant, as bench/ssl_quality.py's reference loop trains);
``finetune-cls`` warms up over a tenth of its steps and decays to 0; ``finetune-seg`` warms up over
a twentieth and decays to 1 % of the base rate (``floor=0.01``), so the encoder that joined late
still moves at the end.
"""

from __future__ import annotations

import math


class WarmupCosine:
    """Multiplier of the base lr at optimiser step ``step`` (0-based).

    ``(step + 1) / warmup_steps`` while ``step < warmup_steps``, then
    ``floor + (1 - floor) * 0.5 * (1 + cos(pi * t))`` with ``t`` going from 0 to 1 over the
    remaining ``total_steps - warmup_steps`` steps (held at 1 after them).

    A callable object (not a lambda) so that ``LambdaLR.state_dict`` records it.

    Args:
        warmup_steps: steps of linear warm-up (0: none).
        total_steps: steps of the whole schedule, warm-up included.
        floor: the multiplier the cosine ends at.
    """

    def __init__(self, warmup_steps: int, total_steps: int, floor: float = 0.0) -> None:
        self.warmup_steps = int(warmup_steps)
        self.total_steps = max(1, int(total_steps))
        self.floor = float(floor)

    @classmethod
    def over(cls, total_steps: int, warmup_divisor: int, floor: float = 0.0) -> WarmupCosine:
        """Warm-up over ``total_steps // warmup_divisor`` steps (at least one)."""
        return cls(max(1, int(total_steps) // warmup_divisor), total_steps, floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, (step - self.warmup_steps) / span)
        # One expression for every floor: with floor 0 it is exactly 0.5 * (1 + cos(pi t)).
        return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))
