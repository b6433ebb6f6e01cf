"""Learning-rate schedules (`configs/scheduler/*`), and the parameter groups handed to the optimizer
(`configs/optimizer/*`: torch's own optimizers), built by `make_optimizer`, which also settles
`optimizer.fused`.

Every schedule is called as `schedule(optimizer, total_steps=...)` and is stepped once per optimizer step.
"""

from __future__ import annotations

import fnmatch
import inspect
import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, StepLR


class FactorLR(LambdaLR):
    """torch's LambdaLR (the same values, bit for bit, and the same state_dict) with a lean `step`.

    The loop steps the schedule after every optimizer step, and LRScheduler's generic `step` (order
    warnings, a context manager, rebuilt lists) costs about 10 us on the host: a tenth of a small
    model's whole step on CPU. After torch's own first step (which keeps its misuse warnings), this one
    sets each group's lr to `base_lr * factor(step)` directly; tensor lrs take torch's path."""

    def step(self, epoch: int | None = None) -> None:
        groups = self.optimizer.param_groups
        if epoch is not None or self._step_count <= 1 or not getattr(self, "_float_lrs", False):
            super().step(epoch)
            self._float_lrs = all(type(g["lr"]) is float for g in groups)
            return
        self._step_count += 1
        self.last_epoch = e = self.last_epoch + 1
        lrs = [base * fn(e) for fn, base in zip(self.lr_lambdas, self.base_lrs, strict=True)]
        for group, lr in zip(groups, lrs, strict=True):
            group["lr"] = lr
        self._last_lr = lrs

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_float_lrs", None)  # this process's own note, not the schedule's state
        return state


def grad_clearer(optimizer: Optimizer):
    """A function that does `optimizer.zero_grad(set_to_none=True)`. torch's own zero_grad sets each
    gradient to None inside a profiler range and behind a compiler guard, about 9 us per call on the
    host: as much as a small model's whole Adam update on two tensors. For an optimizer that keeps
    torch's zero_grad this one sets the same gradients to None directly (the groups are read per call,
    so `add_param_group` and `load_state_dict` are followed); an optimizer with its own keeps its own."""
    if type(optimizer).zero_grad is not Optimizer.zero_grad:
        return lambda: optimizer.zero_grad(set_to_none=True)

    def clear() -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None

    return clear


def step_function(optimizer: Optimizer):
    """A function that does `optimizer.step()`. torch wraps every optimizer class's step in a profiler
    range and loops over the global and per-optimizer step hooks, which costs 20-40 us on the host
    per call: more than a small model's whole update. This calls the class's own step directly whenever
    that wrapper would do nothing else: no step hook registered (globally or on this optimizer), no
    profiler recording, no other wrapper on the instance. Otherwise, and for optimizers torch has not
    wrapped, it is `optimizer.step()` as it was.

    A learning-rate schedule wraps `optimizer.step` on the instance only so that its first `step()` can
    warn when it is called before the optimizer's; once the optimizer has stepped through it and the
    schedule has had that first step (the loop steps it after every update), the wrapper is taken off."""
    import torch.optim.optimizer as torch_optim

    cls_step = type(optimizer).step
    raw = getattr(cls_step, "__wrapped__", None) if getattr(cls_step, "hooked", False) else None
    global_pre = getattr(torch_optim, "_global_optimizer_pre_hooks", None)
    global_post = getattr(torch_optim, "_global_optimizer_post_hooks", None)
    if raw is None or global_pre is None or global_post is None:
        return lambda: optimizer.step()
    profiling = torch.autograd._profiler_enabled

    calls = 0

    def step() -> None:
        nonlocal calls
        calls += 1
        wrapper = optimizer.__dict__.get("step")
        if (
            calls > 1
            and getattr(wrapper, "_wrapped_by_lr_sched", False)
            and getattr(optimizer, "_opt_called", 0)
        ):
            del optimizer.step  # the schedule's first step has seen the optimizer's: its check is done
            wrapper = None
        if (
            wrapper is not None
            or global_pre
            or global_post
            or optimizer._optimizer_step_pre_hooks
            or optimizer._optimizer_step_post_hooks
            or profiling()
        ):
            optimizer.step()
        else:
            raw(optimizer)

    return step


def constant(optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0) -> LRScheduler:
    return FactorLR(optimizer, lambda s: min(1.0, (s + 1) / warmup_steps) if warmup_steps else 1.0)


def cosine(
    optimizer: Optimizer, *, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> LRScheduler:
    """Linear warmup to the base lr over `warmup_steps`, then cosine decay towards `min_lr_ratio * lr`,
    reached at `total_steps` (the last step, total_steps - 1, runs just above it)."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return (s + 1) / warmup_steps
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return FactorLR(optimizer, factor)


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


def make_optimizer(
    cfg: DictConfig, model: torch.nn.Module, allowed: tuple[str, ...], device: torch.device | None = None
) -> Optimizer:
    """The optimizer `cfg.optimizer` names, over `param_groups`, fused or not as `fused_choice` decides
    for `device` (default: the CPU)."""
    from dgtrain.config import OPTIMIZER_META_KEYS, build, locate

    node = cfg.optimizer
    cls = locate(node._target_, allowed, key="optimizer._target_")
    fused = fused_choice(node.get("fused", "false"), cls, device or torch.device("cpu"))
    extra = {"fused": True} if fused else {}
    factory = build(node, allowed=allowed, key="optimizer", exclude=OPTIMIZER_META_KEYS, **extra)
    groups = param_groups(
        model,
        weight_decay=float(node.get("weight_decay", 0.0) or 0.0),
        group_decay=bool(node.get("group_decay", True)),
        lr_groups=node.get("lr_groups"),
    )
    return factory(groups)
