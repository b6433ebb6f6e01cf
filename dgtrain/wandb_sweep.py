"""A W&B sweep config from a sweep preset (configs/sweep/PRESET.yaml); `dgtrain wandb-sweep PRESET`
(dgtrain/commands/wandb_sweep.py) writes it.

The W&B agent starts one ordinary dgtrain run per trial. Its command line is
    ${env} ${interpreter} -m dgtrain sweep=PRESET logger=wandb ${args_no_hyphens}
where `sweep=PRESET` brings the preset's fixed settings (model, data, sweep.metric, epochs) and
`${args_no_hyphens}` expands to Hydra overrides `key=value`, one per W&B parameter; a parameter named
after a config group (`model`, `optimizer`, `data`) therefore switches the group, like `model=convnet`.
The search space comes from the preset's `hydra.sweeper.params` (Hydra's sweep syntax):
    choice(a, b)              -> values: [a, b]
    interval(a, b)            -> distribution: uniform (int(interval(a, b)): int_uniform)
    tag(log, interval(a, b))  -> distribution: log_uniform_values
    range(a, b, step)         -> values: [a, a+step, ...]
Nothing here talks to W&B: `wandb sweep FILE` registers the sweep, `wandb agent ID` runs it.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from dgtrain.errors import DgtrainError
from dgtrain.paths import config_dir
from dgtrain.sweep import natural_direction

METHODS = ("bayes", "random", "grid")


def presets() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "sweep").glob("*.yaml"))


def load_preset(name: str) -> Any:
    path = config_dir() / "sweep" / f"{name}.yaml"
    if not path.is_file():
        raise DgtrainError(
            f"no sweep preset {name!r} ({path} does not exist). Available presets: "
            f"{', '.join(presets()) or 'none'}."
        )
    return OmegaConf.load(path)


def parameter_spec(key: str, expr: str) -> dict[str, Any]:
    """One W&B parameter from one Hydra sweep expression (`choice(...)`, `interval(...)`, ...)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    try:
        override = OverridesParser.create().parse_override(f"{key}={expr}")
    except Exception as e:
        raise DgtrainError(f"hydra.sweeper.params.{key}={expr!r} is not a Hydra sweep expression: {e}") from e
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return {"values": [_plain(v) for v in value.list]}
    if isinstance(value, RangeSweep):
        return {"values": [_plain(v) for v in override.sweep_iterator()]}
    if isinstance(value, IntervalSweep):
        lo, hi = value.start, value.end
        ints = isinstance(lo, int) and isinstance(hi, int)  # int(interval(a, b)), as for Optuna
        if "log" in value.tags:
            if ints:
                return {"distribution": "q_log_uniform_values", "min": lo, "max": hi, "q": 1}
            return {"distribution": "log_uniform_values", "min": float(lo), "max": float(hi)}
        if ints:
            return {"distribution": "int_uniform", "min": lo, "max": hi}
        return {"distribution": "uniform", "min": float(lo), "max": float(hi)}
    return {"value": _plain(value)}


def _plain(v: Any) -> Any:
    return v if isinstance(v, (int, float, bool)) or v is None else str(v)


def wandb_sweep_config(
    preset: str,
    method: str = "bayes",
    logger: str | None = "wandb",
    extra_params: list[str] = (),
    overrides: list[str] = (),
) -> dict[str, Any]:
    if method not in METHODS:
        raise DgtrainError(f"--method {method!r}: expected one of {', '.join(METHODS)}.")
    cfg = load_preset(preset)
    metric = OmegaConf.select(cfg, "sweep.metric")
    if not metric:
        raise DgtrainError(
            f"preset {preset!r} sets no sweep.metric; W&B needs the metric's name. Add `sweep: {{metric: "
            "val/acc, direction: maximize}` to the preset."
        )
    direction = OmegaConf.select(cfg, "sweep.direction") or natural_direction(str(metric))
    params = {str(k): str(v) for k, v in (OmegaConf.select(cfg, "hydra.sweeper.params") or {}).items()}
    for item in extra_params:
        key, sep, expr = item.partition("=")
        if not sep or not key:
            raise DgtrainError(
                f"--param {item!r}: expected KEY=EXPR, e.g. --param 'model=choice(mlp,convnet)'."
            )
        params[key] = expr
    if not params:
        raise DgtrainError(f"preset {preset!r} has no hydra.sweeper.params and no --param was given.")
    parameters = {k: parameter_spec(k, v) for k, v in params.items()}
    if method == "grid":
        continuous = [k for k, p in parameters.items() if "distribution" in p]
        if continuous:
            raise DgtrainError(
                f"--method grid needs discrete parameters; {', '.join(continuous)} are continuous "
                "(use choice(...) for them, or --method bayes/random)."
            )
    command = ["${env}", "${interpreter}", "-m", "dgtrain", f"sweep={preset}"]
    if logger:
        command.append(f"logger={logger}")
    command += [*overrides, "${args_no_hyphens}"]
    config: dict[str, Any] = {
        "name": preset,
        "method": method,
        # dgtrain's W&B sink puts the best value of each validation metric in the run summary as
        # best/<metric>: the same number a Hydra or Optuna sweep optimises (the final value may be worse).
        "metric": {
            "name": f"best/{metric}",
            "goal": "maximize" if str(direction) == "maximize" else "minimize",
        },
        "parameters": parameters,
        "command": command,
    }
    n_trials = OmegaConf.select(cfg, "hydra.sweeper.n_trials")
    if n_trials and method != "grid":
        config["run_cap"] = int(n_trials)
    return config


def to_yaml(config: dict[str, Any], preset: str) -> str:
    header = (
        f"# W&B sweep written by `dgtrain wandb-sweep {preset}` from configs/sweep/{preset}.yaml.\n"
        "# Register it with `wandb sweep THIS_FILE`, then run trials with `wandb agent ENTITY/PROJECT/ID`.\n"
        "# Each trial is `dgtrain sweep=PRESET ... key=value ...`: parameters are Hydra overrides, and a\n"
        "# parameter named after a config group (model, optimizer, data) switches the group.\n"
    )
    return header + OmegaConf.to_yaml(OmegaConf.create(config))
