"""`dgtrain eval RUN_DIR|CHECKPOINT [--split val|test]`: score a run's final weights or a checkpoint on the
validation split or the held-out test set (the scoring itself is dgtrain/evaluate.py)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from dgtrain.commands import add_run_options
from dgtrain.errors import DgtrainError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgtrain eval",
        description="Evaluate a run's final weights (model.safetensors) or a checkpoint on the validation "
        "split (carved from the training data) or the held-out test set.",
    )
    p.add_argument(
        "source",
        help="a run directory (its model.safetensors, else its newest valid checkpoint), "
        "a checkpoint file (.pt) or a weights file (.safetensors, config from its directory)",
    )
    p.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="val: the validation split the run selected on (default); test: the data's official held-out "
        "test set (mnist t10k, cifar10 test_batch, image_folder data.test_root), metrics named test/...",
    )
    p.add_argument("--batches", type=int, default=None, help="cap on evaluation batches (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    add_run_options(p)
    return p


def main(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    if args.batches is not None and args.batches < 1:
        raise DgtrainError(f"--batches={args.batches}: must be a positive integer.")
    from dgtrain.evaluate import evaluate_source

    result = evaluate_source(
        Path(args.source), args.device, args.batches, tuple(args.allow_target), split=args.split
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    out = sys.stdout
    out.write(f"weights  {result['weights']}\n")
    what = "validation" if result["split"] == "val" else "test"
    scored = "" if result["scored"] == result["examples"] else f"{result['scored']} of "  # --batches N
    out.write(f"device   {result['device']} | {scored}{result['examples']} {what} examples\n")
    for k, v in result["metrics"].items():
        out.write(f"{k:<12} {v:.6g}\n")
    return 0
