"""`dgtrain eval RUN_DIR|CHECKPOINT [--split val|test]`: rebuild the model from the stored, resolved
config and score the validation split (carved from the training data: what the run selected on) or
the data's held-out test set (mnist, cifar10, image_folder with data.test_root). The stored config passes the same `_target_` allow-list as a live one, with one
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


def resolve_source(source: Path) -> tuple[dict[str, Any], str, Any]:
    """(stored config, description of the weights, weights) where weights is a state dict or a path."""
    from omegaconf import OmegaConf

    from dgtrain import checkpoint as ckpt_io

    def run_config(d: Path) -> dict[str, Any]:
        f = d / "config.yaml"
        if not f.is_file():
            raise DgtrainError(
                f"{d}: no config.yaml next to the weights; evaluate a checkpoint (.pt) instead."
            )
        cfg = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
        assert isinstance(cfg, dict)
        return cfg

    if source.is_dir():
        if (source / "model.safetensors").is_file():
            return run_config(source), str(source / "model.safetensors"), source / "model.safetensors"
        d = source / "checkpoints" if (source / "checkpoints").is_dir() else source
        found = ckpt_io.newest_valid(d, f"dgtrain eval {source}")
        if found is None:
            raise DgtrainError(f"{source}: no model.safetensors and no checkpoint (step_*.pt) to evaluate.")
        path, state = found
        return state["config"], f"{path} (step {state['step']})", state["model"]
    if source.suffix == ".safetensors":
        if not source.is_file():
            raise DgtrainError(f"{source}: no such file.")
        return run_config(source.parent), str(source), source
    state = ckpt_io.load(source)
    return state["config"], f"{source} (step {state['step']})", state["model"]


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
    from omegaconf import OmegaConf

    from dgtrain import checkpoint as ckpt_io
    from dgtrain.validation import check_config

    config, weights_name, weights = resolve_source(source)
    allowed = tuple(allow)
    ckpt_io.check_stored_config(config, allowed, source)  # before anything is imported or built
    cfg = OmegaConf.create(config)
    cfg.allowed_targets = list(allow)  # the stored list is not trusted
    cfg.device = device
    try:
        check_config(cfg)
    except DgtrainError as e:
        raise DgtrainError(f"{source}: the stored config does not validate: {e}") from None

    import torch

    from dgtrain.train import autocast_for, precision_of, setup

    s = setup(cfg)
    try:
        if isinstance(weights, Path):
            from safetensors.torch import load_model

            load_model(s.model, str(weights), device=str(s.device))
        else:
            s.model.load_state_dict(weights)
    except (RuntimeError, ValueError, KeyError) as e:
        raise DgtrainError(
            f"{weights_name}: the weights do not fit the model its config builds ({str(e).splitlines()[0][:200]})."
        ) from None
    with torch.no_grad():
        metrics = evaluate_split(s, autocast_for(s.device, precision_of(cfg)), split, batches)
    monitor = s.task.monitor if split == "val" else "test/" + s.task.monitor.split("/", 1)[1]
    return {
        "source": str(source),
        "weights": weights_name,
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
