"""Losses (`configs/loss/*`). Each builder knows which tasks it fits, so a mismatch fails before training."""

from __future__ import annotations

from typing import Any

from torch import nn

from dgtrain.errors import DgtrainError


def mse(*, task: str, pad_id: int | None = None) -> nn.Module:
    if task != "regression":
        raise DgtrainError(
            f"loss=mse fits regression data, but the data's task is {task}; use loss=cross_entropy "
            "or loss=auto."
        )
    return nn.MSELoss()


def cross_entropy(
    *, task: str, pad_id: int | None = None, label_smoothing: float = 0.0, ignore_index: int | None = None
) -> nn.Module:
    """Cross-entropy over logits; padding tokens (the data's pad id) are ignored unless
    `ignore_index` is set explicitly."""
    if task == "regression":
        raise DgtrainError(
            "loss=cross_entropy needs class or token targets, but the data's task is regression; "
            "use loss=mse or loss=auto."
        )
    if ignore_index is None:
        ignore_index = pad_id if pad_id is not None else -100
    return nn.CrossEntropyLoss(ignore_index=ignore_index, label_smoothing=label_smoothing)


def auto(*, task: str, pad_id: int | None = None, label_smoothing: float = 0.0) -> nn.Module:
    """MSE for regression, cross-entropy for everything else."""
    if task == "regression":
        return mse(task=task)
    return cross_entropy(task=task, pad_id=pad_id, label_smoothing=label_smoothing)


TASKS_OF = {
    "mse": ("regression",),
    "cross_entropy": ("classification", "seq2seq", "lm"),
    "auto": ("regression", "classification", "seq2seq", "lm"),
}


def build_loss(node: Any, allowed: tuple[str, ...], task: str, pad_id: int | None) -> nn.Module:
    """`loss._target_` built with the node's keys, plus the data's `task` and `pad_id` for a target that
    takes them (dgtrain's builders above); torch's losses and a user's own class get only their keys."""
    from dgtrain.config import build, locate, target_parameters

    found = target_parameters(locate(node.get("_target_"), allowed, key="loss._target_"))
    extra = {"task": task, "pad_id": pad_id}
    if found is not None and not found[1]:  # a signature without **kwargs: what it names
        extra = {k: v for k, v in extra.items() if k in found[0]}
    return build(node, allowed=allowed, key="loss", **extra)
