"""Callables that the `_target_` tests build (allowed through `allowed_targets=[tests.]`)."""

from __future__ import annotations

import torch
from torch import nn

from dgtrain.callbacks import Callback


class Backbone(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(in_features, hidden)


class Classifier(nn.Module):
    """A lightning-hydra-template style wrapper: the network arrives built, from `model.net`."""

    def __init__(self, net: nn.Module, num_classes: int, extras: list | None = None):
        super().__init__()
        self.net, self.head = net, nn.Linear(net.fc.out_features, num_classes)
        self.extras = extras


def record(*args, **kwargs):
    return args, kwargs


class StepRecorder:
    """A user callback (through `_target_`): records which hooks ran at which steps."""

    def __init__(self, tag: str = "rec"):
        self.tag, self.calls = tag, []

    def on_fit_start(self, ctx):
        self.calls.append(("fit_start", None))

    def on_train_step(self, ctx, step):
        pass

    def on_step_end(self, ctx, step, metrics):
        self.calls.append(("step_end", step, sorted(metrics)))

    def on_eval_end(self, ctx, step, metrics):
        self.calls.append(("eval_end", step))

    def on_checkpoint(self, ctx, step, path):
        self.calls.append(("checkpoint", step, path.name))

    def on_fit_end(self, ctx, status):
        ctx.extra_summary[self.tag] = {"calls": self.calls, "status": status}

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = list(state["calls"])


class ScaledL1(nn.Module):
    """A user loss (through `loss._target_`) with a setting of its own, and no `task`/`pad_id`."""

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, pred, target):
        return self.scale * (pred - target).abs().mean()


class StopAtStep(Callback):
    """A user callback that asks to stop from `on_train_step` (a host step count, no device read)."""

    def __init__(self, at: int = 7):
        self.at = at

    def on_train_step(self, ctx, step):
        if step >= self.at:
            ctx.request_stop(f"step {self.at} reached")


class PlainPairs(torch.utils.data.Dataset):
    """A plain map-style Dataset (no dgtrain base class): items are (x, y) pairs, as docs/extending.md allows."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def plain_blobs(*, seed: int, n: int = 200, **_):
    """A user's data function returning plain Datasets: 4 classes of 16 features."""
    from dgtrain.data import DataBundle, DataInfo, split_indices

    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = torch.randn(4, 16, generator=g)[y] * 3 + torch.randn(n, 16, generator=g)
    train, val = split_indices(n, 0.2, seed)
    info = DataInfo(task="classification", in_shape=(16,), num_classes=4)
    return DataBundle(PlainPairs(x[train], y[train]), PlainPairs(x[val], y[val]), info)


class PlainMLP(nn.Module):
    """A plain module without `from_data`: every size comes from the config (docs/extending.md)."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


class TorchSettings(Callback):
    """Records the process-wide torch settings a run trains with (threads=, deterministic=)."""

    def on_fit_start(self, ctx):
        ctx.extra_summary["torch_settings"] = {
            "threads": torch.get_num_threads(),
            "deterministic": torch.are_deterministic_algorithms_enabled(),
        }


class CrashingCallback(Callback):
    """A user callback with a bug of its own: dgtrain's message must point at it, not at dgtrain."""

    def on_train_step(self, ctx, step):
        if step == 2:
            raise ValueError("a bug in the user's callback")


class StopOnStepEnd(Callback):
    """Asks to stop from `on_step_end` (host metrics of a logging step), as a loss threshold would."""

    def on_step_end(self, ctx, step, metrics):
        if "train/loss" in metrics and step >= 2:
            ctx.request_stop("train/loss seen")
