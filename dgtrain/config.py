"""The config schema (typed fields fail at compose time), cross-field validation, and safe `_target_` calls.

Only the parts a user swaps (model, data, loss, optimizer, scheduler, loggers) are `_target_` nodes;
loop settings are typed dataclass fields so that `trainer.max_steps=ten` fails before anything runs.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import sys
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from dgtrain.errors import DgtrainError

# Keys of a data node that describe it rather than being arguments of its builder.
DATA_META_KEYS = ("task", "batch_size", "num_workers", "device_resident", "pin_memory")
# Keys of the model node dgtrain reads itself (dgtrain/finetune.py), and of the optimizer node
# (dgtrain/optim.py: parameter groups): never arguments of the `_target_`.
MODEL_META_KEYS = ("freeze",)
OPTIMIZER_META_KEYS = ("group_decay", "lr_groups", "fused")
META_KEYS = {"data": DATA_META_KEYS, "model": MODEL_META_KEYS, "optimizer": OPTIMIZER_META_KEYS}


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


class Strategy(str, Enum):
    auto = "auto"  # ddp when there is more than one process
    ddp = "ddp"  # DistributedDataParallel: every rank holds the whole model
    fsdp = "fsdp"  # FSDP2 (fully_shard): parameters, gradients and optimizer state sharded over ranks


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
    # Language models: log a generated text sample (console, metrics.jsonl, W&B table) every N steps.
    sample_every: int | None = None
    # A non-finite loss or gradient: fail (stop before the optimizer step) | skip (drop that update).
    nonfinite: NonFinite = NonFinite.fail
    # CUDA: fp32 matrix products and convolutions on TF32 tensor cores. auto: with precision=fp32 |
    # true | false. Never on CPU.
    tf32: str = "auto"
    # With nonfinite=skip: fail (exit 3) once more updates than this were skipped, since a run that skips
    # them all "completes" with untrained weights. null: 10% of the run's steps (at least 1).
    max_skipped: int | None = None
    # Debug modes, as in Lightning. fast_dev_run: one train and one val batch, nothing written but the log.
    fast_dev_run: bool = False
    # Train (and validate) on the same first N training batches, unshuffled: can the model fit them?
    overfit_batches: int | None = None
    # Batches per epoch: a whole number >= 1, or a fraction (0 < x < 1) of them; null: all.
    limit_train_batches: float | None = None
    limit_val_batches: float | None = None
    # Processes on this node: N starts N workers through torch.distributed.run's API; auto: one per visible
    # GPU (1 on CPU); null: this one process (or whatever torchrun started). docs/distributed.md
    devices: Any = None
    # With more than one process: auto (= ddp) | ddp | fsdp (FSDP2, mixed precision from `precision`).
    strategy: Strategy = Strategy.auto
    # Seconds a collective waits for a silent peer before the process group gives up (then every rank exits).
    dist_timeout_s: float = 300.0
    # After a completed run, score the data's held-out test set once (test/acc, test/loss in metrics.jsonl
    # and summary.json); it selects nothing. Only data with a test set (mnist, cifar10, image_folder).
    test_at_end: bool = False
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
    # Keep the K checkpoints with the best monitored value in <dir>/top_k/ (null: off).
    save_top_k: int | None = None
    # The metric save_top_k ranks by (null: the task's monitor) and its direction (null: the metric's own).
    monitor: str | None = None
    mode: str | None = None


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
    callbacks: Any = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # null: start fresh | auto: the newest valid checkpoint of the run dir (fresh if none) | PATH: that file.
    resume: str | None = None
    # Start from these weights (a run dir, a .pt checkpoint or a .safetensors file): weights only, by name.
    init_from: str | None = None
    # false: tensors whose name or shape does not fit are skipped (and listed) instead of failing.
    init_from_strict: bool = True
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    # auto | cpu | cuda | cuda:N
    device: str = "auto"
    precision: Precision = Precision.fp32
    seed: int = 0
    # torch's intra-op CPU threads (torch.set_num_threads); null: torch's default (one per core).
    threads: int | None = None
    # torch.use_deterministic_algorithms(True), cuDNN deterministic, CUBLAS_WORKSPACE_CONFIG=:4096:8.
    deterministic: bool = False
    # Your own packages whose callables `_target_` may name (dgtrain's builders and torch's optimizer,
    # scheduler and nn classes are always allowed, by exact name).
    allowed_targets: list[str] = field(default_factory=list)
    smoke: SmokeConfig = field(default_factory=SmokeConfig)
    # Extra classification metrics (torchmetrics, on the device): top<k>, f1 (macro), confusion (a PNG).
    metrics: list[str] = field(default_factory=list)


def register_schema() -> None:
    ConfigStore.instance().store(name="dgtrain_schema", node=TrainConfig)


# --------------------------------------------------------------------------------------------------
# Safe construction of `_target_` nodes: an exact allow-list, never a prefix
#
# A config file, an override or a stored checkpoint/run dir names callables by string, so a prefix rule
# (`torch.`) admits `torch.utils.collect_env.run` (a shell) and `torch.serialization.load` (unpickling).
# dgtrain therefore calls only: its own builders (listed by name below), the optimizer classes of
# torch.optim, the scheduler classes of torch.optim.lr_scheduler and the module/loss classes of torch.nn,
# each named exactly; plus callables defined in the user's own packages named in `allowed_targets`.

# dgtrain's builders, the values its configs (configs/*/*.yaml) use.
DGTRAIN_TARGETS = frozenset(
    {
        "dgtrain.models.convnet.ConvNet",
        "dgtrain.models.linreg.LinearRegression",
        "dgtrain.models.mlp.MLP",
        "dgtrain.models.transformer.Transformer",
        "dgtrain.data.regression.synthetic_linear",
        "dgtrain.data.regression.diabetes",
        "dgtrain.data.regression.csv",
        "dgtrain.data.images.synthetic_images",
        "dgtrain.data.images.digits",
        "dgtrain.data.images.mnist",
        "dgtrain.data.images.cifar10",
        "dgtrain.data.images.image_folder",
        "dgtrain.data.sequences.seq2seq_synthetic",
        "dgtrain.data.sequences.text",
        "dgtrain.data.tokens.tokens",
        "dgtrain.losses.mse",
        "dgtrain.losses.cross_entropy",
        "dgtrain.losses.auto",
        "dgtrain.optim.constant",
        "dgtrain.optim.cosine",
        "dgtrain.optim.step",
        "dgtrain.loggers.console.ConsoleLogger",
        "dgtrain.loggers.tensorboard.TensorBoardLogger",
        "dgtrain.loggers.wandb.WandbLogger",
        "dgtrain.loggers.csv.CsvLogger",
        "dgtrain.loggers.mlflow.MlflowLogger",
        "dgtrain.callbacks.EarlyStopping",
        "dgtrain.callbacks.EMA",
    }
)

# Packages `allowed_targets` may not name: they hold callables that run commands, load pickles or
# import anything (the standard library: os, subprocess, pickle, builtins, ...), or they are covered by
# the exact list above and must not be widened to a prefix.
PROTECTED_PACKAGES = frozenset(sys.stdlib_module_names) | {
    "torch",
    "dgtrain",
    "hydra",
    "omegaconf",
    "numpy",
    "hydra_plugins",
}


@functools.lru_cache(maxsize=1)
def torch_targets() -> dict[str, type]:
    """Every torch class a `_target_` may name: exact name -> class. Both the public spelling
    (`torch.optim.AdamW`, `torch.nn.MSELoss`) and the defining module's (`torch.optim.adamw.AdamW`)."""
    import torch
    from torch.optim.lr_scheduler import LRScheduler

    found: dict[str, type] = {}
    spaces = (
        (torch.optim, torch.optim.Optimizer, "torch.optim"),
        (torch.optim.lr_scheduler, LRScheduler, "torch.optim.lr_scheduler"),
        (torch.nn, torch.nn.Module, "torch.nn.modules"),
    )
    for namespace, base, home in spaces:
        for name in dir(namespace):
            obj = getattr(namespace, name)
            if name.startswith("_") or not isinstance(obj, type) or not issubclass(obj, base) or obj is base:
                continue
            if not (obj.__module__ == home or obj.__module__.startswith(home + ".")):
                continue  # e.g. torch.nn.DataParallel (torch.nn.parallel): not a plain module class
            found[f"{namespace.__name__}.{name}"] = obj
            found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return found


