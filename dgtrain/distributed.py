"""Running on more than one process: `torch.distributed` only (torchrun, DDP, FSDP2, distributed checkpoint).

What this module owns, and what the loop asks of it (docs/distributed.md):
- the process group (nccl on CUDA, gloo on CPU) with a timeout, and who is rank 0;
- wrapping the model: `DistributedDataParallel`, or FSDP2's `fully_shard` with a `MixedPrecisionPolicy`
  that follows `precision=`; `no_sync` for the micro-batches before the last of a gradient accumulation;
- the reductions on logging steps (mean loss, summed throughput, memory as the max over ranks plus
  rank 0's own), over a CPU (gloo) group so they never wait for an accelerator;
- a stop flag (SIGTERM, SIGINT, SLURM's SIGUSR1) agreed by all ranks at a step boundary, so every rank
  stops after the same step and one checkpoint is written;
- sharded checkpoints through `torch.distributed.checkpoint`, loadable on any world size (also 1).

A single process never creates a process group: everything here is then a no-op.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dgtrain.errors import DgtrainError
from dgtrain.loggers import FINISHED

log = logging.getLogger("dgtrain")

STRATEGIES = ("auto", "ddp", "fsdp")
# The stop signals, by priority when ranks saw different ones (the highest wins).
STOP_CODES = {"SIGINT": 1, "SIGTERM": 2, "SIGUSR1": 3}
STOP_NAMES = {v: k for k, v in STOP_CODES.items()}


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as torchrun (or SLURM through submitit) sets them; (0, 1, 0) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def adopt_submitit_tasks() -> bool:
    """Inside a submitit job of several tasks (`hydra.launcher.tasks_per_node`, `nodes`: one task per GPU,
    as SLURM starts them), export torch.distributed's variables (RANK, WORLD_SIZE, MASTER_ADDR, ...) from
    the job's environment, so each task joins the job's process group as one rank. True when it did."""
    if not os.environ.get("SUBMITIT_EXECUTOR") or in_worker():
        return False
    from submitit.helpers import TorchDistributedEnvironment

    env = TorchDistributedEnvironment()
    if env.world_size < 2:
        return False
    env.export(set_cuda_visible_devices=False)
    os.environ["DGTRAIN_SUBMITIT_TASKS"] = "1"
    return True


def in_worker() -> bool:
    """True inside a process a distributed launcher started (torchrun, `trainer.devices`, submitit)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass
class Dist:
    """This process's place in the job. `world == 1`: no process group, every method a no-op."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp
    backend: str | None = None
    cpu_group: Any = None  # gloo group for host-side reductions (the default group when it is gloo)
    device: torch.device | None = None  # this rank's device (cuda:LOCAL_RANK); None: resolve `device=`

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    # ---------------------------------------------------------------------------------- collectives

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier(group=self.cpu_group)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """In place: the mean of `t` over ranks (logging steps only: the caller reads it next)."""
        if self.enabled:
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
            t /= self.world
        return t

    def sum_(self, values: list[Any]) -> list[Any]:
        """Evaluation: each value (a number, or a tensor of any shape) summed over the ranks, in one
        all-reduce (float64); numbers come back as floats, tensors with their shapes. Each rank scores
        its own shard of the split, and a task's metrics are ratios of such sums."""
        if not self.enabled:
            return values
        dev = self.device if self.backend == "nccl" else torch.device("cpu")
        flat = [torch.as_tensor(v).detach().reshape(-1).to(dev, torch.float64) for v in values]
        buf = torch.cat(flat)
        torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
        parts = buf.split([f.numel() for f in flat])
        return [
            p.reshape(v.shape) if torch.is_tensor(v) else p.item() for p, v in zip(parts, values, strict=True)
        ]

    def any_(self, found: torch.Tensor) -> torch.Tensor:
        """In place: the non-finite guard's `found` (a 0-d 0.0/1.0 tensor) becomes 1.0 on every rank when it
        is 1.0 on any. No host sync: the collective is queued like any other kernel. With FSDP each rank
        checks only its own shards, and DDP's ranks see different losses: the ranks must agree."""
        if self.enabled:
            torch.distributed.all_reduce(found, op=torch.distributed.ReduceOp.MAX)
        return found

    def reduce_metrics(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """Logging steps: combine each rank's figures into the job's. `train/loss` and other means are
        already job-wide (the loop averages the loss window first); throughput adds up over ranks;
        memory is the max over ranks, and `<key>_rank0` keeps rank 0's own figure."""
        if not self.enabled:
            return metrics
        gathered: list[dict[str, Any]] = [{} for _ in range(self.world)]
        torch.distributed.all_gather_object(gathered, metrics, group=self.cpu_group)
        out = dict(metrics)
        for k, v in metrics.items():
            values = [g[k] for g in gathered if isinstance(g.get(k), (int, float))]
            if len(values) != self.world or isinstance(v, bool):
                continue
            if k.startswith("mem/"):
                out[k] = max(values)
                out[f"{k}_rank0"] = v if self.is_main else gathered[0][k]
            elif k in ("perf/samples_per_s", "perf/tokens_per_s"):
                out[k] = sum(values)
        return out

    # ---------------------------------------------------------------------------------- checkpoints

    def resume_state(self, checkpointer: Any, cfg: Any, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """`resume=`: rank 0 picks the checkpoint (and trims metrics.jsonl), every rank loads that one."""
        if not self.enabled:
            return checkpointer.load_for_resume(cfg, allowed)
        from dgtrain import checkpoint as ckpt_io

        state, error = None, None
        if self.is_main:
            try:
                state = checkpointer.load_for_resume(cfg, allowed)
            except DgtrainError as e:
                error = e
        path = self.broadcast_object(None if state is None else state["path"])
        if error is not None or self.broadcast_object(error is not None):
            raise error or DgtrainError("resume: rank 0 could not read the checkpoint (see its error)")
        if self.is_main or path is None:
            return state
        state = ckpt_io.load(path)
        state["path"] = path
        return state

    def save_checkpoint(self, checkpointer: Any, step: int, loop: Any, regular: bool, best: bool) -> None:
        """DDP / one process: rank 0 writes today's file. FSDP: every rank writes its shards. Every rank
        builds the state (`loop.checkpoint()` reads the non-finite guard, which all ranks must do alike)."""
        state = loop.checkpoint()
        if self.enabled:  # each rank's random streams (its dropout draws differ): every rank resumes exactly
            per_rank: list[Any] = [None] * self.world
            torch.distributed.all_gather_object(per_rank, state["rng"], group=self.cpu_group)
            state["rng_ranks"] = per_rank
        if self.sharded:
            checkpointer.save_sharded(
                step, state, loop.model, loop.optimizer, self, regular=regular, best=best
            )
        elif self.is_main:
            checkpointer.save(step, state, regular=regular, best=best)

    def save_weights(self, model: torch.nn.Module, path: Path) -> None:
        """The final weights as safetensors, written by rank 0 (FSDP gathers the full weights first)."""
        from dgtrain import checkpoint as ckpt_io

        if not self.sharded:
            if self.is_main:
                ckpt_io.save_weights(unwrap(model), path)
            return
        state = full_model_state(model, self)  # collective: every rank takes part
        if self.is_main:
            ckpt_io.save_state_weights(state, path)

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init(trainer: Any, device_spec: str) -> tuple[Dist, torch.device | None]:
    """Join the job's process group when started by a launcher; (Dist(), None) for a single process.

    Returns the device this rank uses (cuda:LOCAL_RANK on CUDA) or None to let the caller resolve it."""
    rank, world, local_rank = env_world()
    strategy = str(getattr(trainer.get("strategy"), "value", trainer.get("strategy")) or "auto")
    if world == 1:
        if strategy == "fsdp":
            log.warning("trainer.strategy=fsdp with one process: nothing to shard, training unwrapped")
        return Dist(), None
    spec = str(device_spec)
    cuda = spec.startswith("cuda") or (spec == "auto" and torch.cuda.is_available())
    device = torch.device("cpu")
    if cuda:
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise DgtrainError(
                f"device={spec} with LOCAL_RANK={local_rank}: this machine has "
                f"{torch.cuda.device_count()} CUDA device(s). Start at most that many processes per node "
                "(--nproc-per-node / trainer.devices), or use device=cpu."
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if cuda else "gloo"
    timeout = datetime.timedelta(seconds=float(trainer.get("dist_timeout_s") or 300))
    torch.distributed.init_process_group(
        backend, timeout=timeout, device_id=device if cuda else None, rank=rank, world_size=world
    )
    cpu_group = torch.distributed.new_group(backend="gloo", timeout=timeout) if cuda else None
    chosen = "ddp" if strategy == "auto" else strategy
    return Dist(rank, world, local_rank, chosen, backend, cpu_group, device if cuda else None), device


# ------------------------------------------------------------------------------------------- model


def wrap_model(model: torch.nn.Module, d: Dist, device: torch.device, precision: str) -> torch.nn.Module:
    """DDP, or FSDP2 (`fully_shard` on each child holding parameters, then the root)."""
    if not d.enabled:
        return model
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (d.world,))
    # bf16 parameters in forward/backward, fp32 gradient reduction and master weights (torchtitan's default)
    mp = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None,
        reduce_dtype=torch.float32 if precision == "bf16" else None,
    )
    for child in _shard_units(model):
        fully_shard(child, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model


def _shard_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules sharded on their own: a ModuleList's blocks (transformer layers), else each direct
    child that holds parameters. Everything left over goes with the root."""
    units: list[torch.nn.Module] = []
    for child in model.children():
        if isinstance(child, torch.nn.ModuleList):
            units.extend(m for m in child if any(True for _ in m.parameters()))
        elif any(True for _ in child.parameters()):
            units.append(child)
    return units


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's module (DDP keeps it as `.module`; FSDP2 shards it in place)."""
    return getattr(model, "module", model) if type(model).__name__ == "DistributedDataParallel" else model


def sync_context(model: torch.nn.Module, last_micro_batch: bool):
    """Gradient accumulation: reduce gradients only on the last micro-batch of an optimizer step."""
    if last_micro_batch:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2: reduce-scatter only on the last one
        return _fsdp_no_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def local_grads(params, sharded: bool = True) -> list[torch.Tensor]:
    """Each gradient as this rank holds it. `sharded` (FSDP): an FSDP shard's local part, empty shards
    left out; else the gradients themselves (every step of the non-finite guard: kept lean)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not sharded:
        return grads
    grads = [g.to_local() if hasattr(g, "to_local") else g for g in grads]
    return [g for g in grads if g.numel()]


# ------------------------------------------------------------------------------------------ stop flag


class StopSync:
    """Agree on a stop signal across ranks without waiting on it: each step boundary posts this rank's
    flag in an asynchronous all-reduce (MAX) on the CPU group and reads the one posted at the previous
    boundary, which has long finished. Every rank sees the same result at the same step, so all stop
    after the same step (one step after the signal arrived)."""

    def __init__(self, d: Dist):
        self.d = d
        self._work = None
        self._buf = torch.zeros(1, dtype=torch.int32)

    def __call__(self, local_signal: str | None) -> str | None:
        if not self.d.enabled:
            return local_signal
        agreed = self.wait()
        if agreed is None:
            self._buf = torch.tensor([STOP_CODES.get(local_signal or "", 0)], dtype=torch.int32)
            self._work = torch.distributed.all_reduce(
                self._buf, op=torch.distributed.ReduceOp.MAX, group=self.d.cpu_group, async_op=True
            )
        return agreed

    def wait(self) -> str | None:
        """The result of the flag in flight (None when no rank had a signal); call before exiting."""
        if self._work is None:
            return None
        self._work.wait()
        self._work = None
        return STOP_NAMES.get(int(self._buf[0]))


# -------------------------------------------------------------------------------- sharded checkpoints

SHARDED_META = "meta.pt"  # loop counters, RNG, config, scheduler: written by rank 0 into the directory


def save_sharded(
    path: Path, meta: dict[str, Any], model: torch.nn.Module, optimizer: torch.optim.Optimizer, d: Dist
) -> Path:
    """An FSDP checkpoint: a directory of shards written by every rank through torch.distributed.checkpoint.

    All ranks write into a temporary directory; DCP writes `.metadata` last, after every shard; then rank 0
    renames the directory into place. So a directory under the final name is complete, and resume ignores
    anything else (a killed save leaves only a `.*.tmp` directory, removed on resume)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from dgtrain import checkpoint as ckpt_io

    tmp = path.parent / f".{path.name}.tmp"
    if d.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        ckpt_io.save(meta, tmp / SHARDED_META)
    d.barrier()
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optimizer": optim_sd}, checkpoint_id=str(tmp))
    d.barrier()  # every rank's shards and the metadata are on disk
    if d.is_main:
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
        ckpt_io.fsync_dir(path.parent)
    d.barrier()
    return path


def is_complete_sharded(path: Path) -> bool:
    return (path / ".metadata").is_file() and (path / SHARDED_META).is_file()


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """Load an FSDP checkpoint into `model` (and `optimizer`) on any number of processes: FSDP-sharded on
    N ranks, or a plain module on one. DCP reshards by the parameters' names."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    with warnings.catch_warnings():  # one process, no process group: DCP says it loads without one
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        if optimizer is None:
            model_sd = get_model_state_dict(model)
            dcp.load({"model": model_sd}, checkpoint_id=str(path))
            set_model_state_dict(model, model_sd)
            return
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def full_model_state(model: torch.nn.Module, d: Dist) -> dict[str, torch.Tensor]:
    """The whole model's state dict on rank 0 (FSDP gathers its shards; collective), for safetensors."""
    if not d.sharded:
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


# -------------------------------------------------------------------------------------------- launcher


def resolve_devices(devices: Any, device_spec: str) -> int:
    """`trainer.devices`: an int, or auto (every visible GPU; 1 on CPU). null means one process."""
    if devices is None:
        return 1
    if str(devices) == "auto":
        cuda = str(device_spec).startswith("cuda") or (
            str(device_spec) == "auto" and torch.cuda.is_available()
        )
        return max(1, torch.cuda.device_count()) if cuda else 1
    try:
        n = int(devices)
    except ValueError:
        n = 0
    if n < 1:
        raise DgtrainError(f"trainer.devices={devices!r}: expected a positive integer, auto or null.")
    return n


def launch(nproc: int, argv: list[str], run_dir: Path, monitor_interval: float = 0.5) -> int:
    """Start `nproc` workers running `python -m dgtrain ARGV` on this node through torch.distributed.run's
    API (`elastic_launch`, standalone rendezvous): the same agent torchrun uses, so the workers see the
    same environment (RANK, WORLD_SIZE, MASTER_ADDR, ...). Returns the job's exit code: 0, the first failed
    worker's code, or 128+N when the launcher itself got signal N (SIGTERM: 143)."""
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.api import DefaultLogsSpecs, SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=f"dgtrain-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="localhost:0",
        rdzv_configs={"timeout": 120},
        max_restarts=0,
        monitor_interval=monitor_interval,
        start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=None),  # workers write to this console
    )
    log.info(f"trainer.devices={nproc}: starting {nproc} workers (torch.distributed.run) in {run_dir}")
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "dgtrain", *argv)
    except ChildFailedError as e:
        codes = [f.exitcode for f in e.failures.values()]
        first = e.get_first_failure()[1].exitcode
        log.error(f"trainer.devices={nproc}: worker exit codes {codes}")
        return _exit_code(first)
    except SignalException as e:
        return 128 + int(e.sigval)
    return 0


