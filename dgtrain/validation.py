"""Checks that need no data and no training: every problem in a config, reported at once."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from dgtrain.compile import parse_mode
from dgtrain.config import allowed_prefixes, find_targets, locate
from dgtrain.data import TASKS
from dgtrain.errors import DgtrainError
from dgtrain.losses import TASKS_OF
from dgtrain.paths import config_dir


@lru_cache(maxsize=1)
def option_tasks() -> dict[str, dict[str, tuple[str, ...]]]:
    """For each shipped data and model option, the tasks it handles (read from configs/ and the classes)."""
    root = config_dir()
    data = {p.stem: (str(OmegaConf.load(p).get("task")),) for p in sorted((root / "data").glob("*.yaml"))}
    models = {}
    for p in sorted((root / "model").glob("*.yaml")):
        target = (OmegaConf.load(p).get("model") or {}).get("_target_")  # model files are @package _global_
        try:
            models[p.stem] = tuple(getattr(locate(target), "tasks", TASKS))
        except DgtrainError:
            models[p.stem] = TASKS
    return {"data": data, "model": models}


def _name(choices: dict[str, str] | None, group: str, node) -> str:
    if choices and choices.get(group):
        return str(choices[group])
    return str(node.get("_target_", "?")).rsplit(".", 1)[-1]


def problems(cfg: DictConfig, choices: dict[str, str] | None = None) -> list[str]:
    out: list[str] = []
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        out.append(f"missing value(s) for {', '.join(missing)}: set them on the command line (key=value).")
    for group in ("model", "data", "loss", "optimizer", "scheduler"):
        if not isinstance(cfg.get(group), DictConfig) or "_target_" not in cfg[group]:
            out.append(
                f"`{group}` is not configured: pick one with {group}=NAME (dgtrain ls lists the options)."
            )
    if out:
        return out

    allowed = allowed_prefixes(cfg)
    for key, target in find_targets(OmegaConf.to_container(cfg, resolve=False)):
        try:
            locate(target, allowed, key=key)
        except DgtrainError as e:
            out.append(str(e))

    task = str(cfg.data.get("task"))
    model_name, data_name = _name(choices, "model", cfg.model), _name(choices, "data", cfg.data)
    if task not in TASKS:
        out.append(f"data.task={task!r} (data={data_name}): expected one of {', '.join(TASKS)}.")
    else:
        try:
            model_tasks = tuple(getattr(locate(cfg.model._target_, allowed), "tasks", TASKS))
        except DgtrainError:
            model_tasks = TASKS
        if task not in model_tasks:
            opts = option_tasks()
            fit_data = [d for d, t in opts["data"].items() if set(t) & set(model_tasks)]
            fit_models = [m for m, t in opts["model"].items() if task in t]
            out.append(
                f"model={model_name} cannot train on data={data_name}: the model learns {' or '.join(model_tasks)} "
                f"data, and data={data_name} is {task} data. Data for model={model_name}: {', '.join(fit_data)}. "
                f"Models for data={data_name}: {', '.join(fit_models)}."
            )
        loss_name = str(cfg.loss._target_).rsplit(".", 1)[-1]
        if loss_name in TASKS_OF and task not in TASKS_OF[loss_name]:
            fit = [n for n, t in TASKS_OF.items() if task in t]
            out.append(
                f"loss={loss_name} does not fit data={data_name} ({task} data); use loss={' or loss='.join(fit)}."
            )

    tc = cfg.trainer
    for key, low in (("grad_accum_steps", 1), ("log_every", 1), ("max_epochs", 1)):
        if tc[key] is not None and int(tc[key]) < low:
            out.append(f"trainer.{key}={tc[key]}: must be at least {low}.")
    for key in ("max_steps", "eval_every", "eval_batches"):
        if tc[key] is not None and int(tc[key]) < 1:
            out.append(f"trainer.{key}={tc[key]}: must be a positive integer, or null.")
    try:
        parse_mode(tc.get("compile", False))
    except DgtrainError as e:
        out.append(str(e))
    if tc.clip_grad_norm is not None and float(tc.clip_grad_norm) <= 0:
        out.append(f"trainer.clip_grad_norm={tc.clip_grad_norm}: must be positive, or null for no clipping.")
    ck = cfg.get("checkpoint") or {}
    for key in ("every", "keep_last"):
        if ck.get(key) is not None and int(ck[key]) < 1:
            out.append(f"checkpoint.{key}={ck[key]}: must be a positive integer, or null.")
    resume = cfg.get("resume")
    if resume is not None and str(resume) != "auto" and not Path(str(resume)).exists():
        out.append(f"resume={resume}: no such checkpoint file or run directory (use resume=auto or a path).")
    tel = cfg.get("telemetry")
    if tel is not None and int(tel.graph_every) < 1:
        out.append(f"telemetry.graph_every={tel.graph_every}: must be at least 1.")
    if tel is not None and tel.peak_tflops is not None and float(tel.peak_tflops) <= 0:
        out.append(f"telemetry.peak_tflops={tel.peak_tflops}: must be positive, or null for the GPU table.")
    bs = cfg.data.get("batch_size")
    if bs is None or int(bs) < 1:
        out.append(f"data.batch_size={bs}: must be a positive integer.")
    if int(cfg.data.get("num_workers", 0) or 0) < 0:
        out.append(f"data.num_workers={cfg.data.num_workers}: must be 0 or more.")
    lr = cfg.optimizer.get("lr")
    if lr is not None and float(lr) < 0:
        out.append(f"optimizer.lr={lr}: must be non-negative.")
    device = str(cfg.device)
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        out.append(f"device={device!r}: expected auto, cpu, cuda or cuda:N.")
    return out


def check_config(cfg: DictConfig, choices: dict[str, str] | None = None) -> None:
    found = problems(cfg, choices)
    if len(found) == 1:
        raise DgtrainError(found[0])
    if found:
        raise DgtrainError(f"{len(found)} problems in the config:\n" + "\n".join(f"  - {p}" for p in found))