def user_packages(entries: Any) -> tuple[str, ...]:
    """`allowed_targets` entries as package names (`mypkg.` -> `mypkg`). Protected packages are dropped
    here (a stored config or `--allow-target` cannot widen the list to them); `allowed_targets_problems`
    reports them for a live config."""
    out = []
    for e in entries or ():
        name = str(e).strip().rstrip(".")
        if name and name.split(".")[0] not in PROTECTED_PACKAGES:
            out.append(name)
    return tuple(out)


def allowed_targets_problems(entries: Any, option: str | None = None) -> list[str]:
    """Entries naming a protected package, each with its message: for the `allowed_targets` key, or for a
    command's `option` (`--allow-target`)."""
    bad = [str(e) for e in entries or () if str(e).strip().rstrip(".").split(".")[0] in PROTECTED_PACKAGES]
    example = f"{option} mypkg" if option else "allowed_targets=[mypkg]"
    return [
        f"{f'{option} {b}' if option else f'allowed_targets={b!r}'}: {b.rstrip('.')} cannot be allowed as a "
        "whole (it holds callables that run commands or load pickles, or dgtrain already admits its safe "
        f"classes by name). List only your own package, for example {example}."
        for b in bad
    ]


def _under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _import_attr(target: str) -> Any:
    module_name, _, attr = target.rpartition(".")
    return getattr(importlib.import_module(module_name), attr)


