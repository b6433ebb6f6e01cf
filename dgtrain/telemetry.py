"""What each batch costs: its autograd graph, the memory of each phase of a step, and its FLOPs.

`fit` calls a `Telemetry` at a few marked places in the loop. Per step it only does host-side
bookkeeping (the batch's shape signature and, for the transformer, its FLOPs from the shapes); the
heavier probes run on sampled steps only, and nothing here makes the host wait for the device
outside logging steps:

- every `telemetry.graph_every` steps (and on the first), the first micro-batch's forward runs under
  `torch.autograd.graph.saved_tensors_hooks`, which sees every tensor saved for backward; its graph is
  then walked from the loss (`graph/nodes`, `graph/saved_mb`);
- on CUDA, on those same sampled steps, the allocator's peak is read and reset at each phase boundary
  (`mem/cuda_peak_fwd_mb`, `_bwd_mb`, `_opt_mb`); every read also feeds the interval's peak, so
  `mem/cuda_peak_mb` still covers every step.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import Counter
from typing import Any

import torch
from torch import nn

from dgtrain.errors import DgtrainError
from dgtrain.memory import MB, cuda_peak_bytes, memory_metrics

NO_CONTEXT = contextlib.nullcontext()  # reusable: `with` on it does nothing

log = logging.getLogger("dgtrain")

# Peak dense bf16 tensor-core throughput (TFLOP/s) by device name; the first matching entry wins, so
# the more specific names come first. MFU is reported against these whatever `precision` is set to.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),  # also GH200
    ("H100", 989.0),  # SXM
    ("A100", 312.0),
)


def peak_tflops(device: torch.device, override: float | None = None) -> float | None:
    """The peak to compute MFU against: the config's override, else the table entry for this GPU."""
    if override is not None:
        return float(override)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


# ------------------------------------------------------------------------------------- graph probes


def format_shapes(shapes) -> str:
    """'64x13 64x15' for a sequence of shapes."""
    return " ".join("x".join(str(n) for n in shape) for shape in shapes)


def shape_signature(batch) -> str:
    """'64x13 64x15': the shapes of a batch's tensors, the key that decides the shape of its graph."""
    return format_shapes(t.shape for t in batch)


def storage_key(t: torch.Tensor) -> tuple[str, int] | None:
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # tensors without a plain storage (sparse, nested, ...)
        return None


def storage_nbytes(t: torch.Tensor) -> int:
    try:
        return t.untyped_storage().nbytes()
    except (RuntimeError, NotImplementedError):
        return t.numel() * t.element_size()


def parameter_storages(model: nn.Module) -> set[tuple[str, int]]:
    """Storages of the model's parameters and buffers: memory the model holds whether or not a graph does."""
    keys = {storage_key(t) for t in itertools.chain(model.parameters(), model.buffers())}
    keys.discard(None)
    return keys  # type: ignore[return-value]


class SavedTensors:
    """Counts what the forward inside `with SavedTensors(...)` saves for backward: each storage once
    (views such as the two halves of a chunk, or a transposed weight, share their base's storage), and
    none of the model's own parameters or buffers, which exist with or without the graph."""

    def __init__(self, exclude: set[tuple[str, int]] | None = None):
        self.exclude = exclude or set()
        self.storages: dict[tuple[str, int], int] = {}
        self.tensors = 0
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        self.tensors += 1
        key = storage_key(t)
        if key is not None and key not in self.exclude and key not in self.storages:
            self.storages[key] = storage_nbytes(t)
        return t

    @staticmethod
    def _unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def __enter__(self) -> SavedTensors:
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def autograd_nodes(root) -> list:
    """Every autograd node reachable from `root` (a tensor's grad_fn), in breadth-first order."""
    if root is None:
        return []
    seen, order, frontier = {root}, [root], [root]
    while frontier:
        nxt = []
        for node in frontier:
            for child, _ in node.next_functions:
                if child is not None and child not in seen:
                    seen.add(child)
                    order.append(child)
                    nxt.append(child)
        frontier = nxt
    return order


def graph_stats(model: nn.Module, forward, batch) -> dict[str, Any]:
    """Build the graph of one batch (`forward(batch)` returns the loss) and measure it, without backward."""
    with SavedTensors(parameter_storages(model)) as saved:
        loss = forward(batch)
    return {
        "shapes": shape_signature(batch),
        "nodes": len(autograd_nodes(loss.grad_fn)),
        "saved_bytes": saved.nbytes,
        "saved_tensors": saved.tensors,
    }