def _exit_code(code: int) -> int:
    """A worker killed by signal N reports -N; a shell reports it as 128+N."""
    return 128 - code if code < 0 else (code or 1)


# --------------------------------------------------------------------------------- the run's entry point


def worker_argv(hc: Any, run_dir: Path) -> list[str]:
    """The overrides that start one worker of this job: the job's own overrides (never a sweep's), in the
    job's run dir, so every worker writes (rank 0) or reads the same directory."""
    argv = [str(o) for o in hc.overrides.task if not str(o).startswith("hydra.run.dir=")]
    if hc.job.config_name and hc.job.config_name != "train":
        argv = ["--config-name", str(hc.job.config_name), *argv]
    return [*argv, f"hydra.run.dir={run_dir}"]


def run(cfg: Any, run_dir: Path | str, hc: Any):
    """One training run as the Hydra task sees it: launch `trainer.devices` workers, or (inside a worker)
    join the process group and train, or train alone. Returns the `TrainResult` (read back from the run
    dir's summary.json and metrics.jsonl when workers trained)."""
    from hydra.types import RunMode

    from dgtrain.train import fit

    run_dir = Path(run_dir)
    nproc = resolve_devices(cfg.trainer.get("devices"), cfg.device)
    if in_worker():
        if hc.mode == RunMode.MULTIRUN and not os.environ.get("DGTRAIN_SUBMITIT_TASKS"):
            raise DgtrainError(
                "a Hydra multirun (-m) inside torchrun: every rank would run its own sweep. Sweep from "
                "outside instead: `dgtrain -m ... trainer.devices=N` (each job starts N workers) or "
                "`hydra/launcher=submitit_slurm` (docs/distributed.md)."
            )
        d, _ = init(cfg.trainer, cfg.device)
        try:
            shared = Path(d.broadcast_object(str(run_dir)))  # torchrun's ranks may disagree on ${now:...}
            if shared != run_dir:
                _drop_own_run_dir(run_dir)
            if not d.is_main:  # one console: the other ranks report warnings and errors only
                log.setLevel(logging.WARNING)
            result = fit(cfg, shared, choices=dict(hc.runtime.choices), dist=d)
            # every rank is done with the group before any tears it down: a gloo peer whose group vanishes
            # under it can abort at exit ("terminate called without an active exception")
            d.barrier()
            return result
        finally:
            d.close()
    if nproc > 1:
        from dgtrain.validation import check_config

        check_config(cfg, dict(hc.runtime.choices))  # a config error once, here, before any worker starts
        return _launched(nproc, worker_argv(hc, run_dir), run_dir)
    return fit(cfg, run_dir, choices=dict(hc.runtime.choices))