def locate(target: Any, packages: tuple[str, ...] = (), key: str = "_target_") -> Any:
    """The callable `target` names, if the allow-list admits it; a DgtrainError naming `key` otherwise.

    `packages` are the user's own (from `allowed_targets`): a name under one of them resolves only to a
    callable defined in that package, and the walk to it may pass through none of other modules, so a
    re-export (`mypkg.os.system`, `mypkg.run` = subprocess.run) cannot smuggle in a forbidden callable."""
    packages = user_packages(packages)

    def refuse(why: str) -> DgtrainError:
        return DgtrainError(
            f"{key}={target!r} is not allowed: {why}. dgtrain calls only its own builders, torch.optim "
            "optimizers, torch.optim.lr_scheduler schedulers and torch.nn modules and losses, each named "
            "exactly (`dgtrain ls` lists the options). If this callable is your own trusted code, add its "
            "package to `allowed_targets` (for example allowed_targets=[mypkg])."
        )

    if not isinstance(target, str) or not target:
        raise refuse("it is not a dotted name")
    if any(part.startswith("__") for part in target.split(".")):
        raise refuse("dunder attributes are never targets")
    if target in DGTRAIN_TARGETS:
        return _import_attr(target)
    if target == "torch" or target.startswith("torch."):
        obj = torch_targets().get(target)
        if obj is None:
            raise refuse("it is not one of the torch classes dgtrain admits")
        return obj
    if not _under(target, packages):
        raise refuse("it is not in dgtrain's allow-list")
    parts = target.split(".")
    obj: Any = None
    # Walk back along the dotted path so that nested names (mypkg.models.Net.from_config) resolve.
    for i in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for name in parts[i:]:
                obj = getattr(obj, name)
                if inspect.ismodule(obj) and not _under(obj.__name__, packages):
                    raise refuse(f"it passes through module {obj.__name__!r}")
        except AttributeError:
            obj = None
        break
    if obj is None or not callable(obj):
        module_name, _, attr = target.rpartition(".")
        raise DgtrainError(f"{key}={target!r}: no callable named {attr!r} in module {module_name!r}.")
    defined_in = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "")
    if not _under(str(defined_in), packages):
        raise refuse(f"it is defined in module {defined_in!r}, outside {', '.join(packages)}")
    return obj


def allowed_prefixes(cfg: DictConfig) -> tuple[str, ...]:
    """The user packages `cfg.allowed_targets` names (protected ones left out)."""
    return user_packages(cfg.get("allowed_targets"))


# Hydra's special keys. dgtrain follows `hydra.utils.instantiate` (1.3) with two differences: every
# `_target_`, nested ones included, must pass `locate`'s allow-list, and arguments arrive as plain dicts
# and lists unless a node says `_convert_: none` (Hydra's default passes OmegaConf containers).
SPECIAL_KEYS = ("_target_", "_partial_", "_args_", "_convert_", "_recursive_")
CONVERT_MODES = ("none", "partial", "object", "all")


def _convert_mode(params: dict, key: str, inherited: str) -> str:
    mode = str(params.pop("_convert_", inherited)).lower()
    if mode not in CONVERT_MODES:
        raise DgtrainError(f"{key}._convert_={mode!r}: expected one of {', '.join(CONVERT_MODES)}.")
    return mode


