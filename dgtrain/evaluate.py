"""Scoring saved weights (`dgtrain eval RUN_DIR|CHECKPOINT`, dgtrain/commands/eval.py): rebuild the model
from the stored, resolved config (dgtrain/runs.py) and score the validation split. The stored config passes
the same `_target_` allow-list as a live one, with one difference: its own `allowed_targets` are ignored (a file cannot widen the list); add trusted prefixes
with `--allow-target`."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def evaluate_source(
    source: Path, device: str = "auto", batches: int | None = None, allow: tuple[str, ...] = ()
) -> dict[str, Any]:
    import torch

    from dgtrain.runs import load_run
    from dgtrain.train import autocast_for, evaluate, precision_of

    run = load_run(source, device, allow)
    s = run.setup
    with torch.no_grad():
        metrics = evaluate(s, autocast_for(s.device, precision_of(run.cfg)), batches)
    return {
        "source": str(source),
        "weights": run.weights_name,
        "device": str(s.device),
        "val_examples": len(s.data.val),
        "monitor": {"metric": s.task.monitor, "mode": s.task.mode, "value": metrics.get(s.task.monitor)},
        "metrics": metrics,
    }
