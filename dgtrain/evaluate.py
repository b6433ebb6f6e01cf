"""`dgtrain eval RUN_DIR|CHECKPOINT`: rebuild the model from the stored, resolved config (dgtrain/runs.py)
and score the validation split. The stored config passes the same `_target_` allow-list as a live one, with one
difference: its own `allowed_targets` are ignored (a file cannot widen the list); add your trusted
packages with `--allow-target`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from dgtrain.errors import DgtrainError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgtrain eval",
        description="Evaluate a run's final weights (model.safetensors) or a checkpoint on the validation split.",
    )
    p.add_argument(
        "source",
        help="a run directory (its model.safetensors, else its newest valid checkpoint), "
        "a checkpoint file (.pt) or a weights file (.safetensors, config from its directory)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument("--batches", type=int, default=None, help="cap on validation batches (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="PACKAGE",
        help="a trusted package of yours whose callables the stored config may name in `_target_` (repeatable)",
    )
    return p


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


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.batches is not None and args.batches < 1:
        raise DgtrainError(f"--batches={args.batches}: must be a positive integer.")
    result = evaluate_source(Path(args.source), args.device, args.batches, tuple(args.allow_target))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    out = sys.stdout
    out.write(f"weights  {result['weights']}\n")
    out.write(f"device   {result['device']} | {result['val_examples']} validation examples\n")
    for k, v in result["metrics"].items():
        out.write(f"{k:<12} {v:.6g}\n")
    return 0
