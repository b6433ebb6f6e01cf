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
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dgtrain import __version__
from dgtrain import checkpoint as ckpt_io
from dgtrain.compile import compile_model
from dgtrain.config import allowed_prefixes, build, locate
from dgtrain.data import DataBundle, make_loader
from dgtrain.errors import DgtrainError
from dgtrain.faults import finite_flag, nonfinite_error, skip_update, slurm_requeue
from dgtrain.loggers import JsonlLogger, sink_parameters
from dgtrain.loggers.console import ConsoleLogger
from dgtrain.loggers.plots import PlotLogger
from dgtrain.memory import rss_peak_mb
from dgtrain.tasks import HIGHER_IS_BETTER, Task, make_task
from dgtrain.telemetry import Telemetry
from dgtrain.validation import check_config

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


def autocast_for(device: torch.device, precision: str):
    """A zero-argument context factory: autocast for bf16/fp16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DgtrainError(
            f"precision=bf16: {torch.cuda.get_device_name(device)} has no bf16 support; "
            "use precision=fp16 or precision=fp32."
        )
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


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


def build_model(cfg: DictConfig, info, allowed: tuple[str, ...]) -> torch.nn.Module:
    """`model._target_` names a class; dgtrain models size themselves from the data (`from_data`)."""
    params = OmegaConf.to_container(cfg.model, resolve=True)
    cls = locate(params.pop("_target_"), allowed, key="model._target_")
    factory = getattr(cls, "from_data", None)
    try:
        return factory(info, **params) if factory else cls(**params)
    except TypeError as e:
        raise DgtrainError(
            f"model: {e}. Check the keys under `model` (dgtrain ls shows each model's options)."
        ) from e


def setup(cfg: DictConfig, device: torch.device | None = None) -> Setup:
    allowed = allowed_prefixes(cfg)
    device = device or resolve_device(cfg.device)
    data = build(
        cfg.data, allowed=allowed, key="data", exclude=("task", "batch_size", "num_workers"), seed=cfg.seed
    )
    task = make_task(data.info.task, data.info.pad_id)
    torch.manual_seed(cfg.seed)  # model initialisation depends on the seed alone, not on data generation
    model = build_model(cfg, data.info, allowed).to(device)
    loss_fn = build(cfg.loss, allowed=allowed, key="loss", task=data.info.task, pad_id=data.info.pad_id)
    pin = device.type == "cuda"
    nw = int(cfg.data.get("num_workers", 0))
    bs = int(cfg.data.batch_size)
    train_loader = make_loader(data.train, bs, shuffle=True, seed=cfg.seed, num_workers=nw, pin_memory=pin)
    val_loader = make_loader(data.val, bs, shuffle=False, seed=cfg.seed, num_workers=nw, pin_memory=pin)
    return Setup(device, data, task, model, loss_fn, train_loader, val_loader)


class StopRequest:
    """SIGTERM / SIGINT ask the loop to stop after the current optimizer step (never mid-step), so the
    loggers, and anything else that runs on the way out, see a consistent state. A second signal
    falls back to the default behaviour. Inside a SLURM job, SIGUSR1 (the preemption notice of
    `sbatch --signal=USR1@...`) stops the same way and the loop then requeues the job."""

    EXIT_CODES = {"SIGTERM": 143, "SIGINT": 130, "SIGUSR1": 138}  # 128 + signal number (Linux)

    def __init__(self):
        self.signal: str | None = None
        self._previous: dict[int, Any] = {}

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

        self.signal = signal.Signals(signum).name
        for sig, handler in self._previous.items():  # a second Ctrl-C / SIGTERM is not ignored
            signal.signal(sig, handler)

    def __exit__(self, *exc) -> None:
        import signal

        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_code(self) -> int:
        return self.EXIT_CODES.get(self.signal or "", 1)


class BatchStream:
    """Micro-batches across epoch boundaries, on the device; knows the epoch and position within it."""

    def __init__(self, loader, device: torch.device, epoch: int = 0):
        self.loader, self.device = loader, device
        self.epoch, self.position, self.completed_epochs = epoch, 0, epoch
        self._it = None

    def seek(self, epoch: int, position: int, completed_epochs: int) -> None:
        """Continue at batch `position` of `epoch` (resume). The iterator starts here, so the random draw a
        DataLoader makes when it starts comes before the caller restores the saved RNG states."""
        self.epoch, self.position, self.completed_epochs = epoch, position, completed_epochs
        self.loader.batch_sampler.set_epoch(epoch, position)
        self._it = iter(self.loader)

    def __next__(self):
        if self._it is None:
            self.loader.batch_sampler.set_epoch(self.epoch, self.position)
            self._it = iter(self.loader)
        try:
            batch = next(self._it)
        except StopIteration:
            self.epoch, self.position, self._it = self.epoch + 1, 0, None
            return next(self)
        self.position += 1
        if self.position == len(self.loader):
            self.completed_epochs = self.epoch + 1
        return tuple(t.to(self.device, non_blocking=True) for t in batch)


def to_device(batches, device: torch.device):
    for batch in batches:
        yield tuple(t.to(device, non_blocking=True) for t in batch)


def evaluate(s: Setup, autocast, max_batches: int | None) -> dict[str, float]:
    s.model.eval()
    try:
        return s.task.evaluate(
            s.model, to_device(itertools.islice(s.val_loader, max_batches), s.device), s.loss_fn, autocast
        )
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


def fit(cfg: DictConfig, run_dir: Path | str, choices: dict[str, str] | None = None) -> TrainResult:
    t_start = time.perf_counter()
    run_dir = Path(run_dir)
    check_config(cfg, choices)  # every config problem at once, before anything heavy happens
    # resume=auto|PATH: read the checkpoint now (its stored config passes the allow-list too), before
    # anything is built and before the loggers open the run dir's files (docs/checkpoints.md)
    checkpointer = ckpt_io.Checkpointer(cfg, run_dir)
    resumed = checkpointer.load_for_resume(cfg, allowed_prefixes(cfg))
    device = resolve_device(cfg.device)
    precision = precision_of(cfg)
    autocast = autocast_for(device, precision)
    seed_everything(cfg.seed)
    s = setup(cfg, device)
    model, task, tc = s.model, s.task, cfg.trainer
    compiled = compile_model(model, tc.compile, task.name)  # in place: state_dict keys stay the model's

    accum = int(tc.grad_accum_steps)
    steps_per_epoch = max(1, len(s.train_loader) // accum)
    max_steps = int(tc.max_steps) if tc.max_steps else int(tc.max_epochs) * steps_per_epoch
    optimizer = build(cfg.optimizer, allowed=allowed_prefixes(cfg), key="optimizer")(model.parameters())
    scheduler = build(cfg.scheduler, allowed=allowed_prefixes(cfg), key="scheduler")(
        optimizer, total_steps=max_steps
    )
    # fp16 needs loss scaling; with enabled=False the scaler passes everything through unchanged.
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    n_params = sum(p.numel() for p in model.parameters())

    # Written atomically like checkpoints: `dgtrain eval` and sweeps read these files back.
    yaml_text = OmegaConf.to_yaml(cfg, resolve=True)
    ckpt_io.atomic_write(run_dir / "config.yaml", lambda f: f.write(yaml_text.encode()))
    history: list[dict[str, Any]] = []
    best: dict[str, dict[str, float]] = {}
    final: dict[str, float] = {}
    status, step, peak_cuda = "failed", 0, None
    stream = BatchStream(s.train_loader, device)
    log_every, eval_every = int(tc.log_every), tc.eval_every
    loss_buf = torch.zeros(log_every, device=device)  # per-step losses since the last log, on the device
    tokens = torch.zeros((), dtype=torch.long, device=device)
    samples, steps_since_log, last_eval_epochs, eval_s = 0, 0, 0, 0.0
    last_finite: tuple[int, float] | None = None
    counts_tokens = False
    skipped = 0  # steps whose update trainer.nonfinite=skip dropped
    if resumed is not None:  # continue exactly where the checkpoint left off: objects, data position, RNG
        loop = ckpt_io.restore(
            resumed, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, stream=stream
        )
        step, last_eval_epochs, samples = loop["step"], loop["last_eval_epochs"], loop["samples"]
        best.update(loop["best"])
        final.update(loop["final"])
        peak_cuda, last_finite, counts_tokens = loop["peak_cuda"], loop["last_finite"], loop["counts_tokens"]
        pending = ckpt_io.pending_losses(loop, log_every)  # a log window the save cut in half
        skipped, steps_since_log = loop["skipped_steps"], len(pending)
        loss_buf[:steps_since_log] = pending.to(device)
        tokens.fill_(loop["tokens"])
    config_plain = ckpt_io.plain_config(cfg)

    def checkpoint_state() -> dict[str, Any]:
        """The objects' states plus the loop's counters that exact resume needs (restored just above)."""
        loop = {
            "step": step,
            "epoch": stream.epoch,
            "position": stream.position,
            "completed_epochs": stream.completed_epochs,
            "last_eval_epochs": last_eval_epochs,
            "pending_losses": loss_buf[:steps_since_log].cpu(),
            "samples": samples,
            "tokens": int(tokens),
            "counts_tokens": counts_tokens,
            "last_finite": last_finite,
            "skipped_steps": skipped,
            "best": best,
            "final": final,
            "peak_cuda": peak_cuda,
        }
        return ckpt_io.make_state(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            scaler=scaler,
            loop=loop,
            config=config_plain,
            run_dir=run_dir,
            monitor=best.get(task.monitor),
        )

    # per-batch graph and memory figures; per step it only does host-side bookkeeping (docs/telemetry.md)
    telemetry = Telemetry(cfg.telemetry, model, device, log_every)
    telemetry.step = step  # a resumed run continues its sampling schedule
    t_log = time.perf_counter()

    def record(metrics: dict[str, Any]) -> None:
        nonlocal peak_cuda
        metrics = {"epoch": stream.epoch, **metrics}
        for sink in sinks:
            sink.log_metrics(metrics, step)
        history.append({"step": step, **metrics})
        final.update({k: v for k, v in metrics.items() if k != "epoch"})
        if "mem/cuda_peak_mb" in metrics:
            peak_cuda = max(peak_cuda or 0.0, metrics["mem/cuda_peak_mb"])
        for k, v in metrics.items():
            if k in HIGHER_IS_BETTER and math.isfinite(v):
                better = (lambda a, b: a > b) if HIGHER_IS_BETTER[k] else (lambda a, b: a < b)
                if k not in best or better(v, best[k]["value"]):
                    best[k] = {"value": v, "step": step}

    def train_metrics() -> dict[str, Any]:
        """Bring the losses since the last log to the host (the one sync), check them, add speed and memory."""
        nonlocal samples, steps_since_log, eval_s, t_log, last_finite
        losses = loss_buf[:steps_since_log].tolist()
        for i, v in enumerate(losses):  # a non-finite loss here is a step trainer.nonfinite=skip dropped
            if math.isfinite(v):
                last_finite = (step - steps_since_log + i + 1, v)
        finite = [v for v in losses if math.isfinite(v)]
        dt = time.perf_counter() - t_log - eval_s
        metrics: dict[str, Any] = {
            "train/loss": sum(finite) / len(finite) if finite else math.nan,
            "train/lr": optimizer.param_groups[0]["lr"],
        }
        if tc.nonfinite == "skip":
            metrics["train/skipped_steps"] = skipped
        if tc.clip_grad_norm:
            metrics["train/grad_norm"] = float(grad_norm)
        metrics["perf/step_ms"] = 1000.0 * dt / steps_since_log
        metrics["perf/samples_per_s"] = samples / dt
        n_tokens = int(tokens) if counts_tokens else None
        if n_tokens is not None:
            metrics["perf/tokens_per_s"] = n_tokens / dt
        metrics.update(telemetry.metrics(dt, n_tokens))  # memory (peaks reset), graph, FLOPs, MFU
        metrics.update(compiled.metrics())  # perf/recompiles, perf/compile_s (trainer.compile only)
        samples, steps_since_log, eval_s = 0, 0, 0.0
        tokens.zero_()
        t_log = time.perf_counter()
        return metrics

    # The sinks open last, right before the try/finally that always closes them (with the run's status).
    sinks = build_loggers(cfg, run_dir, resume_step=step if resumed is not None else None)
    console = next((x for x in sinks if isinstance(x, ConsoleLogger)), None)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for sink in sinks:
        sink.log_config(resolved)
    log.info(
        f"run dir {run_dir} | device {device} ({_device_name(device)}) | precision {precision} | "
        f"{type(model).__name__} {n_params:,} parameters | {len(s.data.train):,} train / "
        f"{len(s.data.val):,} val examples | {max_steps} steps"
    )
    if console:
        console.start(max_steps)
    stop = StopRequest().__enter__()
    try:
        model.train()
        while step < max_steps:
            # ---- one optimizer step: forward and backward for each micro-batch, graphs freed as we go
            step_loss = torch.zeros((), device=device)
            for _ in range(accum):
                batch = next(stream)
                with telemetry.forward(batch), autocast():
                    loss = task.loss(model, batch, s.loss_fn) / accum
                telemetry.after_forward(loss)  # sampled steps: measure this batch's graph before backward
                scaler.scale(loss).backward()
                telemetry.after_backward()
                step_loss += loss.detach()
                samples += len(batch[0])
                units = task.units(batch)
                if units is not None:
                    tokens += units  # in place on the device: no copy, no wait
                    counts_tokens = True
            if tc.clip_grad_norm:
                scaler.unscale_(optimizer)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float(tc.clip_grad_norm))
            # ---- non-finite guard (trainer.nonfinite), before the optimizer step: the loop's one per-step
            # host sync, a single bool (docs/checkpoints.md measures it). With fp16, overflowing scaled
            # gradients are the GradScaler's to skip, so only the loss is checked.
            if bool(finite_flag(step_loss, model.parameters(), check_grads=not scaler.is_enabled())):
                scaler.step(optimizer)
                scaler.update()
            elif tc.nonfinite == "fail":
                if steps_since_log:  # the completed steps since the last log are logged first
                    record(train_metrics())
                pending = [] if last_finite is None else [last_finite]
                raise nonfinite_error(step + 1, float(step_loss), pending)
            else:
                skip_update(scaler)
                skipped += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            telemetry.after_step()
            loss_buf[steps_since_log] = step_loss
            step += 1
            steps_since_log += 1
            if console:
                console.advance(step)

            # ---- logging step: losses and metrics come to the host only here (the guard above reads
            # one bool). A stop signal makes this a logging step too, so no completed step goes unrecorded.
            metrics: dict[str, Any] = {}
            if step % log_every == 0 or step == max_steps or stop.signal:
                metrics = train_metrics()

            # ---- evaluation: every eval_every steps, or at each epoch's end when eval_every is null
            epoch_ended = stream.completed_epochs > last_eval_epochs
            if (
                (eval_every and step % int(eval_every) == 0)
                or (not eval_every and epoch_ended)
                or step == max_steps
            ):
                t_eval = time.perf_counter()
                metrics.update(evaluate(s, autocast, tc.eval_batches))
                eval_s += time.perf_counter() - t_eval
                last_eval_epochs = stream.completed_epochs
            if stop.signal and steps_since_log:  # the signal came during evaluation
                metrics.update(train_metrics())
            if metrics:
                record(metrics)

            # ---- checkpoint: every checkpoint.every steps, at the end, on a stop signal; best.pt when
            # the task's monitor metric improved at this step
            regular = checkpointer.due(step) or step == max_steps or stop.signal is not None
            new_best = (
                checkpointer.keeps_best
                and task.monitor in metrics
                and best.get(task.monitor, {}).get("step") == step
            )
            if regular or new_best:
                checkpointer.save(step, checkpoint_state(), regular=regular, best=new_best)
            if stop.signal:
                if steps_since_log or not regular:  # the signal came after this step was logged/saved
                    if steps_since_log:
                        record(train_metrics())
                    checkpointer.save(step, checkpoint_state())
                log.warning(f"{stop.signal} received: stopped after step {step} (checkpoint saved)")
                if stop.signal == "SIGUSR1":
                    log.warning(f"SLURM job {slurm_requeue(step)} requeued")
                break
        status = "completed" if step >= max_steps else "stopped"
        if status == "completed":
            ckpt_io.save_weights(model, run_dir / "model.safetensors")  # the final weights, without pickle
    finally:
        stop.__exit__()
        summary = make_summary(
            status,
            step,
            stream.epoch,
            final,
            best,
            task,
            device,
            n_params,
            peak_cuda,
            time.perf_counter() - t_start,
            run_dir,
        )
        summary["telemetry"] = telemetry.summary()
        summary_text = json.dumps(summary, indent=2) + "\n"
        ckpt_io.atomic_write(run_dir / "summary.json", lambda f: f.write(summary_text.encode()))
        for sink in sinks:
            sink.close(summary, status)
    return TrainResult(summary, model, s, history, stop.exit_code if stop.signal else 0)


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


def build_loggers(cfg: DictConfig, run_dir: Path, resume_step: int | None = None) -> list:
    """metrics.jsonl always; the sinks under `logger`; a console unless one was configured; plots."""
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
