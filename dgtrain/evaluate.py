"""`dgtrain eval RUN_DIR|CHECKPOINT [--split val|test]`: rebuild the model from the stored, resolved
config (dgtrain/runs.py) and score the validation split (carved from the training data: what the run
selected on) or the data's held-out test set (mnist, cifar10, image_folder with data.test_root). The
stored config passes the same `_target_` allow-list as a live one, with one
difference: its own `allowed_targets` are ignored (a file cannot widen the list); add trusted prefixes
with `--allow-target`."""

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
        description="Evaluate a run's final weights (model.safetensors) or a checkpoint on the validation "
        "split (carved from the training data) or the held-out test set.",
    )
    p.add_argument(
        "source",
        help="a run directory (its model.safetensors, else its newest valid checkpoint), "
        "a checkpoint file (.pt) or a weights file (.safetensors, config from its directory)",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    p.add_argument(
        "--split",
        choices=("val", "test"),
        default="val",
        help="val: the validation split the run selected on (default); test: the data's official held-out "
        "test set (mnist t10k, cifar10 test_batch, image_folder data.test_root), metrics named test/...",
    )
    p.add_argument("--batches", type=int, default=None, help="cap on evaluation batches (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.add_argument(
        "--allow-target",
        action="append",
        default=[],
        metavar="PREFIX",
        help="a trusted module prefix the stored config may name in `_target_` (repeatable)",
    )
    return p


def evaluate_split(s: Any, autocast: Any, split: str, batches: int | None = None) -> dict[str, float]:
    """Metrics of `s.model` on one split of `s.data`: val/... for "val", test/... for "test"."""
    import dataclasses

    from dgtrain.data import make_loader
    from dgtrain.train import evaluate

    if split == "val":
        return evaluate(s, autocast, batches)
    if s.data.test is None:
        raise DgtrainError(
            "--split test: this data has no held-out test set (mnist, cifar10 and image_folder with "
            "data.test_root have one); its validation split is all there is: use --split val."
        )
    bs = s.val_loader.batch_sampler.batch_size
    loader = make_loader(s.data.test, bs, shuffle=False, seed=0, pin_memory=s.device.type == "cuda")
    metrics = evaluate(dataclasses.replace(s, val_loader=loader), autocast, batches)
    return {"test/" + k.split("/", 1)[1]: v for k, v in metrics.items()}


def evaluate_source(
    source: Path,
    device: str = "auto",
    batches: int | None = None,
    allow: tuple[str, ...] = (),
    split: str = "val",
) -> dict[str, Any]:
    import torch

    from dgtrain.runs import load_run
    from dgtrain.train import autocast_for, precision_of

    run = load_run(source, device, allow)
    s = run.setup
    with torch.no_grad():
        metrics = evaluate_split(s, autocast_for(s.device, precision_of(run.cfg)), split, batches)
    monitor = s.task.monitor if split == "val" else "test/" + s.task.monitor.split("/", 1)[1]
    return {
        "source": str(source),
        "weights": run.weights_name,
        "device": str(s.device),
        "split": split,
        "examples": len(s.data.val if split == "val" else s.data.test),
        "val_examples": len(s.data.val),
        "monitor": {"metric": monitor, "mode": s.task.mode, "value": metrics.get(monitor)},
        "metrics": metrics,
    }


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.batches is not None and args.batches < 1:
        raise DgtrainError(f"--batches={args.batches}: must be a positive integer.")
    result = evaluate_source(
        Path(args.source), args.device, args.batches, tuple(args.allow_target), split=args.split
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    out = sys.stdout
    out.write(f"weights  {result['weights']}\n")
    what = "validation" if result["split"] == "val" else "test"
    out.write(f"device   {result['device']} | {result['examples']} {what} examples\n")
    for k, v in result["metrics"].items():
        out.write(f"{k:<12} {v:.6g}\n")
    return 0
