"""The training loop. Read `fit` top to bottom: it is the whole of what happens in a run.

Per optimizer step: `grad_accum_steps` micro-batches each build their graph on the device (forward),
release it (backward), then clip, step the optimizer and the schedule. Losses stay on the device;
they reach the host only on logging steps, so the loop never waits for the accelerator in between.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf, open_dict

from dgtrain import __version__, finetune
from dgtrain import checkpoint as ckpt_io
from dgtrain.callbacks import CallbackList, FitContext, build_callbacks
from dgtrain.compile import compile_model
from dgtrain.config import DATA_META_KEYS, MODEL_META_KEYS, allowed_prefixes, build, build_children, locate
from dgtrain.data import DataBundle, flag, keep_on_device, limit_batches, make_loader
from dgtrain.distributed import Dist, StopSync, sync_context, unwrap, wrap_model
from dgtrain.errors import DgtrainError
from dgtrain.evaluate import evaluate_split
from dgtrain.faults import (
    nonfinite_check,
    nonfinite_error,
    skip_budget,
    skip_update,
    slurm_requeue,
    too_many_skipped,
)
from dgtrain.generation import lm_sample
from dgtrain.loggers import JsonlLogger, sink_parameters
from dgtrain.loggers.console import ConsoleLogger
from dgtrain.loggers.plots import PlotLogger
from dgtrain.losses import build_loss
from dgtrain.memory import rss_peak_mb
from dgtrain.optim import grad_clearer, make_optimizer, step_function
from dgtrain.runs import write_data_info
from dgtrain.tasks import HIGHER_IS_BETTER, Task, make_task, no_reduce
from dgtrain.telemetry import NO_CONTEXT, Telemetry
from dgtrain.validation import check_config, check_logger_packages

log = logging.getLogger("dgtrain")


# ----------------------------------------------------------------------------------------- set-up


def resolve_device(spec: str) -> torch.device:
    spec = str(spec)
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DgtrainError(
                f"device={spec}: CUDA is not available (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda or 'none'}). Use device=cpu or device=auto."
            )
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DgtrainError(
                f"device={spec}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})."
            )
        return dev
    raise DgtrainError(f"device={spec!r}: expected auto, cpu, cuda or cuda:N.")


def precision_of(cfg: DictConfig) -> str:
    p = cfg.precision
    return str(getattr(p, "value", p))


def _no_autocast():
    return NO_CONTEXT


def autocast_for(device: torch.device, precision: str):
    """A zero-argument context factory: autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return _no_autocast
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DgtrainError(
            f"precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
            "use precision=fp16 or precision=fp32."
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def use_tf32(mode: Any, device: torch.device, precision: str) -> bool:
    """`trainer.tf32`: fp32 matrix products and convolutions on TF32 tensor cores (about 10 bits of
    mantissa in the products, fp32 accumulation). auto: on CUDA with precision=fp32 (bf16/fp16 autocast
    runs its products in half precision anyway); true: on CUDA whatever the precision; never on CPU."""
    mode = flag(mode)
    return device.type == "cuda" and (mode == "true" or (mode == "auto" and precision == "fp32"))


@contextlib.contextmanager
def tf32(mode: Any, device: torch.device, precision: str):
    """Set torch's fp32 matmul precision and cuDNN's TF32 switch for a run on CUDA, then put them back
    (process-wide settings: a sweep's next trial starts from the same ones). Nothing on CPU."""
    if device.type != "cuda":
        yield
        return
    enabled = use_tf32(mode, device, precision)
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    torch.set_float32_matmul_precision("high" if enabled else "highest")
    torch.backends.cudnn.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cudnn.allow_tf32 = before[1]


def configure_torch(cfg: DictConfig):
    """`threads=` and `deterministic=`: process-wide torch settings, applied before anything is built.
    Returns the function that puts them back after the run: a sweep's next trial (same process) starts
    from the settings before this one (`-m deterministic=true,false` ran both trials deterministic)."""
    before = (
        torch.get_num_threads(),
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )

    def restore() -> None:
        threads, det, warn_only, cudnn_det, benchmark, cublas = before
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det, warn_only=warn_only)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_det, benchmark
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)

    if cfg.get("threads") is not None:
        torch.set_num_threads(int(cfg.threads))
    if cfg.get("deterministic"):
        # cuBLAS reads this when it creates its handle (the first matmul on CUDA); without it,
        # deterministic mode makes CUDA matmuls raise. ":4096:8" is the setting NVIDIA documents.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return restore


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class Setup:
    """Everything a run (or `dgtrain graph` / `eval`) builds from a config."""

    device: torch.device
    data: DataBundle
    task: Task
    model: torch.nn.Module
    loss_fn: torch.nn.Module
    train_loader: Any
    val_loader: Any


def check_config_sizes(params: dict[str, Any], info, data_name: str) -> None:
    """A model without `from_data` (docs/extending.md) takes `num_classes` and `in_features` from the
    config; a value the data contradicts fails here, naming the key, not at the first step as an index or
    shape error deep in torch."""
    wrong = []
    n = params.get("num_classes")
    if info.task == "classification" and info.num_classes and type(n) is int and n != info.num_classes:
        have = f"data {data_name} has {info.num_classes} classes"
        wrong.append(f"model.num_classes={n}, but {have}: set model.num_classes={info.num_classes}")
    n = params.get("in_features")
    if len(info.in_shape) == 1 and type(n) is int and n != info.in_shape[0]:
        have = f"data {data_name} has {info.in_shape[0]} features per example"
        wrong.append(f"model.in_features={n}, but {have}: set model.in_features={info.in_shape[0]}")
    if wrong:
        raise DgtrainError(f"{'; '.join(wrong)} (a model without from_data takes its sizes from the config).")