def _instantiate(value: Any, allowed: tuple[str, ...], key: str, convert: str, recursive: bool) -> Any:
    """Build every `_target_` node inside `value` (children before parents, as Hydra does)."""
    if not recursive:  # `_recursive_: false`: nested nodes reach the callable as config
        return OmegaConf.create(value) if convert == "none" and isinstance(value, (dict, list)) else value
    if isinstance(value, dict):
        value = dict(value)
        convert = _convert_mode(value, key, convert)
        if "_target_" in value:
            return _call(value, (), {}, allowed, key, convert, recursive)
        value = {k: _instantiate(v, allowed, f"{key}.{k}", convert, recursive) for k, v in value.items()}
        return OmegaConf.create(value) if convert == "none" else value
    if isinstance(value, list):
        value = [_instantiate(v, allowed, f"{key}[{i}]", convert, recursive) for i, v in enumerate(value)]
        return OmegaConf.create(value) if convert == "none" and _plain(value) else value
    return value


def _plain(value: Any) -> bool:
    """OmegaConf can wrap only plain data; a list holding built objects stays a list."""
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    if isinstance(value, list):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (str, int, float, bool))


def _call(
    params: dict,
    args: tuple,
    kwargs: dict,
    allowed: tuple[str, ...],
    key: str,
    convert: str,
    recursive: bool,
    exclude: tuple[str, ...] = (),
) -> Any:
    target = params.pop("_target_", None)
    partial = bool(params.pop("_partial_", False))
    recursive = bool(params.pop("_recursive_", recursive))
    convert = _convert_mode(params, key, convert)
    pos = params.pop("_args_", [])
    for k in exclude:
        params.pop(k, None)
    fn = locate(target, allowed, key=f"{key}._target_")
    if not isinstance(pos, list):
        raise DgtrainError(f"{key}._args_ must be a list of positional arguments, got {pos!r}.")
    pos = [_instantiate(v, allowed, f"{key}._args_[{i}]", convert, recursive) for i, v in enumerate(pos)]
    params = {k: _instantiate(v, allowed, f"{key}.{k}", convert, recursive) for k, v in params.items()}
    params.update(kwargs)
    if partial:
        return functools.partial(fn, *args, *pos, **params)
    try:
        return fn(*args, *pos, **params)
    except TypeError as e:
        raise DgtrainError(f"{key}: calling {target} failed: {e}. Check the keys under `{key}`.") from e


def build(
    node: DictConfig | dict,
    *args: Any,
    allowed: tuple[str, ...],
    key: str,
    exclude: tuple[str, ...] = (),
    **kwargs: Any,
) -> Any:
    """Call `node._target_` with the node's other keys, as Hydra's `instantiate` would: nested `_target_`
    nodes are built first (`_recursive_: false` passes them as config), `_args_` are positional,
    `_partial_: true` returns a `functools.partial`, and `_convert_` picks the container type."""
    params = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    assert isinstance(params, dict)
    return _call(params, args, kwargs, allowed, key, "all", True, exclude)


def build_children(
    node: DictConfig | dict, allowed: tuple[str, ...], key: str, exclude: tuple[str, ...] = ()
) -> tuple[Any, dict[str, Any]]:
    """The located `_target_` of `node` and its arguments with nested `_target_` nodes built, for callers
    that choose how to call the target (models: `from_data` or the constructor)."""
    params = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    assert isinstance(params, dict)
    target = params.pop("_target_", None)
    for k in exclude:
        params.pop(k, None)
    recursive = bool(params.pop("_recursive_", True))
    convert = _convert_mode(params, key, "all")
    if params.pop("_partial_", False) or params.pop("_args_", None):
        raise DgtrainError(f"{key}: `_partial_` and `_args_` are not supported at the top of `{key}`.")
    fn = locate(target, allowed, key=f"{key}._target_")
    return fn, {k: _instantiate(v, allowed, f"{key}.{k}", convert, recursive) for k, v in params.items()}


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


# --------------------------------------------------------------------------------------------------
# Strict keys: Hydra's `+key=value` adds keys that nothing reads, so the composed config is checked
# against the schema dataclasses and each `_target_`'s signature before training.

# Typed sections and the dataclass that defines their keys.
SECTIONS = {
    "trainer": TrainerConfig,
    "sweep": SweepConfig,
    "checkpoint": CheckpointConfig,
    "telemetry": TelemetryConfig,
    "smoke": SmokeConfig,
}

