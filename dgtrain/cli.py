"""`dgtrain [overrides]` trains (Hydra); `dgtrain <subcommand> ...` runs one of the tools below.

Heavy imports (torch, the training code) happen only once a command needs them, so `--help` and
`--cfg job` answer quickly.
"""

from __future__ import annotations

import logging
import sys

from dgtrain.errors import DgtrainError

log = logging.getLogger("dgtrain")

# name -> "module:function"; each function takes the remaining argv and returns an exit code.
SUBCOMMANDS: dict[str, str] = {
    "eval": "dgtrain.evaluate:main",
    "explain": "dgtrain.commands.explain:main",
    "export": "dgtrain.commands.export:main",
    "graph": "dgtrain.graph:main",
    "ls": "dgtrain.commands.ls:main",
    "plot": "dgtrain.plots:main",
    "predict": "dgtrain.commands.predict:main",
    "sample": "dgtrain.commands.sample:main",
    "smoke": "dgtrain.commands.smoke:main",
    "sweep-summary": "dgtrain.sweep:summary_main",
    "validate": "dgtrain.commands.validate:main",
    "wandb-sweep": "dgtrain.wandb_sweep:wandb_sweep_main",
}


def _train_task(cfg):
    """The Hydra task function: one training run in Hydra's run directory; returns the sweep objective."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        from dgtrain.sweep import run_trial

        return run_trial(cfg, hc)  # records a failed trial in its run dir, then re-raises
    try:
        from dgtrain.train import fit

        result = fit(cfg, hc.runtime.output_dir, choices=dict(hc.runtime.choices))
        if result.exit_code:
            sys.exit(result.exit_code)
        return result.objective
    except DgtrainError as e:
        log.error(str(e))
        sys.exit(e.exit_code)


def train_main() -> None:
    import hydra

    from dgtrain.config import register_schema
    from dgtrain.paths import config_dir
    from dgtrain.recipes import register_recipes

    register_schema()
    register_recipes()  # recipes/NAME.yaml -> `dgtrain recipe=NAME`
    hydra.main(config_path=str(config_dir()), config_name="train", version_base="1.3")(_train_task)()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        import importlib

        name = sys.argv[1]
        module, func = SUBCOMMANDS[name].split(":")
        try:
            code = getattr(importlib.import_module(module), func)(sys.argv[2:])
        except DgtrainError as e:
            print(f"dgtrain {name}: error: {e}", file=sys.stderr)
            code = e.exit_code
        sys.exit(code)
    train_main()