def build_model(cfg: DictConfig, info, allowed: tuple[str, ...]) -> torch.nn.Module:
    """`model._target_` names a class (or a function returning a module). dgtrain models size themselves
    from the data (`from_data(info, **params)`); any other class is called with the node's keys, so a
    plain `nn.Module` takes its sizes from the config. Nested `_target_` nodes (a backbone under
    `model.net`, as in lightning-hydra-template) are built first, as Hydra's `instantiate` does."""
    cls, params = build_children(cfg.model, allowed, key="model", exclude=MODEL_META_KEYS)
    factory = getattr(cls, "from_data", None)
    if factory is None:  # every size from the config: the ones dgtrain can check against the data
        check_config_sizes(params, info, str(cfg.data.get("_target_", "")).rsplit(".", 1)[-1])
    try:
        model = factory(info, **params) if factory else cls(**params)
    except TypeError as e:
        raise DgtrainError(
            f"model: {e}. Check the keys under `model` (dgtrain ls shows each model's options; a model "
            "without `from_data` gets every size from the config)."
        ) from e
    if not isinstance(model, torch.nn.Module):
        raise DgtrainError(
            f"model._target_={cfg.model._target_} returned {type(model).__name__}, not a torch.nn.Module."
        )
    return model


def build_data(cfg: DictConfig, allowed: tuple[str, ...]) -> DataBundle:
    """`data._target_` returns a DataBundle; it gets the run's `seed`, and `data.task`, if it takes them."""
    import inspect

    fn = locate(cfg.data.get("_target_"), allowed, key="data._target_")
    try:
        takes = inspect.signature(fn).parameters
        wants_seed = "seed" in takes or any(p.kind is p.VAR_KEYWORD for p in takes.values())
    except (TypeError, ValueError):
        takes, wants_seed = {}, True
    extra = {"seed": cfg.seed} if wants_seed else {}
    if "task" in takes and cfg.data.get("task") is not None:  # data=csv: regression or classification
        extra["task"] = str(cfg.data.task)
    data = build(cfg.data, allowed=allowed, key="data", exclude=DATA_META_KEYS, **extra)
    if not isinstance(data, DataBundle):
        raise DgtrainError(
            f"data._target_={cfg.data._target_} returned {type(data).__name__}; a data function returns "
            "dgtrain.data.DataBundle(train, val, DataInfo(task=...)) (docs/extending.md)."
        )
    return data


def setup(cfg: DictConfig, device: torch.device | None = None, rank: int = 0, world: int = 1) -> Setup:
    allowed = allowed_prefixes(cfg)
    device = device or resolve_device(cfg.device)
    data = build_data(cfg, allowed)
    if cfg.trainer.get("test_at_end") and data.test is None:
        raise DgtrainError(
            f"trainer.test_at_end=true: data {cfg.data._target_.rsplit('.', 1)[-1]} has no held-out test set "
            "(mnist, cifar10 and image_folder with data.test_root have one). Its val split is all there is."
        )
    task = make_task(data.info.task, data.info.pad_id)
    task.configure_metrics([str(m) for m in cfg.get("metrics") or []], data.info.num_classes)
    torch.manual_seed(cfg.seed)  # model initialisation depends on the seed alone, not on data generation
    model = build_model(cfg, data.info, allowed).to(device)
    if hasattr(model, "for_device"):  # a model's own layout choice for the device (convnet: channels_last)
        model.for_device(device)
    loss_fn = build_loss(cfg.loss, allowed, data.info.task, data.info.pad_id)
    nw = int(cfg.data.get("num_workers", 0))
    bs = int(cfg.data.batch_size)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if device.type != "cpu" and keep_on_device(
        cfg.data.get("device_resident", "auto"), data, device, nw, free
    ):
        data = DataBundle(data.train.to(device), data.val.to(device), data.info)  # moved once
        log.info(
            f"data.device_resident: {(data.train.nbytes() + data.val.nbytes()) / 2**20:.1f} MB on {device}"
        )
    # batches that stay on the host are page-locked so that their copy to the GPU does not block
    pin = device.type == "cuda" and bool(cfg.data.get("pin_memory", True))
    # data.batch_size is per process: rank r of `world` loads its slice of each global batch
    train_loader = make_loader(
        data.train, bs, shuffle=True, seed=cfg.seed, num_workers=nw, pin_memory=pin, rank=rank, world=world
    )
    # evaluation is sharded the same way; the ranks' sums make the job's metrics (Dist.sum_)
    val_loader = make_loader(
        data.val, bs, shuffle=False, seed=cfg.seed, num_workers=nw, pin_memory=pin, rank=rank, world=world
    )
    return Setup(device, data, task, model, loss_fn, train_loader, val_loader)


def debug_modes(cfg: DictConfig, s: Setup) -> DictConfig:
    """Lightning's debug switches (trainer.fast_dev_run, overfit_batches, limit_*_batches): returns the
    config the run uses (fast_dev_run: one step, one val batch) and limits the loaders in place."""
    tc = cfg.trainer
    if tc.get("fast_dev_run"):
        cfg = cfg.copy()
        with open_dict(cfg):
            cfg.trainer.update(max_steps=1, grad_accum_steps=1, log_every=1, eval_every=None, eval_batches=1)
            cfg.checkpoint.update(every=None, save_top_k=None)
        log.info("trainer.fast_dev_run: one train batch and one val batch; nothing is written but the log")
    if tc.get("overfit_batches"):
        from torch.utils.data import Subset

        bs, n = int(cfg.data.batch_size), int(tc.overfit_batches)
        rank, world = s.train_loader.batch_sampler.rank, s.train_loader.batch_sampler.world
        # the first n global batches (every rank its slice of each, as in training)
        subset = Subset(s.data.train, range(min(len(s.data.train), n * bs * world)))
        s.train_loader = make_loader(subset, bs, shuffle=False, seed=cfg.seed, rank=rank, world=world)
        # scored on what it trains on
        s.val_loader = make_loader(subset, bs, shuffle=False, seed=cfg.seed, rank=rank, world=world)
        log.info(f"trainer.overfit_batches={n}: training and validating on the same {len(subset)} examples")
    limit_batches(s.train_loader, tc.get("limit_train_batches"))
    limit_batches(s.val_loader, 1 if tc.get("fast_dev_run") else tc.get("limit_val_batches"))
    return cfg


