"""Callbacks: small, typed hooks around the training loop (`callbacks=[early_stopping,ema]`).

The loop calls them at a few points only; none of them runs between logging steps with host values:

- `on_fit_start(ctx)`                  once, before the first step (after a resume: at the resumed step);
- `on_train_step(ctx, step)`           every optimizer step, for device-only work (EMA); must not read a
                                       tensor's value (`.item()`, `float(t)`, printing): that waits for
                                       the accelerator on every step;
- `on_step_end(ctx, step, metrics)`    on logging steps only, with the metrics already on the host;
- `on_eval_end(ctx, step, metrics)`    after each evaluation; may add namespaced metrics to `metrics`;
- `on_checkpoint(ctx, step, path)`     after a checkpoint file was written;
- `on_fit_end(ctx, status)`            once, with the run's status (completed, early_stopped, ...).

A callback asks the loop to stop with `ctx.request_stop(reason)`: the loop finishes the step, saves a
checkpoint and ends with status `early_stopped` and exit code 0. Callbacks with state that a resume
must restore implement `state_dict()` / `load_state_dict(state)`; it is stored in the checkpoint.

Users' own callbacks are `_target_` nodes under `callbacks:` (their module prefix in `allowed_targets`);
subclass `Callback` and override what you need.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from dgtrain.errors import DgtrainError
from dgtrain.loggers import FINISHED

log = logging.getLogger("dgtrain")


@dataclass
class FitContext:
    """What callbacks see of the run. `evaluate()` scores the current model weights on the validation
    split; `checkpoint_state()` is the loop's full resumable state (what step checkpoints hold)."""

    run_dir: Path
    model: torch.nn.Module
    optimizer: Any
    monitor: str  # the task's validation metric (val/acc, val/mse, val/ppl, ...)
    mode: str  # min | max
    evaluate: Callable[[], dict[str, float]]
    checkpoint_state: Callable[[], dict[str, Any]]
    writes_files: bool = True  # false under trainer.fast_dev_run: nothing but the log is written
    stop_reason: str | None = None
    extra_summary: dict[str, Any] = field(default_factory=dict)  # merged into summary.json

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason


@runtime_checkable
class CallbackProtocol(Protocol):
    def on_fit_start(self, ctx: FitContext) -> None: ...
    def on_train_step(self, ctx: FitContext, step: int) -> None: ...
    def on_step_end(self, ctx: FitContext, step: int, metrics: dict[str, float]) -> None: ...
    def on_eval_end(self, ctx: FitContext, step: int, metrics: dict[str, float]) -> None: ...
    def on_checkpoint(self, ctx: FitContext, step: int, path: Path) -> None: ...
    def on_fit_end(self, ctx: FitContext, status: str) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Callback:
    """No-op base: override the hooks you need."""

    def on_fit_start(self, ctx: FitContext) -> None:
        pass

    def on_train_step(self, ctx: FitContext, step: int) -> None:
        pass

    def on_step_end(self, ctx: FitContext, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_eval_end(self, ctx: FitContext, step: int, metrics: dict[str, float]) -> None:
        pass

    def on_checkpoint(self, ctx: FitContext, step: int, path: Path) -> None:
        pass

    def on_fit_end(self, ctx: FitContext, status: str) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def _improved(value: float, best: float | None, mode: str, min_delta: float) -> bool:
    if best is None:
        return math.isfinite(value)
    return value < best - min_delta if mode == "min" else value > best + min_delta


def _number(value: Any, key: str, rule: str, ok) -> float:
    """A callback argument as a float, or a DgtrainError naming the key and `rule` (text was a traceback)."""
    try:
        x = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        x = math.nan
    if not (math.isfinite(x) and ok(x)):
        raise DgtrainError(f"{key}={value}: {rule}.")
    return x


def _check_mode(mode: str | None, key: str) -> None:
    if mode not in (None, "min", "max"):
        raise DgtrainError(f"{key}={mode!r}: expected min, max or null (the metric's own direction).")


class EarlyStopping(Callback):
    """Stop when `monitor` has not improved by more than `min_delta` for `patience` evaluations."""

    def __init__(
        self, monitor: str | None = None, mode: str | None = None, patience: int = 3, min_delta: float = 0.0
    ):
        _check_mode(mode, "callbacks.early_stopping.mode")
        key = "callbacks.early_stopping"
        rule = "must be a whole number, at least 1"
        patience = _number(patience, f"{key}.patience", rule, lambda x: x >= 1 and x == int(x))
        min_delta = _number(min_delta, f"{key}.min_delta", "must be a number, 0 or more", lambda x: x >= 0)
        if monitor and mode is None:
            _direction(monitor, key)  # an unknown direction fails here, before the run dir is written
        self.monitor, self.mode = monitor, mode
        self.patience, self.min_delta = int(patience), min_delta
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0

    def on_fit_start(self, ctx: FitContext) -> None:
        self.monitor = self.monitor or ctx.monitor
        self.mode = self.mode or (
            ctx.mode if self.monitor == ctx.monitor else _direction(self.monitor, "callbacks.early_stopping")
        )
        if self.bad_evals >= self.patience:  # resumed from the checkpoint of the step it stopped at
            log.warning(
                f"resume: early stopping ended this run ({self.monitor} had not improved on {self.best:.6g} "
                f"(step {self.best_step}) for {self.bad_evals} evaluations), so there is nothing left to train. "
                f"To train further, raise callbacks.early_stopping.patience (now {self.patience})."
            )
            ctx.request_stop("early stopping: the resumed run had stopped already")

    def on_eval_end(self, ctx: FitContext, step: int, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:
            raise DgtrainError(
                f"callbacks.early_stopping.monitor={self.monitor}: the evaluation reports no such metric "
                f"(it reports {', '.join(sorted(metrics))})."
            )
        value = float(metrics[self.monitor])
        if _improved(value, self.best, self.mode, self.min_delta):
            self.best, self.best_step, self.bad_evals = value, step, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.patience:
            ctx.request_stop(
                f"early stopping: {self.monitor} has not improved on {self.best:.6g} (step {self.best_step}) "
                f"for {self.bad_evals} evaluations (patience {self.patience}, min_delta {self.min_delta:g})"
            )

    def on_fit_end(self, ctx: FitContext, status: str) -> None:
        ctx.extra_summary["early_stopping"] = {
            "monitor": self.monitor,
            "best": self.best,
            "best_step": self.best_step,
            "bad_evals": self.bad_evals,
            "stopped": status == "early_stopped",
        }

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_step, self.bad_evals = state["best"], state["best_step"], state["bad_evals"]


def _direction(metric: str, key: str) -> str:
    """min or max for a known metric; `key` (checkpoint, callbacks.early_stopping) names the settings."""
    from dgtrain.tasks import HIGHER_IS_BETTER

    if metric not in HIGHER_IS_BETTER:
        raise DgtrainError(
            f"{key}.monitor={metric}: its direction is unknown; set {key}.mode=min or {key}.mode=max."
        )
    return "max" if HIGHER_IS_BETTER[metric] else "min"


class EMA(Callback):
    """An exponential moving average of the weights, `ema = d * ema + (1 - d) * w` after every optimizer
    step, on the device (no host sync). With `warmup` (as timm), d = min(decay, (1 + n) / (10 + n)) after
    n updates, so a short run's average is not dominated by the initial weights. Each evaluation also scores the averaged weights
    (`val_ema/...`); the averaged weights are saved as `model_ema.safetensors` beside `model.safetensors`."""

    def __init__(self, decay: float = 0.999, evaluate: bool = True, warmup: bool = True):
        rule = "must lie strictly between 0 and 1 (e.g. 0.999)"
        decay = _number(decay, "callbacks.ema.decay", rule, lambda x: 0.0 < x < 1.0)
        self.decay, self.do_evaluate, self.warmup = decay, bool(evaluate), bool(warmup)
        self.updates = 0
        self._live: list[torch.Tensor] = []
        self.shadow: list[torch.Tensor] = []
        self._loaded: list[torch.Tensor] | None = None

    def _tensors(self, ctx: FitContext) -> list[torch.Tensor]:
        # floating-point parameters and buffers (BatchNorm running stats are averaged too)
        return [t for t in ctx.model.state_dict().values() if t.is_floating_point()]

    def on_fit_start(self, ctx: FitContext) -> None:
        # views of the live parameters and buffers, gathered once (state_dict() per step costs Python time)
        self._live = live = self._tensors(ctx)
        if self._loaded is not None:
            if [t.shape for t in self._loaded] != [t.shape for t in live]:
                raise DgtrainError("callbacks.ema: the checkpoint's averaged weights do not fit this model.")
            self.shadow = [s.to(t.device) for s, t in zip(self._loaded, live, strict=True)]
        else:
            self.shadow = [t.detach().clone() for t in live]

    def on_train_step(self, ctx: FitContext, step: int) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        self.updates += 1  # a host counter: the weight is a Python float, nothing is read back
        with torch.no_grad():
            torch._foreach_lerp_(self.shadow, self._live, 1.0 - d)

    def swapped(self, ctx: FitContext):
        """A context in which the model holds the averaged weights."""
        import contextlib

        @contextlib.contextmanager
        def swap():
            live = self._live
            raw = [t.detach().clone() for t in live]
            with torch.no_grad():
                torch._foreach_copy_(live, self.shadow)
            try:
                yield
            finally:
                with torch.no_grad():
                    torch._foreach_copy_(live, raw)

        return swap()

    def on_eval_end(self, ctx: FitContext, step: int, metrics: dict[str, float]) -> None:
        if not self.do_evaluate:
            return
        with self.swapped(ctx):
            ema = ctx.evaluate()
        metrics.update({k.replace("val/", "val_ema/", 1): v for k, v in ema.items()})

    def on_fit_end(self, ctx: FitContext, status: str) -> None:
        if status in FINISHED and ctx.writes_files and self.shadow:
            from dgtrain.checkpoint import save_weights

            with self.swapped(ctx):
                save_weights(ctx.model, ctx.run_dir / "model_ema.safetensors")

    def state_dict(self) -> dict[str, Any]:
        return {
            "decay": self.decay,
            "updates": self.updates,
            "shadow": [t.detach().cpu() for t in self.shadow],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._loaded, self.updates = list(state["shadow"]), int(state.get("updates", 0))


class TopKCheckpoints(Callback):
    """`checkpoint.save_top_k=K`: keep the K checkpoints with the best monitored value, as
    `<checkpoint dir>/top_k/step_XXXXXXXX.pt`, listed best first in `top_k/index.json`."""

    def __init__(self, k: int, directory: Path, monitor: str | None = None, mode: str | None = None):
        if int(k) < 1:
            raise DgtrainError(f"checkpoint.save_top_k={k}: must be a positive integer, or null.")
        _check_mode(mode, "checkpoint.mode")
        if monitor and mode is None:  # an unknown direction fails here, before the run dir is written
            _direction(monitor, "checkpoint")
        self.k, self.dir, self.monitor, self.mode = int(k), Path(directory) / "top_k", monitor, mode
        self.kept: list[dict[str, Any]] = []  # {"step", "value", "path"}, best first

    def on_fit_start(self, ctx: FitContext) -> None:
        self.monitor = self.monitor or ctx.monitor
        self.mode = self.mode or (
            ctx.mode if self.monitor == ctx.monitor else _direction(self.monitor, "checkpoint")
        )

    def on_eval_end(self, ctx: FitContext, step: int, metrics: dict[str, float]) -> None:
        if self.monitor not in metrics:  # it silently kept no checkpoint at all
            raise DgtrainError(
                f"checkpoint.monitor={self.monitor}: the evaluation reports no such metric (it reports "
                f"{', '.join(sorted(metrics))}); checkpoint.save_top_k ranks checkpoints by it."
            )
        value = metrics[self.monitor]
        if not math.isfinite(value) or not ctx.writes_files:
            return
        worst = self.kept[-1]["value"] if len(self.kept) >= self.k else None
        if worst is not None and not _improved(value, worst, self.mode, 0.0):
            return
        from dgtrain.checkpoint import atomic_write, save

        path = self.dir / f"step_{step:08d}.pt"
        save(ctx.checkpoint_state(), path)
        self.kept = [e for e in self.kept if e["step"] != step] + [
            {"step": step, "value": value, "path": str(path)}
        ]
        self.kept.sort(key=lambda e: e["value"], reverse=self.mode == "max")
        for old in self.kept[self.k :]:
            Path(old["path"]).unlink(missing_ok=True)
        self.kept = self.kept[: self.k]
        import json

        text = json.dumps({"monitor": self.monitor, "mode": self.mode, "kept": self.kept}, indent=2) + "\n"
        atomic_write(self.dir / "index.json", lambda f: f.write(text.encode()))

    def state_dict(self) -> dict[str, Any]:
        return {"kept": self.kept}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Only files in this run's own top_k/: resumed from another run (resume=OTHER_RUN into a new run dir),
        # its files are that run's, listed in its index.json, and must not be rotated away from here.
        mine = self.dir.resolve()
        self.kept = [
            e for e in state["kept"] if Path(e["path"]).is_file() and Path(e["path"]).resolve().parent == mine
        ]


class CallbackList:
    """Calls each hook on every callback, in the configured order; saves and restores their states."""

    def __init__(self, callbacks: dict[str, Any]):
        self.named = dict(callbacks)
        for name, cb in self.named.items():
            missing = [h for h in HOOKS if not callable(getattr(cb, h, None))]
            if missing:
                raise DgtrainError(
                    f"callbacks.{name}: {type(cb).__name__} lacks {', '.join(missing)}; subclass "
                    "dgtrain.callbacks.Callback (its hooks do nothing) and override the ones you need."
                )
        # EMA adds val_ema/... to an evaluation's metrics, which early stopping, top-k or a user's callback
        # may monitor: it scores first, whatever the configured order (callbacks=[early_stopping,ema])
        ema = [cb for cb in self.named.values() if isinstance(cb, EMA)]
        self._eval_order = ema + [cb for cb in self.named.values() if not isinstance(cb, EMA)]
        # only callbacks that override the per-step hook are called every step
        self._per_step = [
            cb for cb in self.named.values() if type(cb).on_train_step is not Callback.on_train_step
        ]

    def __bool__(self) -> bool:
        return bool(self.named)

    def fit_start(self, ctx: FitContext) -> None:
        for cb in self.named.values():
            cb.on_fit_start(ctx)

    def train_step(self, ctx: FitContext, step: int) -> None:
        for cb in self._per_step:
            cb.on_train_step(ctx, step)

    def step_end(self, ctx: FitContext, step: int, metrics: dict[str, float]) -> None:
        for cb in self.named.values():
            cb.on_step_end(ctx, step, metrics)

    def eval_end(self, ctx: FitContext, step: int, metrics: dict[str, float]) -> None:
        for cb in self._eval_order:
            cb.on_eval_end(ctx, step, metrics)

    def checkpoint(self, ctx: FitContext, step: int, path: Path) -> None:
        for cb in self.named.values():
            cb.on_checkpoint(ctx, step, path)

    def fit_end(self, ctx: FitContext, status: str) -> None:
        for cb in self.named.values():
            cb.on_fit_end(ctx, status)

    def state_dict(self) -> dict[str, Any]:
        return {name: cb.state_dict() for name, cb in self.named.items()}

    def load_state_dict(self, states: dict[str, Any]) -> None:
        for name, cb in self.named.items():
            if name in states:
                cb.load_state_dict(states[name])
            else:
                log.warning(f"callbacks.{name}: the checkpoint holds no state for it; it starts afresh")


HOOKS = (
    "on_fit_start",
    "on_train_step",
    "on_step_end",
    "on_eval_end",
    "on_checkpoint",
    "on_fit_end",
    "state_dict",
    "load_state_dict",
)


def build_callbacks(cfg, checkpoint_dir: Path) -> CallbackList:
    """The `callbacks:` nodes (in their order), then `checkpoint.save_top_k`'s keeper."""
    from dgtrain.config import allowed_prefixes, build

    named: dict[str, Any] = {}
    for name, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        named[str(name)] = build(node, allowed=allowed_prefixes(cfg), key=f"callbacks.{name}")
    ck = cfg.get("checkpoint") or {}
    if ck.get("save_top_k"):
        named["save_top_k"] = TopKCheckpoints(
            int(ck.save_top_k), checkpoint_dir, monitor=ck.get("monitor"), mode=ck.get("mode")
        )
    return CallbackList(named)
