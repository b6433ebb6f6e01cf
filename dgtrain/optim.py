"""Learning-rate schedules (`configs/scheduler/*`); optimizers are torch's own (`configs/optimizer/*`),
built by `make_optimizer`, which also settles `optimizer.fused`.

Every schedule is called as `schedule(optimizer, total_steps=...)` and is stepped once per optimizer step.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from omegaconf import DictConfig
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


# optimizer.fused=auto turns torch's fused kernels on for these, on CUDA: one kernel per step for all
# parameters, and they drop a non-finite update on the device (docs/loop.md).
FUSED_BY_DEFAULT = ("Adam", "AdamW")


def fused_choice(mode: Any, optimizer_cls: type, device: torch.device) -> bool:
    """`optimizer.fused`: auto (fused Adam/AdamW on CUDA), true (wherever torch has a fused kernel for
    this optimizer, CPU included), false (torch's own default: for-loop on CPU, foreach on CUDA)."""
    from dgtrain.data import flag
    from dgtrain.errors import DgtrainError

    mode = flag(mode)
    has_fused = "fused" in inspect.signature(optimizer_cls).parameters
    if mode == "true" and not has_fused:
        raise DgtrainError(
            f"optimizer.fused=true: {optimizer_cls.__module__}.{optimizer_cls.__qualname__} has no fused "
            "implementation. Use optimizer.fused=auto or false."
        )
    if mode == "auto":
        return device.type == "cuda" and has_fused and optimizer_cls.__name__ in FUSED_BY_DEFAULT
    return mode == "true"


def make_optimizer(node: DictConfig, params, device: torch.device, allowed: tuple[str, ...]) -> Optimizer:
    """The optimizer `node` names, over `params`, fused or not as `fused_choice` decides."""
    from dgtrain.config import build, locate

    cls = locate(node._target_, allowed, key="optimizer._target_")
    fused = fused_choice(node.get("fused", "false"), cls, device)
    extra = {"fused": True} if fused else {}
    return build(node, allowed=allowed, key="optimizer", exclude=("fused",), **extra)(params)