class StopRequest:
    """SIGTERM / SIGINT ask the loop to stop after the current optimizer step (never mid-step), so the
    loggers, and anything else that runs on the way out, see a consistent state. A second signal
    falls back to the default behaviour. Inside a SLURM job, SIGUSR1 (the preemption notice of
    `sbatch --signal=USR1@...`) stops the same way and the loop then requeues the job."""

    EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130, "SIGUSR1": 138}  # 128 + signal number (Linux)

    def __init__(self, sync: StopSync | None = None):
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}
        self.sync, self._local = sync, None  # several processes: the ranks agree at a step boundary (poll)

    def __enter__(self) -> StopRequest:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            import os

            sigs = [signal.SIGTERM, signal.SIGINT] + (
                [signal.SIGUSR1] if os.environ.get("SLURM_JOB_ID") else []
            )
            for sig in sigs:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        import signal

        name = signal.Signals(signum).name
        if self.sync is None:
            self.signal = name
        else:
            self._local = self._local or name
        for sig, handler in self._previous.items():  # a second Ctrl-C / SIGTERM is not ignored
            signal.signal(sig, handler)

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def poll(self) -> None:
        """Step boundary: with several processes, `signal` becomes the signal some rank received (the same
        on every rank, at the same step); alone, the handler has already set it."""
        if self.sync is not None and self.signal is None:
            self.signal = self.sync(self._local)

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.signal or "", 1)


@dataclass
class LoopState:
    """The loop's own state, in one place. A checkpoint stores `state_dict()` under "loop" and resume
    calls `load_state_dict`; the model, optimizer, schedule and scaler keep their own states.

    The data position lives here (the batch stream moves it) and so does the log window: what the
    steps since the last logging step left on the device, brought to the host only on logging steps."""

    step: int = 0  # optimizer steps completed
    epoch: int = 0  # the epoch the next micro-batch comes from
    position: int = 0  # micro-batches of that epoch already drawn
    completed_epochs: int = 0  # epochs whose last micro-batch has been drawn
    last_eval_epochs: int = 0  # completed_epochs at the last evaluation (for end-of-epoch evaluation)
    skipped_steps: int = 0  # updates trainer.nonfinite=skip dropped, as of the last read of the guard
    last_finite: list | None = None  # [step, loss]: the newest finite loss logged (for the fail message)
    best: dict[str, dict[str, float]] = field(default_factory=dict)  # metric -> {"value", "step"}
    final: dict[str, float] = field(default_factory=dict)  # the latest value of every metric
    peak_cuda: float | None = None
    wall_s: float = 0.0  # wall time of this run's processes up to the latest checkpoint (summary.json)
    global_batch: int = (
        0  # data.batch_size x processes: what `position` counts (resume on another world size)
    )
    # -- the log window
    losses: list[torch.Tensor] = field(default_factory=list)  # per step, 0-d on the device
    unread: list = field(default_factory=list)  # per step, the guard's flag not yet counted (0-d or float)
    samples: int = 0
    tokens: int = 0  # token counts the host knows from shapes (language models)
    device_tokens: torch.Tensor | None = None  # token counts only the device knows (seq2seq: non-pad)
    counts_tokens: bool = False  # the task counts tokens (perf/tokens_per_s)

    def state_dict(self) -> dict[str, Any]:
        """Plain data for a weights_only checkpoint. Call after the guard was read (`unread` empty)."""
        assert not self.unread, "read the non-finite guard before saving"
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        del d["losses"], d["unread"], d["device_tokens"]
        d["pending_losses"] = torch.stack(self.losses).tolist() if self.losses else []
        d["tokens"] = self.tokens + (int(self.device_tokens) if self.device_tokens is not None else 0)
        return d

    def load_state_dict(self, d: dict[str, Any], device: torch.device, log_every: int) -> None:
        for f in fields(self):
            if f.name in d and f.name not in ("losses", "unread", "device_tokens"):
                setattr(self, f.name, d[f.name])
        pending = d.get("pending_losses", [])
        pending = pending.tolist() if torch.is_tensor(pending) else list(pending)  # format 1: a tensor
        # A resumed run with a smaller trainer.log_every keeps the newest losses that fit its window.
        pending = pending[len(pending) - min(len(pending), log_every - 1) :]
        self.losses = [torch.tensor(v, dtype=torch.float32, device=device) for v in pending]
        self.last_finite = list(self.last_finite) if self.last_finite is not None else None


class BatchStream:
    """Micro-batches across epoch boundaries, on the device; moves the data position in a LoopState."""

    def __init__(self, loader, device: torch.device, state: LoopState | None = None):
        self.loader, self.device = loader, device
        self.state = state if state is not None else LoopState()
        self._it = None
        self._n = 0  # batches per epoch, read when an epoch's iterator starts (limit_*_batches set it)
        # device-resident data (and any data on the CPU when training there) needs no copy per batch
        self.move = getattr(getattr(loader, "dataset", None), "device", None) != device

    def seek(self, epoch: int, position: int, completed_epochs: int) -> None:
        """Continue at batch `position` of `epoch` (resume). The iterator starts here, so the random draw a
        DataLoader makes when it starts comes before the caller restores the saved RNG states."""
        st = self.state
        st.epoch, st.position, st.completed_epochs = epoch, position, completed_epochs
        self._start()

    def _start(self) -> None:
        st = self.state
        self.loader.batch_sampler.set_epoch(st.epoch, st.position)
        self._it, self._n = iter(self.loader), len(self.loader)

    def __next__(self):
        st = self.state
        if self._it is None:
            self._start()
        try:
            batch = next(self._it)
        except StopIteration:
            st.epoch, st.position, self._it = st.epoch + 1, 0, None
            return next(self)
        st.position += 1
        if st.position == self._n:
            st.completed_epochs = st.epoch + 1
        return tuple(t.to(self.device, non_blocking=True) for t in batch) if self.move else batch


def to_device(batches, device: torch.device):
    for batch in batches:
        yield tuple(t.to(device, non_blocking=True) for t in batch)


