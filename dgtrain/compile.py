"""`trainer.compile`: the model's forward and the training loss through `torch.compile`, and what
compiling cost.

The module object is left as it is: only its `forward` is replaced, on the instance, by the compiled one.
So the optimizer, the checkpoints and `model.safetensors` see the model's own parameter names (no
`_orig_mod.` prefix that `torch.compile(model)` would add), a checkpoint written with compile resumes
without it and the other way round, and `model.generate` (greedy decoding) stays eager.

Sequence batches (seq2seq) change length from batch to batch. Their batch and time dimensions are
marked dynamic before the first call (`torch._dynamo.maybe_mark_dynamic`), so one graph serves every
length: the model compiles once for training and once for evaluation, however many lengths it meets, and a
resumed run compiles the same graph as the uninterrupted one (exact resume). Fixed-shape data (images,
tables, LM windows) compiles static graphs, which are the fastest.

The training loss (`dgtrain.tasks.float_loss`: the cast of the predictions to float32 and the loss) is
compiled as a graph of its own (`Compiled.criterion`), apart from the model, so DDP and FSDP see the
same compiled model as without it. Compiled, the cast, log-softmax and reduction of a cross-entropy run
as fused kernels that read the logits instead of writing float32 copies of them: for GPT-2's 50,304-way
head that is several GB of memory traffic per step saved.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from dgtrain.errors import DgtrainError

log = logging.getLogger("dgtrain")

# trainer.compile value -> torch.compile mode (None: torch's default mode)
MODES: dict[Any, str | None] = {True: None, "default": None, "reduce-overhead": "reduce-overhead"}
MODES.update({"max-autotune": "max-autotune", "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs"})
VARIABLE_LENGTH_TASKS = ("seq2seq",)
# the mode the training loss compiles in, where the run's mode records CUDA graphs
WITHOUT_CUDAGRAPHS = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def parse_mode(value: Any) -> tuple[bool, str | None]:
    """(enabled, torch.compile mode) for a `trainer.compile` value; raises on an unknown one."""
    if value in (False, None, "false", "False"):
        return False, None
    if value in ("true", "True"):
        value = True
    if value not in MODES:
        raise DgtrainError(
            f"trainer.compile={value!r}: expected false, true, reduce-overhead, max-autotune or "
            "max-autotune-no-cudagraphs."
        )
    return True, MODES[value]


def _dynamo_frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def _dynamo_compile_s() -> float:
    try:  # a private helper: the figure is left out rather than the run failing if torch renames it
        from torch._dynamo.utils import calculate_time_spent

        return float(calculate_time_spent().get("total_wall_time", 0.0))
    except Exception:  # noqa: BLE001
        return float("nan")


class Compiled:
    """What compiling has cost so far, as metrics: `perf/recompiles` (compilations after the first of each
    compiled function: one for the first evaluation, more means shapes or guards are changing) and
    `perf/compile_s` (cumulative)."""

    def __init__(self, enabled: bool, mode: str | None = None, task: str | None = None):
        self.enabled, self.mode, self.task = enabled, mode, task
        self.functions = 0  # compiled functions: each compiles at least once
        self._frames0 = _dynamo_frames() if enabled else 0
        self._seconds0 = _dynamo_compile_s() if enabled else 0.0

    @property
    def compiles(self) -> int:
        return _dynamo_frames() - self._frames0 if self.enabled else 0

    def metrics(self) -> dict[str, float]:
        if not self.enabled:
            return {}
        return {
            "perf/recompiles": max(self.compiles - max(self.functions, 1), 0),
            "perf/compile_s": round(_dynamo_compile_s() - self._seconds0, 3),
        }

    def compile(self, fn: Callable, mode: str | None = None, dims: tuple[int, ...] | None = None) -> Callable:
        """`fn` through torch.compile in `mode` (default: this run's); variable-length tasks mark their
        tensors' dims dynamic (`dims`, default every dim)."""
        if not self.enabled:
            return fn
        compiled = torch.compile(fn, mode=mode or self.mode)
        self.functions += 1
        if self.task not in VARIABLE_LENGTH_TASKS:
            return compiled
        from torch._dynamo import maybe_mark_dynamic

        def dynamic(*args, **kwargs):
            for t in args:
                if isinstance(t, torch.Tensor):
                    for dim in range(t.ndim) if dims is None else dims:
                        maybe_mark_dynamic(t, dim)
            return compiled(*args, **kwargs)

        return dynamic

    def criterion(self, loss_fn: Callable) -> Callable:
        """The training criterion (`float_loss(loss_fn)`), compiled when trainer.compile is on; never into
        CUDA graphs: the loop keeps each step's loss until the next logging step, and a CUDA graph's
        output is overwritten by its next replay (its few fused kernels gain little from graphs anyway)."""
        from dgtrain.tasks import float_loss

        # sequence tasks: the predictions are (tokens, vocabulary): only the number of tokens varies
        mode = WITHOUT_CUDAGRAPHS.get(self.mode, self.mode)
        return self.compile(float_loss(loss_fn), mode=mode, dims=(0,))


def compile_model(model: nn.Module, value: Any, task: str | None = None) -> Compiled:
    """Replace `model.forward` by its compiled version when `trainer.compile` asks for it (in place)."""
    enabled, mode = parse_mode(value)
    compiled = Compiled(enabled, mode, task)
    if not enabled:
        return compiled
    t0 = time.perf_counter()
    model.forward = compiled.compile(model.forward)
    log.info(
        f"trainer.compile={value}: forward compiled on first use (mode {mode or 'default'}; "
        f"set-up {time.perf_counter() - t0:.2f}s)"
    )
    return compiled