# ------------------------------------------------------------------------------------------- FLOPs


def _linear_macs(layer: nn.Linear) -> int:
    return layer.in_features * layer.out_features


def _attention_macs(attn: nn.Module, batch: int, q_len: int, kv_len: int) -> int:
    d = attn.q_proj.out_features
    proj = batch * q_len * (_linear_macs(attn.q_proj) + _linear_macs(attn.out_proj))
    proj += batch * kv_len * _linear_macs(attn.kv_proj)
    # scores Q K^T and the weighted sum of V, counted in full (no halving for the causal mask)
    return proj + 2 * batch * q_len * kv_len * d


def _ff_macs(ff: nn.Sequential, tokens: int) -> int:
    return tokens * sum(_linear_macs(m) for m in ff if isinstance(m, nn.Linear))


def transformer_flops(model: nn.Module, shapes) -> int:
    """Training FLOPs of one padded batch through dgtrain's transformer: the matrix products of the
    forward pass (2 FLOPs per multiply-add) times 3 for forward + backward. Embedding lookups,
    layer norms and softmax are left out, as is usual for model FLOPs. `shapes`: the batch's shapes."""
    if model.arch == "decoder":
        b, t = shapes[0]
        s = 0
    else:
        b, s = shapes[0]
        t = shapes[1][1] - 1  # the decoder reads the target without its last token
    macs = 0
    for block in getattr(model, "encoder", None) or ():
        macs += _attention_macs(block.attn, b, s, s) + _ff_macs(block.ff, b * s)
    for block in model.decoder:
        macs += _attention_macs(block.self_attn, b, t, t) + _ff_macs(block.ff, b * t)
        if block.cross_attn is not None:
            macs += _attention_macs(block.cross_attn, b, t, s)
    macs += b * t * _linear_macs(model.head)
    return 6 * macs


def flops_counter(model: nn.Module):
    """A function (the batch's shapes) -> training FLOPs, for the models whose FLOPs dgtrain knows."""
    from dgtrain.models.transformer import Transformer

    if isinstance(model, Transformer):
        by_shapes: dict[tuple, int] = {}  # walking the modules costs ~0.1 ms; a batch's shapes decide it

        def count(shapes: tuple) -> int:
            if shapes not in by_shapes:
                by_shapes[shapes] = transformer_flops(model, shapes)
            return by_shapes[shapes]

        return count
    return None


# --------------------------------------------------------------------------------- the loop's probe