def evaluate(s: Setup, autocast, max_batches: int | None, reduce=no_reduce) -> dict[str, float]:
    """The task's metrics on `s.val_loader` (at most `max_batches` batches). `reduce`: several processes,
    each scoring its shard of the split, combine their sums (`Dist.sum_`)."""
    s.model.eval()
    try:
        batches = to_device(itertools.islice(s.val_loader, max_batches), s.device)
        return s.task.evaluate(s.model, batches, s.loss_fn, autocast, reduce=reduce)
    finally:
        s.model.train()


# ------------------------------------------------------------------------------------------ the run


@dataclass
class TrainResult:
    summary: dict[str, Any]
    model: torch.nn.Module
    setup: Setup
    history: list[dict[str, Any]] = field(default_factory=list)
    exit_code: int = 0  # 143 after SIGTERM, 130 after SIGINT

    @property
    def objective(self) -> float | None:
        return self.summary["monitor"]["value"]


def steps_skip_on_device(optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler) -> bool:
    """Whether the optimizer drops an update itself when handed `found_inf` (torch's fused Adam, AdamW,
    SGD and Adagrad, as AMP's GradScaler uses them), so the guard's flag never has to reach the host.
    With fp16 the GradScaler owns that hand-over, so the loop reads the loss flag on the host instead."""
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and not scaler.is_enabled()


