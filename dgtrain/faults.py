"""Faults the loop survives: a non-finite loss or gradient (`trainer.nonfinite`), and a SLURM
preemption notice (SIGUSR1: checkpoint, then `scontrol requeue`). docs/checkpoints.md explains both."""

from __future__ import annotations

import math
import os
import subprocess

import torch

from dgtrain.distributed import local_grads
from dgtrain.errors import DgtrainError, NonFiniteLossError


def nonfinite_check(
    loss: torch.Tensor,
    params,
    one: torch.Tensor,
    check_grads: bool = True,
    out: torch.Tensor | None = None,
    sharded: bool = False,
) -> torch.Tensor:
    """A 0-d float32 tensor on the loss's device: 1.0 if the loss or (if `check_grads`) any gradient holds
    a NaN or inf, else 0.0 -- the `found_inf` that fused optimizers take to drop an update on the device.
    `out`: a tensor to reuse (zeroed first) instead of a new one. `sharded`: gradients may be FSDP
    DTensors, whose local shards are checked (the ranks then agree through `Dist.any_`).

    AMP's own check (`torch._amp_foreach_non_finite_check_and_unscale_`): on CUDA one multi-tensor kernel
    for all tensors of the loss's dtype (others are checked one by one), nothing read back. Its unscale
    factor here is `one` (a 1.0 tensor), and x * 1.0 is x for every float, so values stay bit-identical."""
    found = torch.zeros((), device=loss.device) if out is None else out.zero_()
    tensors = [loss.detach() if loss.requires_grad else loss]
    if check_grads:
        tensors += local_grads(params, sharded)
    torch._amp_foreach_non_finite_check_and_unscale_(tensors, found, one)
    return found


def skip_update(scaler: torch.amp.GradScaler) -> None:
    """Drop this step's update. With fp16 the GradScaler must still close its step: back its scale off
    as an overflow would (this also clears its per-step records)."""
    if scaler.is_enabled():
        scaler.update(scaler.get_scale() * scaler.get_backoff_factor())


def remedies(clip: float | None, precision: str) -> str:
    """What to try after non-finite steps, for this run's settings: no advice to set what is already set
    (clip_grad_norm on, precision=fp32)."""
    tips = ["lower optimizer.lr"]
    tips.append(f"lower trainer.clip_grad_norm (now {clip:g})" if clip else "set trainer.clip_grad_norm")
    if precision == "fp16":
        tips.append("use precision=bf16 or precision=fp32")
    elif precision == "bf16":
        tips.append("use precision=fp32")
    return ", ".join(tips)


def nonfinite_error(
    step: int,
    loss: float,
    history: list[tuple[int, float]],
    clip: float | None = None,
    precision: str = "fp32",
) -> NonFiniteLossError:
    """The error for `trainer.nonfinite=fail`: names the step and the last finite loss before it."""
    last = next(((s, v) for s, v in reversed(history) if math.isfinite(v) and s < step), None)
    last_txt = f"last finite loss {last[1]:.6g} at step {last[0]}" if last else "no finite loss before it"
    what = f"train/loss became {loss}" if not math.isfinite(loss) else "a gradient became non-finite"
    tips = remedies(clip, precision)
    return NonFiniteLossError(
        f"{what} at step {step} ({last_txt}). Training stopped before that step's optimizer update. "
        f"{tips[0].upper()}{tips[1:]}, or set trainer.nonfinite=skip to drop such updates."
    )


def skip_budget(max_skipped: int | None, max_steps: int) -> int:
    """How many updates `trainer.nonfinite=skip` may drop before the run fails (`trainer.max_skipped`)."""
    return int(max_skipped) if max_skipped is not None else max(1, max_steps // 10)


def too_many_skipped(
    skipped: int, step: int, budget: int, clip: float | None = None, precision: str = "fp32"
) -> NonFiniteLossError:
    """A run that keeps skipping updates is not training: fail (exit 3) rather than report "completed"."""
    return NonFiniteLossError(
        f"trainer.nonfinite=skip dropped {skipped} of the first {step} updates (a NaN/inf loss or gradient), "
        f"more than trainer.max_skipped={budget}: the model is not training. Check the data for NaN/inf "
        f"values, {remedies(clip, precision)}; raise trainer.max_skipped only if such steps are expected."
    )


def slurm_job_id() -> str | None:
    """The id `scontrol requeue` needs: ARRAYID_TASKID for array jobs, else SLURM_JOB_ID."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_requeue(step: int) -> str:
    """Ask SLURM to requeue this job (after the checkpoint at `step` was written); returns the job id."""
    job = slurm_job_id()
    if not job:
        raise DgtrainError("SIGUSR1: SLURM_JOB_ID is not set, so there is no job to requeue.")
    try:
        p = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise DgtrainError(
            f"SIGUSR1: `scontrol requeue {job}` could not run ({e}). The checkpoint at step {step} is saved; "
            "resubmit the job with resume=auto."
        ) from None
    if p.returncode != 0:
        raise DgtrainError(
            f"SIGUSR1: `scontrol requeue {job}` failed (exit {p.returncode}: {p.stderr.strip()[:200]}). "
            f"The checkpoint at step {step} is saved; resubmit the job with resume=auto."
        )
    return job
