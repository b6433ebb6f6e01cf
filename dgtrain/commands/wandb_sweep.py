"""`dgtrain wandb-sweep PRESET [-o FILE] [-p KEY=EXPR ...] [overrides ...]`: write a W&B sweep config from
a sweep preset (the translation is dgtrain/wandb_sweep.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dgtrain.wandb_sweep import presets, to_yaml, wandb_sweep_config


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dgtrain wandb-sweep",
        description="Write a W&B sweep config (for `wandb sweep` / `wandb agent`) from a sweep preset.",
    )
    p.add_argument("preset", help=f"a preset in configs/sweep ({', '.join(presets())})")
    p.add_argument("-o", "--output", type=Path, help="write here instead of standard output")
    p.add_argument("--method", default="bayes", help="bayes (default), random or grid")
    p.add_argument(
        "--logger", default="wandb", help="logger option the trials use (default: wandb; '' for none)"
    )
    p.add_argument(
        "-p",
        "--param",
        action="append",
        default=[],
        metavar="KEY=EXPR",
        help="add or replace a parameter, e.g. 'model=choice(mlp,convnet)' (repeatable)",
    )
    p.add_argument(
        "overrides", nargs="*", help="fixed Hydra overrides every trial gets, e.g. trainer.max_epochs=3"
    )
    args = p.parse_intermixed_args(argv)
    config = wandb_sweep_config(args.preset, args.method, args.logger or None, args.param, args.overrides)
    text = to_yaml(config, args.preset)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)
        print(f"wrote {args.output}: {len(config['parameters'])} parameters; next: wandb sweep {args.output}")
    else:
        sys.stdout.write(text)
    return 0