def _drop_own_run_dir(run_dir: Path) -> None:
    """A rank other than 0 started by torchrun created its own Hydra run dir (a second later than rank
    0's): remove it when it holds nothing but Hydra's own files."""
    names = {p.name for p in run_dir.iterdir()} if run_dir.is_dir() else set()
    if names <= {".hydra", "dgtrain.log"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def _launched(nproc: int, argv: list[str], run_dir: Path):
    import json

    from dgtrain.train import TrainResult

    code = launch(nproc, argv, run_dir)
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        err = DgtrainError(
            f"trainer.devices={nproc}: the workers exited with code {code} before writing "
            f"{summary_path}; their errors are in the log above."
        )
        err.exit_code = code or 1
        raise err
    summary = json.loads(summary_path.read_text())
    rows = (
        (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").is_file() else []
    )
    history = [json.loads(x) for x in rows if x.strip()]
    if code in (130, 138, 143) and summary.get("status") in FINISHED:
        log.warning(
            f"trainer.devices={nproc}: the run had {summary['status']} when a signal ended the workers"
        )
    elif code and summary.get("status") != "stopped":
        why = f": {summary['error'].rstrip('.')}" if summary.get("error") else "; see the log above"
        err = DgtrainError(f"trainer.devices={nproc}: a worker failed (exit code {code}){why}.")
        err.exit_code = code
        raise err
    return TrainResult(summary, None, None, history, code)
