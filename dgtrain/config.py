"""The config schema (typed fields fail at compose time), cross-field validation, and safe `_target_` calls.

Only the parts a user swaps (model, data, loss, optimizer, scheduler, loggers) are `_target_` nodes;
loop settings are typed dataclass fields so that `trainer.max_steps=ten` fails before anything runs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dgtrain.errors import DgtrainError

# `_target_` values are resolved only under these prefixes (plus `allowed_targets` from the config),
# so a config file, an override or a stored checkpoint cannot make dgtrain call `os.system`.
DEFAULT_ALLOWED_TARGETS = ("dgtrain.", "torch.")

# Keys of a data node that describe it rather than being arguments of its builder.
DATA_META_KEYS = ("task", "batch_size", "num_workers")


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


class Direction(str, Enum):
    minimize = "minimize"
    maximize = "maximize"


@dataclass
class SweepConfig:
    # The metric a sweep optimises; null: the task's validation metric (val/acc, val/mse, ...).
    metric: str | None = None
    # minimize | maximize; null: the metric's own direction.
    direction: Direction | None = None
    # Skip a job whose run dir already holds a completed run with the same overrides.
    resume: bool = False


class NonFinite(str, Enum):
    fail = "fail"  # stop before the optimizer step, naming the step
    skip = "skip"  # leave the parameters unchanged for that step, count it (train/skipped_steps)


@dataclass
class TrainerConfig:
    # Optimizer steps to run; when null, max_epochs decides.
    max_steps: int | None = None
    max_epochs: int = 10
    # Micro-batches per optimizer step; the effective batch is data.batch_size * grad_accum_steps.
    grad_accum_steps: int = 1
    # Clip the global gradient norm to this value (null: no clipping).
    clip_grad_norm: float | None = None
    # Bring loss and metrics to the host every N optimizer steps (and on the last one).
    log_every: int = 10
    # Evaluate every N optimizer steps; null: at the end of each epoch. Always at the end.
    eval_every: int | None = None
    # Cap on validation batches per evaluation (null: the whole validation split).
    eval_batches: int | None = None
    # A non-finite loss or gradient: fail (stop before the optimizer step) | skip (drop that update).
    nonfinite: NonFinite = NonFinite.fail
    # torch.compile the model's forward: false | true | reduce-overhead | max-autotune (dgtrain/compile.py).
    compile: Any = False


@dataclass
class CheckpointConfig:
    # Save every N optimizer steps (null: only at the end and on a stop signal).
    every: int | None = None
    # Keep the newest K step checkpoints (null: keep all); best.pt is kept apart.
    keep_last: int | None = 2
    # Also keep best.pt, the checkpoint with the best value of the task's monitor metric (val/...).
    best: bool = True
    # Where checkpoints go (null: <run dir>/checkpoints).
    dir: str | None = None


@dataclass
class SmokeConfig:
    """A recipe's smoke contract (`dgtrain smoke`, dgtrain/commands/smoke.py); training ignores it."""

    # Overrides that make the run short: steps, batch and data size.
    overrides: list[str] = field(default_factory=list)
    # The metric the contract checks (a key of metrics.jsonl) and its bounds: the fraction by which it
    # must fall from its first logged value to its last (0.3: at least 30%), and/or bounds on the last value.
    metric: str | None = None
    min_drop: float | None = None
    min: float | None = None
    max: float | None = None
    # Budgets: peak RSS (MB), peak CUDA memory (MB, checked on CUDA only), wall time of the run (s).
    rss_mb: float | None = None
    cuda_mb: float | None = None
    time_s: float | None = None


@dataclass
class TelemetryConfig:
    # Off: no per-step probes at all (memory figures are still read on logging steps).
    enabled: bool = True
    # Measure the autograd graph of one batch every N optimizer steps (and on the first step).
    graph_every: int = 100
    # Peak dense TFLOP/s of the device for perf/mfu (null: dgtrain's table of known GPUs).
    peak_tflops: float | None = None


@dataclass
class TrainConfig:
    model: Any = None
    data: Any = None
    loss: Any = None
    optimizer: Any = None
    scheduler: Any = None
    logger: Any = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # null: start fresh | auto: the newest valid checkpoint of the run dir (fresh if none) | PATH: that file.
    resume: str | None = None
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    precision: Precision = Precision.fp32
    seed: int = 0
    # Extra module prefixes whose callables `_target_` may name (dgtrain. and torch. are always allowed).
    allowed_targets: list[str] = field(default_factory=list)
    smoke: SmokeConfig = field(default_factory=SmokeConfig)