class Telemetry:
    """Called by `fit` around each micro-batch's forward and backward and after each optimizer step;
    `metrics()` on logging steps returns the figures for the metrics dict (every logger sees them)."""

    PHASES = ("fwd", "bwd", "opt")

    def __init__(
        self,
        cfg: Any,
        model: nn.Module,
        device: torch.device,
    ):
        self.enabled = bool(cfg.enabled)
        self.graph_every = int(cfg.graph_every)
        if self.graph_every < 1:
            raise DgtrainError(f"telemetry.graph_every={self.graph_every}: must be at least 1.")
        self.model, self.device = model, device
        self.cuda = device.type == "cuda"
        self.peak_tflops = peak_tflops(device, cfg.get("peak_tflops"))
        self.count_flops = flops_counter(model) if self.enabled else None
        if self.count_flops and self.cuda and self.peak_tflops is None:
            log.info(
                f"perf/mfu not reported: no peak throughput known for {torch.cuda.get_device_name(device)}; "
                "set telemetry.peak_tflops=<dense bf16 TFLOP/s> to report it."
            )
        self.step = 0  # optimizer steps completed
        self.micro = 0  # micro-batches of the current step begun
        self.signatures: dict[tuple, int] = {}  # batch shapes -> micro-batches seen
        self.flops = 0  # training FLOPs since the last log
        self._counter: SavedTensors | None = None  # set while a sampled forward runs
        self._sampled_shapes = ""
        self._graph: dict[str, Any] | None = None  # the latest sample, until it is logged
        self.first_graph: dict[str, Any] | None = None
        self.largest_graph: dict[str, Any] | None = None
        self._probing = False
        self._phase_peak: dict[str, int] = {}  # CUDA: bytes, per phase, since the last log
        self._interval_peaks: dict[
            str, int
        ] = {}  # CUDA: allocated/active/reserved peaks read at probes, this interval

    # -- per micro-batch ------------------------------------------------------------------------

    def forward(self, batch) -> Any:
        """`with telemetry.forward(batch):` wraps one micro-batch's forward pass. Per step this is
        bookkeeping on the host: the shapes (a tuple of torch.Size, formatted only for reports) and,
        for the transformer, a FLOPs look-up by shape. Returns a do-nothing context unless this
        micro-batch is sampled (its graph measured) or probed (CUDA memory per phase)."""
        if not self.enabled:
            return NO_CONTEXT
        first_micro = self.micro == 0
        self.micro += 1
        shapes = tuple([t.shape for t in batch])
        self.signatures[shapes] = self.signatures.get(shapes, 0) + 1
        if self.count_flops is not None:
            self.flops += self.count_flops(shapes)
        if first_micro and (self.step == 0 or (self.step + 1) % self.graph_every == 0):  # a sampled step
            self._counter = SavedTensors(parameter_storages(self.model))
            self._sampled_shapes = format_shapes(shapes)
            # CUDA: its phases' peaks too (allocator reads cost tens of us: too much for every step)
            self._probing = self.cuda
        if self._probing:
            self._mark(None)  # what the data transfer allocated before the forward
            return self
        return self if self._counter is not None else NO_CONTEXT

    def __enter__(self) -> Telemetry:
        if self._counter is not None:
            self._counter.__enter__()  # saved-tensor hooks on: this forward is sampled
        return self

    def __exit__(self, *exc) -> None:
        if self._counter is not None:
            self._counter.__exit__(*exc)
        if self._probing:
            self._mark("fwd")

    def after_forward(self, loss: torch.Tensor) -> None:
        """On sampled steps, walk the graph the forward just built (before backward frees it)."""
        if self._counter is None:
            return
        c, self._counter = self._counter, None
        g = {
            "step": self.step + 1,
            "shapes": self._sampled_shapes,
            "nodes": len(autograd_nodes(loss.grad_fn)),
            "saved_mb": c.nbytes / MB,
            "saved_tensors": c.tensors,
        }
        self._graph = g
        self.first_graph = self.first_graph or g
        if self.largest_graph is None or g["saved_mb"] > self.largest_graph["saved_mb"]:
            self.largest_graph = g

    def after_backward(self) -> None:
        if self._probing:
            self._mark("bwd")

    def after_step(self) -> None:
        """After the optimizer step (and zero_grad)."""
        if self._probing:
            self._mark("opt")
            self._probing = False
        self.step += 1
        self.micro = 0

    def _mark(self, phase: str | None) -> None:
        """CUDA: fold the allocator's peaks since the previous mark into `phase` and the interval, reset."""
        peaks = cuda_peak_bytes(self.device)
        for k, v in peaks.items():
            self._interval_peaks[k] = max(self._interval_peaks.get(k, 0), v)
        if phase is not None:
            self._phase_peak[phase] = max(self._phase_peak.get(phase, 0), peaks["allocated"])
        torch.cuda.reset_peak_memory_stats(self.device)

    # -- logging steps --------------------------------------------------------------------------

    def metrics(self, seconds: float, tokens: int | None) -> dict[str, float]:
        """Memory (peaks reset), the latest graph sample, FLOPs and MFU since the last log."""
        out = memory_metrics(self.device, earlier_peaks=self._interval_peaks)
        self._interval_peaks = {}
        for phase in self.PHASES:
            if phase in self._phase_peak:
                out[f"mem/cuda_peak_{phase}_mb"] = self._phase_peak[phase] / MB
        self._phase_peak = {}
        if not self.enabled:
            return out
        if self._graph is not None:
            out["graph/nodes"] = self._graph["nodes"]
            out["graph/saved_mb"] = self._graph["saved_mb"]
            self._graph = None
        out["graph/distinct_shapes"] = len(self.signatures)
        if self.flops and tokens:
            out["perf/flops_per_token"] = self.flops / tokens
        if self.flops and self.peak_tflops and seconds > 0:
            out["perf/mfu"] = self.flops / seconds / (self.peak_tflops * 1e12)
        self.flops = 0
        return out

    def summary(self) -> dict[str, Any]:
        """For summary.json and the console's final table."""
        if not self.enabled:
            return {"enabled": False}
        return {
            "enabled": True,
            "graph_every": self.graph_every,
            "distinct_shapes": len(self.signatures),
            "common_shapes": [
                {"shapes": format_shapes(s), "batches": n} for s, n in Counter(self.signatures).most_common(5)
            ],
            "first_graph": self.first_graph,
            "largest_graph": self.largest_graph,
            "peak_tflops": self.peak_tflops,
        }
