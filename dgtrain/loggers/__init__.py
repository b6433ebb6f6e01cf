"""Metric sinks. Every sink implements the small `MetricLogger` protocol; `metrics.jsonl` is always on,
the others (`configs/logger/*`) are chosen with `logger=`."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Protocol

# The statuses of a run that trained to its end (its summary.json `status`): a success for sinks and sweeps.
FINISHED = ("completed", "early_stopped")


class MetricLogger(Protocol):
    def log_config(self, config: dict[str, Any]) -> None: ...

    def log_metrics(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self, summary: dict[str, Any], status: str) -> None: ...


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "nan" / "inf": JSON has no literal for these
    return v


class JsonlLogger:
    """One JSON object per logged step in `<run_dir>/metrics.jsonl`, flushed on every write."""

    def __init__(self, run_dir: Path, filename: str = "metrics.jsonl", append: bool = False):
        self.path = Path(run_dir) / filename
        # A resumed run continues the file (trimmed to its checkpoint); a fresh run into a used
        # directory starts a new one, so its rows never mix with an earlier run's.
        self._f = self.path.open("a" if append else "w", encoding="utf-8")

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        text = json.dumps({"step": step, **metrics})
        if "NaN" in text or "Infinity" in text:  # rare: a value JSON cannot hold, written as a string
            text = json.dumps({"step": step, **{k: _json_safe(v) for k, v in metrics.items()}})
        self._f.write(text + "\n")
        self._f.flush()

    def close(self, summary: dict[str, Any], status: str) -> None:
        self._f.close()


def sink_parameters(node: Any, allowed: tuple[str, ...]) -> set[str]:
    """The argument names the `_target_` of a logger node takes (sinks that keep files take `run_dir`,
    those that must not repeat steps after a resume take `resume_step`)."""
    import inspect

    from dgtrain.config import locate

    target = node.get("_target_") if hasattr(node, "get") else None
    if target is None:
        return set()
    factory = locate(target, allowed, key="logger._target_")
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return set()
    factory = locate(target, allowed, key="logger._target_")
    try:
        return "run_dir" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False