class Loop:
    """The run's objects, its `LoopState`, and the pieces `fit` calls: one optimizer step, reading the
    non-finite guard, the train metrics of a log window, evaluation, recording, checkpoint state."""

    def __init__(self, cfg: DictConfig, s: Setup, precision: str, run_dir: Path, dist: Dist | None = None):
        self.s, self.run_dir = s, run_dir
        self.dist = d = dist or Dist()  # several processes: this rank's place (dgtrain/distributed.py)
        # DDP / FSDP2 wrap the model before the optimizer sees its parameters; s.model stays the user's
        self.model, self.task, self.device = wrap_model(s.model, d, s.device, precision), s.task, s.device
        self.autocast = autocast_for(s.device, "fp32" if d.sharded else precision)  # FSDP: its own policy
        self.state = LoopState(
            global_batch=s.train_loader.batch_sampler.global_batch,
            counts_tokens=type(s.task).units is not Task.units,  # sequence tasks count their tokens
        )
        tc = cfg.trainer
        self.accum = int(tc.grad_accum_steps)
        # max_epochs: every batch of each epoch, rounded up to a whole optimizer step (the micro-batch
        # stream runs on across epoch boundaries, so a partial step takes the next epoch's first batches)
        epochs_steps = math.ceil(int(tc.max_epochs) * len(s.train_loader) / self.accum)
        self.max_steps = int(tc.max_steps) if tc.max_steps else max(1, epochs_steps)
        self.log_every = int(tc.log_every)
        # read once: an OmegaConf attribute costs tens of microseconds, too much for every step
        self.clip = float(tc.clip_grad_norm) if tc.clip_grad_norm else None
        self.precision = precision  # the non-finite messages' advice
        self.eval_batches = tc.eval_batches
        allowed = allowed_prefixes(cfg)
        self.optimizer = make_optimizer(cfg, self.model, allowed, s.device)  # no decay on biases/norms
        # optimizer.step() and zero_grad(set_to_none=True), without torch's wrapping where it does nothing
        self.step_optimizer, self.clear_grads = step_function(self.optimizer), grad_clearer(self.optimizer)
        self.scheduler = build(cfg.scheduler, allowed=allowed, key="scheduler")(
            self.optimizer, total_steps=self.max_steps
        )
        # fp16 needs loss scaling; with enabled=False the scaler passes everything through unchanged.
        self.scaler = torch.amp.GradScaler(s.device.type, enabled=precision == "fp16")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.fail = str(getattr(tc.nonfinite, "value", tc.nonfinite)) == "fail"
        self.max_skipped = skip_budget(tc.get("max_skipped"), self.max_steps)  # nonfinite=skip: then fail
        self.on_device = steps_skip_on_device(self.optimizer, self.scaler)
        self.one = torch.ones((), device=s.device)  # the guard's unscale factor (values stay bit-identical)
        self.halted = torch.zeros((), device=s.device)  # nonfinite=fail: 1 from the first bad step on
        self.found = torch.zeros((), device=s.device)  # the guard's flag, reused when the host reads it
        self.stream = BatchStream(s.train_loader, s.device, self.state)
        self.augment = s.data.augment
        self.check_grads = not self.scaler.is_enabled()  # fp16: overflowing gradients are the scaler's
        self.sharded = d.sharded  # FSDP: gradients are DTensors, the guard checks their local shards
        # evaluation: each rank scores its shard, the sums are combined (alone: as they are)
        self.reduce = d.sum_
        # per-batch graph and memory figures; per step only host-side bookkeeping (docs/telemetry.md)
        self.telemetry = Telemetry(cfg.telemetry, self.model, s.device)
        self.compiled = compile_model(s.model, tc.compile, s.task.name)  # in place: plain state_dict keys
        self.criterion = self.compiled.criterion(s.loss_fn)  # the loss on float32 predictions (compiled too)
        self.config_plain = ckpt_io.plain_config(cfg)
        self.sinks: list = []
        self.history: list[dict[str, Any]] = []
        self.grad_norm: torch.Tensor | None = None
        # wall clock of the log window, and its time spent outside training steps (evaluation, text
        # samples, checkpoint writes), which perf/step_ms leaves out
        self.t_log, self.eval_s = time.perf_counter(), 0.0
        self.t_start, self.wall_before = time.perf_counter(), 0.0  # this process; earlier processes
        self.callbacks = CallbackList({})  # their states travel in checkpoints too

    def restore(self, resumed: dict[str, Any]) -> None:
        """Continue exactly where the checkpoint left off: the loop's state, objects, data position, RNG."""
        self.state.load_state_dict(resumed["loop"], self.device, self.log_every)
        ckpt_io.restore(
            resumed,
            model=unwrap(self.model),
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            stream=self.stream,
            rank=self.dist.rank,
        )
        self.telemetry.step = self.state.step  # a resumed run continues its sampling schedule
        self.wall_before = self.state.wall_s
        self.callbacks.load_state_dict(resumed.get("callbacks") or {})

    def wall_s(self) -> float:
        """Wall time of the whole run: earlier processes (up to their last checkpoint) and this one."""
        return self.wall_before + time.perf_counter() - self.t_start

    def train_step(self) -> None:
        """One optimizer step: forward and backward for each micro-batch (graphs freed as we go), clip,
        the non-finite guard, the update, the schedule. Queues device work and reads nothing back,
        except with an optimizer that cannot skip an update on the device (`steps_skip_on_device`).
        Runs every step: what it needs is looked up once, in `__init__` (docs/loop.md, "What a step costs")."""
        st, tel, accum = self.state, self.telemetry, self.accum
        step_loss = None
        for micro in range(accum):
            batch = next(self.stream)
            if self.augment is not None:  # on the device, training batches only (data.augment)
                batch = self.augment(batch)
            # several processes: gradients are reduced on the last micro-batch only
            with sync_context(self.model, micro == accum - 1) if self.dist.enabled else NO_CONTEXT:
                with tel.forward(batch), self.autocast():
                    loss = self.criterion(*self.task.outputs(self.model, batch))
                    if accum > 1:
                        loss = loss / accum
                tel.after_forward(loss)  # sampled steps: measure this batch's graph before backward
                self.scaler.scale(loss).backward()
                tel.after_backward()
            step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            st.samples += batch[0].shape[0]
            if st.counts_tokens:
                units = self.task.units(batch)
                if isinstance(units, int):
                    st.tokens += units
                elif units is not None:  # stays on the device: no copy, no wait
                    st.device_tokens = units if st.device_tokens is None else st.device_tokens + units
        if self.clip:
            self.scaler.unscale_(self.optimizer)
            self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        # ---- the non-finite guard (trainer.nonfinite), before the update. With fp16, overflowing scaled
        # gradients are the GradScaler's to skip, so only the loss is checked.
        if self.on_device:  # the fused optimizer drops the update itself: nothing crosses to the host
            found = nonfinite_check(step_loss, self.params, self.one, self.check_grads, sharded=self.sharded)
            found = self.dist.any_(found)
            found_inf = found  # several processes: every rank steps, or none (any_, on the device)
            if self.fail:  # skip every update from the first bad step on; reported at the next read
                found_inf = torch.maximum(self.halted, found, out=self.halted)
            self.optimizer.found_inf, self.optimizer.grad_scale = found_inf, None
            try:
                self.step_optimizer()
            finally:
                del self.optimizer.found_inf, self.optimizer.grad_scale
            st.unread.append(found)
        else:  # other optimizers: the host reads one flag per step (docs/checkpoints.md)
            found = nonfinite_check(
                step_loss, self.params, self.one, self.check_grads, out=self.found, sharded=self.sharded
            )
            bad = self.dist.any_(found).item()
            if bad:
                skip_update(self.scaler)
            elif self.scaler.is_enabled():
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.step_optimizer()
            st.unread.append(bad)
        st.losses.append(step_loss)
        self.clear_grads()
        self.scheduler.step()
        tel.after_step()
        st.step += 1
        if not self.on_device and bad:  # known on the host already: fail or count it now
            self.read_guard()

    def read_guard(self) -> None:
        """Bring the guard's flags since its last read to the host. nonfinite=skip: count the skipped
        steps. nonfinite=fail: log the window's steps before the first bad one, then raise naming it (no
        update was applied from that step on)."""
        st = self.state
        if not st.unread:
            return
        # device flags (fused optimizers), or floats the host has read already
        flags = torch.stack(st.unread).tolist() if torch.is_tensor(st.unread[0]) else st.unread
        st.unread = []
        if not self.fail:
            for i, bad in enumerate(flags):
                st.skipped_steps += int(bad)
                if st.skipped_steps > self.max_skipped:  # a run that keeps skipping is not training
                    raise too_many_skipped(
                        st.skipped_steps,
                        st.step - len(flags) + i + 1,
                        self.max_skipped,
                        self.clip,
                        self.precision,
                    )
            return
        if not any(flags):
            return
        first = flags.index(1.0)
        bad_step = st.step - len(flags) + first + 1
        kept = len(st.losses) - len(flags) + first  # the window's losses before the bad step
        bad_loss = float(st.losses[kept])
        st.losses, st.step = st.losses[:kept], bad_step - 1
        if st.losses:  # the completed steps since the last log are logged first
            metrics = self.train_metrics()
            metrics.pop("train/grad_norm", None)  # the norm of the failing step (or a later one), not theirs
            self.record(metrics)
        history = [] if st.last_finite is None else [st.last_finite]
        raise nonfinite_error(bad_step, bad_loss, history, self.clip, self.precision)

    def train_metrics(self) -> dict[str, Any]:
        """Bring the window's losses to the host (with the guard, the one sync), add speed and memory."""
        self.read_guard()
        st = self.state
        if self.device.type == "cpu" and not self.dist.enabled:  # host memory already: no stack to build
            losses = [t.item() for t in st.losses]
        else:  # one read of the whole window; several processes: the job's loss, the mean over ranks
            losses = self.dist.mean_(torch.stack(st.losses)).tolist()
        finite = [v for v in losses if math.isfinite(v)]  # the others: steps nonfinite=skip dropped
        if finite:  # the newest finite loss and its step (for the message of a later failure)
            i = len(losses) - 1 - next(i for i, v in enumerate(reversed(losses)) if math.isfinite(v))
            st.last_finite = [st.step - len(losses) + i + 1, losses[i]]
        dt = time.perf_counter() - self.t_log - self.eval_s
        metrics: dict[str, Any] = {
            "train/loss": sum(finite) / len(finite) if finite else math.nan,
            "train/lr": self.optimizer.param_groups[0]["lr"],
        }
        if not self.fail:
            metrics["train/skipped_steps"] = st.skipped_steps
        if self.clip:  # FSDP: a DTensor, whose full value every rank holds after the reduction
            metrics["train/grad_norm"] = float(
                getattr(self.grad_norm, "full_tensor", lambda: self.grad_norm)()
            )
        metrics["perf/step_ms"] = 1000.0 * dt / len(losses)
        metrics["perf/samples_per_s"] = st.samples / dt
        n_tokens = None
        if st.counts_tokens:
            n_tokens = st.tokens + (int(st.device_tokens) if st.device_tokens is not None else 0)
            metrics["perf/tokens_per_s"] = n_tokens / dt
        metrics.update(self.telemetry.metrics(dt, n_tokens))  # memory (peaks reset), graph, FLOPs, MFU
        metrics.update(self.compiled.metrics())  # perf/recompiles, perf/compile_s (trainer.compile only)
        metrics = self.dist.reduce_metrics(metrics)  # throughput summed over ranks, memory max over ranks
        st.losses, st.samples, st.tokens, st.device_tokens = [], 0, 0, None
        self.t_log, self.eval_s = time.perf_counter(), 0.0
        return metrics

    def evaluate(self) -> dict[str, float]:
        self.read_guard()  # never score (or report) a run that has already failed
        t_eval = time.perf_counter()
        metrics = evaluate(self.s, self.autocast, self.eval_batches, self.reduce)
        self.eval_s += time.perf_counter() - t_eval
        self.state.last_eval_epochs = self.state.completed_epochs
        return metrics

    def record(self, metrics: dict[str, Any]) -> None:
        st = self.state
        metrics = {"epoch": st.epoch, **metrics}
        for sink in self.sinks:
            sink.log_metrics(metrics, st.step)
        self.history.append({"step": st.step, **metrics})
        st.final.update({k: v for k, v in metrics.items() if k != "epoch"})
        if "mem/cuda_peak_mb" in metrics:
            st.peak_cuda = max(st.peak_cuda or 0.0, metrics["mem/cuda_peak_mb"])
        for k, v in metrics.items():
            if k in HIGHER_IS_BETTER and math.isfinite(v):
                better = (lambda a, b: a > b) if HIGHER_IS_BETTER[k] else (lambda a, b: a < b)
                if k not in st.best or better(v, st.best[k]["value"]):
                    st.best[k] = {"value": v, "step": st.step}

    def checkpoint(self) -> dict[str, Any]:
        """The objects' states, the loop's state and the RNG states: what exact resume needs."""
        self.read_guard()
        self.state.wall_s = self.wall_s()
        sharded = self.dist.sharded  # FSDP: the model's and optimizer's shards are written apart
        state = ckpt_io.make_state(
            model=None if sharded else unwrap(self.model),
            optimizer=None if sharded else self.optimizer,
            scheduler=self.scheduler,
            scaler=self.scaler,
            loop=self.state.state_dict(),
            config=self.config_plain,
            run_dir=self.run_dir,
            monitor=self.state.best.get(self.task.monitor),
        )
        if self.callbacks:
            state["callbacks"] = self.callbacks.state_dict()
        return state