# Arguments dgtrain passes itself (never from the config node), per `_target_` group.
INJECTED = {
    "model": ("info",),
    "data": ("seed",),
    "loss": ("task", "pad_id"),
    "optimizer": ("params",),
    "scheduler": ("optimizer", "total_steps"),
    "logger": ("run_dir", "resume_step"),
}

# Keys only some builders of a group take: what to say when the chosen one does not ({name}: its name).
NOT_FOR_EVERY_TARGET = {
    ("data", "pad_to_multiple"): (
        "data.pad_to_multiple applies to variable-length sequence data only (data=seq2seq_synthetic), "
        "whose batches change width; data {name} gives batches of one fixed shape, which compile to a "
        "static graph without padding. Remove data.pad_to_multiple."
    ),
}


def _unknown(key: str, bad: str, valid: list[str], nested: list[str] = ()) -> str:
    """The message for `bad`, unknown under `key`; `nested` (dotted keys one level down, for the top
    level) lets `+max_steps=5` be pointed at trainer.max_steps."""
    import difflib

    close = difflib.get_close_matches(bad, valid, n=1)
    full = f"{key}.{bad}" if key else bad
    hint = f" Did you mean {key + '.' if key else ''}{close[0]}?" if close else ""
    if not close and nested:
        leaf = {k: k.rsplit(".", 1)[-1] for k in nested}
        same = [k for k, name in leaf.items() if name == bad]
        near = same or [
            k
            for name in difflib.get_close_matches(bad, list(leaf.values()), n=1)
            for k in nested
            if leaf[k] == name
        ]
        hint = f" Did you mean {' or '.join(near[:2])}?" if near else ""
    where = f"under {key}" if key else "at the top level"
    return (
        f"{full} is not a setting dgtrain knows, so it would be ignored.{hint} "
        f"Valid keys {where}: {', '.join(valid)}."
    )


def target_parameters(fn: Any) -> tuple[list[str], bool] | None:
    """(the keyword arguments `fn` takes, whether it takes **kwargs); None when it has no signature.
    A class with a `from_data` factory (dgtrain models) is configured through that factory."""
    fn = getattr(fn, "from_data", fn)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = [
        n
        for n, p in sig.parameters.items()
        if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    ]
    return names, any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())


def unknown_key_problems(cfg: DictConfig, packages: tuple[str, ...]) -> list[str]:
    """Keys no schema field and no `_target_` argument accepts (`+trainer.max_stepz=5`), each named with
    the valid keys. Targets the allow-list refuses are reported elsewhere and skipped here."""
    from dataclasses import fields

    out: list[str] = []
    known = [f.name for f in fields(TrainConfig)]
    nested = [f"{section}.{f.name}" for section, schema in SECTIONS.items() for f in fields(schema)]
    for group in ("model", "data", "optimizer", "scheduler", "loss"):
        node = cfg.get(group)
        if isinstance(node, DictConfig):
            nested += [f"{group}.{k}" for k in node if k not in SPECIAL_KEYS]
    for k in cfg:
        if k not in known:
            out.append(_unknown("", str(k), known, nested))
    for section, schema in SECTIONS.items():
        node = cfg.get(section)
        if isinstance(node, DictConfig):
            valid = [f.name for f in fields(schema)]
            out += [_unknown(section, str(k), valid) for k in node if k not in valid]

    def check_node(key: str, node: Any, group: str) -> None:
        if not isinstance(node, DictConfig) or "_target_" not in node:
            return
        try:
            fn = locate(node._target_, packages, key=f"{key}._target_")
        except DgtrainError:
            return
        found = target_parameters(fn)
        if found is None or found[1]:
            return
        names, _ = found
        valid = [n for n in names if n not in INJECTED.get(group, ()) and n != "self"]
        meta = META_KEYS.get(group, ())
        for k in node:
            if k not in SPECIAL_KEYS and k not in meta and k not in valid:
                why = NOT_FOR_EVERY_TARGET.get((group, str(k)))
                name = str(node._target_).rsplit(".", 1)[-1]
                listed = [*valid, *(m for m in meta if m not in valid)]  # Adam's own `fused` once
                out.append(why.format(name=name) if why else _unknown(key, str(k), listed))

    for group in ("model", "data", "loss", "optimizer", "scheduler"):
        check_node(group, cfg.get(group), group)
    for name, node in (cfg.get("logger") or {}).items():
        check_node(f"logger.{name}", node, "logger")
    return out