def register_schema() -> None:
    ConfigStore.instance().store(name="dgtrain_schema", node=TrainConfig)


# --------------------------------------------------------------------------------------------------
# Safe construction of `_target_` nodes


# Callables under an allowed prefix that still fetch or run arbitrary code: never targets.
DENIED_TARGETS = (
    "torch.hub.",
    "torch.load",
    "torch.jit.load",
    "torch.package.",
    "torch.utils.cpp_extension.",
    "torch.distributed.rpc.",
)


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    """`name` is a prefix itself (`torch` for `torch.`) or lies under one."""
    return any(name == p.rstrip(".") or name.startswith(p if p.endswith(".") else p + ".") for p in prefixes)


def locate(target: str, allowed: tuple[str, ...] = DEFAULT_ALLOWED_TARGETS, key: str = "_target_") -> Any:
    """Import `target` ("pkg.mod.name") if it lies under an allowed prefix; refuse otherwise.

    The prefix is checked on what the name resolves to, not only on its spelling: every module the walk
    passes through, and the module that defines the callable, must be allowed too, so a re-export
    (`torch.os.system`, `dgtrain.faults.subprocess.run`) cannot smuggle in a forbidden callable."""

    def refuse(why: str) -> DgtrainError:
        return DgtrainError(
            f"{key}={target!r} is not allowed: {why}. dgtrain only calls targets defined under "
            f"{', '.join(allowed)}. If this callable is yours and trusted, add its module prefix to "
            f"`allowed_targets` (for example `allowed_targets=[{str(target).rsplit('.', 1)[0]}.]`)."
        )

    if not isinstance(target, str) or not any(target.startswith(p) for p in allowed):
        raise refuse("it is outside the allowed prefixes")
    if any(target == d.rstrip(".") or target.startswith(d) for d in DENIED_TARGETS):
        raise refuse("it can fetch or run arbitrary code")
    parts = target.split(".")
    if any(part.startswith("__") for part in parts):
        raise refuse("dunder attributes are never targets")
    module_name, _, attr = target.rpartition(".")
    obj: Any = None
    # Walk back along the dotted path so that nested names (torch.optim.lr_scheduler.StepLR) resolve.
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
                if inspect.ismodule(obj) and not _under(obj.__name__, allowed):
                    raise refuse(f"it passes through module {obj.__name__!r}")
        except AttributeError:
            obj = None
        break
    if obj is None or not callable(obj):
        raise DgtrainError(f"{key}={target!r}: no callable named {attr!r} in module {module_name!r}.")
    defined_in = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "")
    if not _under(str(defined_in), allowed):
        raise refuse(f"it is defined in module {defined_in!r}")
    return obj


def allowed_prefixes(cfg: DictConfig) -> tuple[str, ...]:
    extra = tuple(str(p) for p in (cfg.get("allowed_targets") or []))
    return DEFAULT_ALLOWED_TARGETS + extra


def build(
    node: DictConfig,
    *args: Any,
    allowed: tuple[str, ...],
    key: str,
    exclude: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """Call `node._target_` with the node's other keys; `_partial_: true` returns a partial."""
    params = OmegaConf.to_container(node, resolve=True)
    assert isinstance(params, dict)
    target = params.pop("_target_", None)
    partial = bool(params.pop("_partial_", False))
    for k in exclude:
        params.pop(k, None)
    fn = locate(target, allowed, key=f"{key}._target_")
    params.update(kwargs)
    if partial:
        return functools.partial(fn, *args, **params)
    try:
        return fn(*args, **params)
    except TypeError as e:
        raise DgtrainError(f"{key}: calling {target} failed: {e}. Check the keys under `{key}`.") from e


def find_targets(node: Any, path: str = "") -> list[tuple[str, str]]:
    """Every (key path, `_target_` value) in a config tree."""
    found: list[tuple[str, str]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{path}.{k}" if path else str(k)
            if k == "_target_":
                found.append((sub, v))
            else:
                found.extend(find_targets(v, sub))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found.extend(find_targets(v, f"{path}[{i}]"))
    return found