@dataclass
class Run:
    """What `fit` opens before its first step and closes after its last: the loop and the run's files,
    sinks, callbacks and lock. Rank 0 alone writes files and logs (`sinks` is empty on the others)."""

    cfg: DictConfig  # the config the run uses (debug modes applied)
    loop: Loop
    checkpointer: ckpt_io.Checkpointer
    ctx: FitContext  # what callbacks see of the run
    sinks: list
    console: ConsoleLogger | None
    trainable: int  # parameters that train (model.freeze)
    n_params: int  # all the model's parameters
    fast_dev: bool  # trainer.fast_dev_run: nothing is written but the log
    dist: Dist
    restore_torch: Any  # puts back the process-wide torch settings of threads= and deterministic=


def open_run(cfg: DictConfig, run_dir: Path, choices: dict[str, str] | None, d: Dist) -> Run:
    """Check the config, claim the run dir, read a checkpoint to resume, build the run's objects, write
    config.yaml, open the sinks. A failure releases the run dir again (nothing half-written stays)."""
    t_start = time.perf_counter()
    check_config(cfg, choices)  # every config problem at once, before anything heavy happens
    if not cfg.trainer.get("fast_dev_run"):  # every rank, so that all of them stop alike
        check_logger_packages(cfg)  # the sinks open after config.yaml is written: a missing package first
    # resume=auto|PATH: read the checkpoint now (its stored config passes the allow-list too), before
    # anything is built and before the loggers open the run dir's files (docs/checkpoints.md)
    checkpointer = ckpt_io.Checkpointer(cfg, run_dir)
    if d.is_main:  # one dir, one run: lock, run id, writable (docs/checkpoints.md); rank 0 for the job
        checkpointer.claim(cfg.get("resume"))
    resumed, before = None, None  # before: the run dir's names before this run wrote any file
    restore_torch = None  # puts back threads= and deterministic= (configure_torch)
    try:
        # rank 0 picks, every rank loads; a fast_dev_run never resumes (nor trims the run's files)
        fast_dev = bool(cfg.trainer.get("fast_dev_run"))
        resumed = None if fast_dev else d.resume_state(checkpointer, cfg, allowed_prefixes(cfg))
        device = d.device or resolve_device(cfg.device)
        precision = precision_of(cfg)
        restore_torch = configure_torch(cfg)
        seed_everything(cfg.seed)
        s = setup(cfg, device, d.rank, d.world)
        cfg = debug_modes(cfg, s)  # trainer.fast_dev_run, overfit_batches, limit_*_batches
        writes = d.is_main and not fast_dev  # rank 0 writes every file of the run
        trainable = finetune.prepare(cfg, s.model, load_weights=resumed is None)  # init_from, model.freeze
        loop = Loop(cfg, s, precision, run_dir, d)
        loop.t_start = t_start
        # callbacks=[...] and checkpoint.save_top_k (dgtrain/callbacks.py); they see the run through `ctx`
        loop.callbacks = build_callbacks(cfg, checkpointer.dir)
        ctx = FitContext(
            run_dir, s.model, loop.optimizer, s.task.monitor, s.task.mode, loop.evaluate, loop.checkpoint
        )
        ctx.writes_files = writes
        # Written atomically like checkpoints: `dgtrain eval` and sweeps read these files back.
        yaml_text = OmegaConf.to_yaml(cfg, resolve=True)
        if writes:
            before = set(os.listdir(run_dir))
            ckpt_io.atomic_write(run_dir / "config.yaml", lambda f: f.write(yaml_text.encode()))
            write_data_info(run_dir, s.data.info)  # vocabulary, standardisation, class names: predict/sample
        if resumed is not None:
            loop.restore(resumed)
        # The sinks open last: `fit`'s try/finally always closes them (with the run's status).
        resume_step = loop.state.step if resumed is not None else None
        loop.sinks = sinks = (
            build_loggers(cfg, run_dir, resume_step=resume_step, files=writes) if d.is_main else []
        )
    except BaseException:
        if before is not None and resumed is None:  # a sink failed to open: no files of a run never started
            for name in set(os.listdir(run_dir)) - before:  # config.yaml, metrics.jsonl, the sinks' files
                path = run_dir / name
                if path.is_file():
                    path.unlink()
                else:
                    shutil.rmtree(path, ignore_errors=True)
        checkpointer.release()
        if restore_torch is not None:
            restore_torch()
        raise
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for sink in sinks:
        sink.log_config(resolved)
    n_params = sum(p.numel() for p in s.model.parameters())
    log.info(
        f"run dir {run_dir} | device {device} ({_device_name(device)}) | precision {precision} | "
        f"{type(s.model).__name__} {n_params:,} parameters ({trainable:,} trainable) | "
        f"{len(s.data.train):,} train / {len(s.data.val):,} val examples | {loop.max_steps} steps"
    )
    if resumed is not None and loop.state.step >= loop.max_steps:
        log.warning(
            f"resume: the checkpoint is at step {loop.state.step}, and this run trains {loop.max_steps} steps "
            "in all, so there is nothing left to train. To train further, raise trainer.max_steps (or "
            "trainer.max_epochs)."
        )
    console = next((x for x in sinks if isinstance(x, ConsoleLogger)), None)
    return Run(cfg, loop, checkpointer, ctx, sinks, console, trainable, n_params, fast_dev, d, restore_torch)


