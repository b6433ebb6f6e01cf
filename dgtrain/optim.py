"""Learning-rate schedules (`configs/scheduler/*`); optimizers are torch's own (`configs/optimizer/*`).

Every schedule is called as `schedule(optimizer, total_steps=...)` and is stepped once per optimizer step.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, StepLR


def constant(optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0) -> LRScheduler:
    return LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)


def cosine(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LRScheduler:
    """Linear warmup to the base lr over `warmup_steps`, then cosine decay to `min_lr_ratio * lr`."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def step(optimizer: Optimizer, *, total_steps: int, step_size: int = 100, gamma: float = 0.5) -> LRScheduler:
    """Multiply the lr by `gamma` every `step_size` optimizer steps."""
    return StepLR(optimizer, step_size=step_size, gamma=gamma)
