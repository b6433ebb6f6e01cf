"""Learning-rate schedules (`configs/scheduler/*`), and the parameter groups handed to the optimizer
(`configs/optimizer/*`: torch's own optimizers).

Every schedule is called as `schedule(optimizer, total_steps=...)` and is stepped once per optimizer step.
"""

from __future__ import annotations

import fnmatch
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


# Keys of the optimizer node that dgtrain reads itself; the rest are the optimizer's arguments.


def param_groups(
    model: torch.nn.Module,
    weight_decay: float = 0.0,
    group_decay: bool = True,
    lr_groups: dict[str, float] | None = None,
) -> list[dict[str, Any]] | list[torch.nn.Parameter]:
    """Trainable parameters, grouped as nanoGPT does: weight decay on matrices and embeddings
    (dim >= 2) only, never on biases and norm weights (`group_decay`); `lr_groups` ({glob: lr}, first
    match wins) gives the parameters whose names match their own learning rate."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    lr_groups = dict(lr_groups or {})
    if not lr_groups and (not group_decay or not weight_decay):
        return [p for _, p in named]  # one group: the optimizer's own defaults apply
    for pat in lr_groups:
        if not any(fnmatch.fnmatch(n, pat) for n, _ in named):
            from dgtrain.errors import DgtrainError

            raise DgtrainError(
                f"optimizer.lr_groups: the pattern {pat!r} matches no trainable parameter "
                f"(names look like {', '.join(n for n, _ in named[:6])})."
            )
    groups: dict[tuple, dict[str, Any]] = {}
    for n, p in named:
        lr = next((lr for pat, lr in lr_groups.items() if fnmatch.fnmatch(n, pat)), None)
        decay = weight_decay if (p.dim() >= 2 or not group_decay) else 0.0
        g = groups.setdefault((lr, decay), {"params": [], "names": [], "weight_decay": decay})
        if lr is not None:
            g["lr"] = float(lr)
        g["params"].append(p)
        g["names"].append(n)
    for g in groups.values():
        del g["names"]
    return list(groups.values())


def make_optimizer(cfg: DictConfig, model: torch.nn.Module, allowed: tuple[str, ...]) -> Optimizer:
    from dgtrain.config import OPTIMIZER_META_KEYS, build

    node = cfg.optimizer
    factory = build(node, allowed=allowed, key="optimizer", exclude=OPTIMIZER_META_KEYS)
    groups = param_groups(
        model,
        weight_decay=float(node.get("weight_decay", 0.0) or 0.0),
        group_decay=bool(node.get("group_decay", True)),
        lr_groups=node.get("lr_groups"),
    )
    return factory(groups)