def close_run(run: Run, status: str, error: BaseException | None = None) -> dict[str, Any]:
    """The run's summary (summary.json, the sinks' last word), the sinks closed, the run dir released.
    `error`: what failed the run, named in summary.json (a `trainer.devices` launcher repeats it)."""
    loop, st, d = run.loop, run.loop.state, run.dist
    task = loop.task
    # a resumed run's wall time counts its earlier processes too
    summary = make_summary(
        status, st.step, st.completed_epochs, st.final, st.best, task, loop.device, run.n_params, st.peak_cuda,
        loop.wall_s(), loop.run_dir,
    )  # fmt: skip
    summary["telemetry"] = loop.telemetry.summary()
    summary["run_id"] = run.checkpointer.run_id
    summary["skipped_steps"] = st.skipped_steps
    summary["trainable_parameters"] = run.trainable
    summary.update(task.summary())  # the confusion matrix of the last evaluation, when asked for
    summary.update(run.ctx.extra_summary)  # e.g. early_stopping's best value and step
    summary["distributed"] = {"world_size": d.world, "strategy": d.strategy, "backend": d.backend}
    if status == "failed" and error is not None:
        summary["error"] = f"{type(error).__name__}: {error}"
    summary_text = json.dumps(summary, indent=2) + "\n"
    if d.is_main and not run.fast_dev:
        ckpt_io.atomic_write(loop.run_dir / "summary.json", lambda f: f.write(summary_text.encode()))
    try:
        for sink in run.sinks:
            sink.close(summary, status)
        run.checkpointer.release()
    finally:
        run.restore_torch()
    return summary


