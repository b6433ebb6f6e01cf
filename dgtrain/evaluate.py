"""`dgtrain eval RUN_DIR|CHECKPOINT`: rebuild the model from the stored, resolved config and score the
validation split. The stored config passes the same `_target_` allow-list as a live one, with one
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


def evaluate_source(
    source: Path, device: str = "auto", batches: int | None = None, allow: tuple[str, ...] = ()
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

    from dgtrain.train import autocast_for, evaluate, precision_of, setup

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
        metrics = evaluate(s, autocast_for(s.device, precision_of(cfg)), batches)
    return {
        "source": str(source),
        "weights": weights_name,
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