def fit(
    cfg: DictConfig, run_dir: Path | str, choices: dict[str, str] | None = None, dist: Dist | None = None
) -> TrainResult:
    """Train as `cfg` says, in `run_dir`. Per step: the step itself (`Loop.train_step`), then, when due,
    logging, evaluation and checkpoints. docs/loop.md walks through it."""
    d = dist or Dist()  # several processes (torchrun, trainer.devices): dgtrain/distributed.py; alone: no-ops
    run = open_run(cfg, Path(run_dir), choices, d)
    cfg, loop, ctx, console, checkpointer = run.cfg, run.loop, run.ctx, run.console, run.checkpointer
    st, s, task, callbacks, max_steps = loop.state, loop.s, loop.task, loop.callbacks, loop.max_steps
    tc = cfg.trainer
    # read once: an OmegaConf attribute costs tens of microseconds, too much for every step
    eval_every, sample_every = int(tc.eval_every or 0), int(tc.get("sample_every") or 0)
    test_at_end, fast_dev = bool(tc.get("test_at_end")), run.fast_dev
    if console:
        console.start(max_steps, first_step=st.step)
    status = "failed"
    stop = StopRequest(StopSync(d) if d.enabled else None).__enter__()
    matmul = tf32(tc.get("tf32", "auto"), loop.device, precision_of(cfg))
    matmul.__enter__()
    loop.t_log = time.perf_counter()
    try:
        callbacks.fit_start(ctx)
        s.model.train()
        while st.step < max_steps and not ctx.stop_reason:  # stop_reason: a resumed early-stopped run
            loop.train_step()  # queues the step's device work; reads nothing back (docs/checkpoints.md)
            callbacks.train_step(ctx, st.step)  # device-only work (EMA); never a host read
            stop.poll()  # several processes: every rank learns of a signal at the same step
            if console:
                console.advance(st.step)

            # ---- logging step: losses and metrics come to the host only here. A stop signal (or a
            # callback's stop request) makes this a logging step too, so no completed step goes unrecorded.
            last = st.step == max_steps
            logs = st.step % loop.log_every == 0 or last or stop.signal or ctx.stop_reason
            metrics = loop.train_metrics() if logs else {}
            # ---- evaluation: every eval_every steps, or at each epoch's end when eval_every is null
            epoch_ended = st.completed_epochs > st.last_eval_epochs
            if (eval_every and st.step % eval_every == 0) or (not eval_every and epoch_ended) or last:
                metrics.update(loop.evaluate())
                callbacks.eval_end(ctx, st.step, metrics)  # may add val_ema/...; may request a stop
                if ctx.stop_reason and st.losses and "train/loss" not in metrics:
                    metrics.update(loop.train_metrics())  # stopping here makes this a logging step
            if stop.signal and st.losses:  # the signal came during evaluation
                metrics.update(loop.train_metrics())
            if sample_every and st.step % sample_every == 0 and task.name == "lm":
                t_out = time.perf_counter()  # not a training step's time (perf/step_ms), like evaluation
                metrics["sample/text"] = lm_sample(s.model, s.data.info, st.step)  # a str, not a float metric
                loop.eval_s += time.perf_counter() - t_out
            if test_at_end and (last or ctx.stop_reason):  # the held-out test set, once: selects nothing
                # fast_dev_run: one test batch, as one train and one val batch
                test_batches = 1 if fast_dev else None
                metrics.update(evaluate_split(s, loop.autocast, "test", test_batches, reduce=loop.reduce))
            if metrics:
                loop.record(metrics)
                callbacks.step_end(ctx, st.step, metrics)  # logging steps only: host values
                if test_at_end and ctx.stop_reason and not last and "test/loss" not in metrics:
                    # a stop asked for in on_step_end, after the test check above: score it now
                    loop.record(evaluate_split(s, loop.autocast, "test", reduce=loop.reduce))

            # ---- checkpoint: every checkpoint.every steps, at the end, on a stop signal; best.pt when
            # the task's monitor metric improved at this step
            regular = checkpointer.due(st.step) or last or stop.signal is not None or bool(ctx.stop_reason)
            new_best = (
                checkpointer.keeps_best
                and task.monitor in metrics
                and st.best.get(task.monitor, {}).get("step") == st.step
            )
            if not fast_dev and (regular or new_best):  # rank 0's file, or (FSDP) every rank's shards
                t_out = time.perf_counter()  # not a training step's time (perf/step_ms)
                d.save_checkpoint(checkpointer, st.step, loop, regular, new_best)
                callbacks.checkpoint(
                    ctx, st.step, checkpointer.path(st.step) if regular else checkpointer.dir / "best.pt"
                )
                loop.eval_s += time.perf_counter() - t_out
            if ctx.stop_reason:
                log.info(f"{ctx.stop_reason}: stopped after step {st.step} (checkpoint saved)")
                break
            if stop.signal:
                if st.losses or not regular:  # the signal came after this step was logged/saved
                    if st.losses:
                        loop.record(loop.train_metrics())
                    if not fast_dev:
                        d.save_checkpoint(checkpointer, st.step, loop, True, False)
                log.warning(f"{stop.signal} received: stopped after step {st.step} (checkpoint saved)")
                if stop.signal == "SIGUSR1" and d.is_main:
                    log.warning(f"SLURM job {slurm_requeue(st.step)} requeued")
                break
        if stop.sync is not None:
            stop.sync.wait()  # the last step's stop flag, still in flight
        status = "early_stopped" if ctx.stop_reason else "completed" if st.step >= max_steps else "stopped"
        if status in ("completed", "early_stopped") and not fast_dev:
            # the final weights, without pickle (FSDP: gathered to rank 0)
            d.save_weights(loop.model, loop.run_dir / "model.safetensors")
    finally:
        stop.__exit__()
        matmul.__exit__(None, None, None)
        try:
            callbacks.fit_end(ctx, status)  # EMA saves model_ema.safetensors here
        except Exception as e:  # noqa: BLE001 - never hide the error that failed the run
            if status != "failed":
                raise
            log.warning(f"callbacks: on_fit_end failed too ({type(e).__name__}: {e})")
        summary = close_run(run, status, error=sys.exc_info()[1])
    return TrainResult(summary, s.model, s, loop.history, stop.exit_code if stop.signal else 0)


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = ""
    return f"{model or platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def make_summary(
    status, step, epoch, final, best, task, device, n_params, peak_cuda, wall_s, run_dir
) -> dict:
    mon = best.get(task.monitor)
    return {
        "status": status,
        "steps": step,
        "epochs": epoch,
        "wall_s": round(wall_s, 3),
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "dgtrain": __version__,
        "parameters": n_params,
        "peak_rss_mb": round(rss_peak_mb(), 1),
        "peak_cuda_mb": None if peak_cuda is None else round(peak_cuda, 1),
        "monitor": {
            "metric": task.monitor,
            "mode": task.mode,
            "value": mon["value"] if mon else None,
            "step": mon["step"] if mon else None,
        },
        "final": final,
        "best": best,
        "run_dir": str(run_dir),
    }


def build_loggers(cfg: DictConfig, run_dir: Path, resume_step: int | None = None, files: bool = True) -> list:
    """metrics.jsonl always; the sinks under `logger`; a console unless one was configured; plots.
    files=False (trainer.fast_dev_run): the console alone."""
    if not files:
        node = (cfg.get("logger") or {}).get("console")
        return [build(node, allowed=allowed_prefixes(cfg), key="logger.console") if node else ConsoleLogger()]
    sinks: list = [JsonlLogger(run_dir, append=resume_step is not None)]
    for name, node in (cfg.get("logger") or {}).items():
        # Sinks that keep files (wandb, tensorboard) take the run dir.
        takes = sink_parameters(node, allowed_prefixes(cfg))
        extra = {k: v for k, v in (("run_dir", run_dir), ("resume_step", resume_step)) if k in takes}
        sinks.append(build(node, allowed=allowed_prefixes(cfg), key=f"logger.{name}", **extra))
    if not any(isinstance(x, ConsoleLogger) for x in sinks):
        sinks.append(ConsoleLogger())
    sinks.append(PlotLogger(run_dir))  # last: draws what the others have logged
    return sinks
