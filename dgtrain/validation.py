"""Checks that need no data and no training: every problem in a config, reported at once."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

from omegaconf import DictConfig, ListConfig, OmegaConf

from dgtrain.compile import parse_mode
from dgtrain.config import (
    allowed_prefixes,
    allowed_targets_problems,
    find_targets,
    locate,
    unknown_key_problems,
)
from dgtrain.data import TASKS, flag
from dgtrain.data.sequences import check_pad_to_multiple
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
    out += allowed_targets_problems(cfg.get("allowed_targets"))
    for key, target in find_targets(OmegaConf.to_container(cfg, resolve=False)):
        try:
            locate(target, allowed, key=key)
        except DgtrainError as e:
            out.append(str(e))
    out += unknown_key_problems(cfg, allowed)

    task = str(cfg.data.get("task"))
    model_name, data_name = _name(choices, "model", cfg.model), _name(choices, "data", cfg.data)
    try:  # a data function that learns several tasks says which (data=csv: regression, classification)
        data_tasks = getattr(locate(cfg.data._target_, allowed), "tasks", None)
    except DgtrainError:
        data_tasks = None
    if task not in TASKS:
        out.append(f"data.task={task!r} (data={data_name}): expected one of {', '.join(TASKS)}.")
    elif data_tasks and task not in data_tasks:
        out.append(
            f"data.task={task} (data={data_name}): this data is {' or '.join(data_tasks)}; set "
            f"data.task={' or data.task='.join(data_tasks)}."
        )
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
    for key in ("max_steps", "eval_every", "eval_batches", "sample_every"):
        if tc.get(key) is not None and int(tc[key]) < 1:
            out.append(f"trainer.{key}={tc[key]}: must be a positive integer, or null.")
    if tc.get("max_skipped") is not None and int(tc.max_skipped) < 0:
        out.append(f"trainer.max_skipped={tc.max_skipped}: must be 0 or more, or null (10% of the steps).")
    try:
        parse_mode(tc.get("compile", False))
    except DgtrainError as e:
        out.append(str(e))
    if tc.clip_grad_norm is not None and float(tc.clip_grad_norm) <= 0:
        out.append(f"trainer.clip_grad_norm={tc.clip_grad_norm}: must be positive, or null for no clipping.")
    if tc.get("overfit_batches") is not None and int(tc.overfit_batches) < 1:
        out.append(f"trainer.overfit_batches={tc.overfit_batches}: must be a positive integer, or null.")
    for key in ("limit_train_batches", "limit_val_batches"):
        v = tc.get(key)
        if v is not None and (float(v) <= 0 or (float(v) >= 1 and float(v) != int(v))):
            out.append(
                f"trainer.{key}={v}: give a whole number of batches (>= 1) or a fraction (0 < x < 1), or null."
            )
    ck = cfg.get("checkpoint") or {}
    if ck.get("save_top_k") is not None and int(ck.save_top_k) < 1:
        out.append(f"checkpoint.save_top_k={ck.save_top_k}: must be a positive integer, or null.")
    if ck.get("mode") not in (None, "min", "max"):
        out.append(f"checkpoint.mode={ck.mode}: expected min, max or null (the metric's own direction).")
    for key in ("every", "keep_last"):
        if ck.get(key) is not None and int(ck[key]) < 1:
            out.append(f"checkpoint.{key}={ck[key]}: must be a positive integer, or null.")
    resume = cfg.get("resume")
    if resume is not None and str(resume) != "auto" and not Path(str(resume)).exists():
        out.append(f"resume={resume}: no such checkpoint file or run directory (use resume=auto or a path).")
    init_from = cfg.get("init_from")
    if init_from is not None and not Path(str(init_from)).expanduser().exists():
        out.append(
            f"init_from={init_from}: no such run dir, checkpoint or safetensors file (fine-tuning starts "
            "from an existing file)."
        )
    freeze = cfg.model.get("freeze")
    if freeze is not None and not isinstance(freeze, (list, ListConfig)):
        out.append(f"model.freeze={freeze}: expected a list of globs, e.g. model.freeze=['net.*'].")
    if tc.get("sample_every") and str(cfg.data.get("_target_")) == "dgtrain.data.tokens.tokens":
        out.append(
            f"trainer.sample_every={tc.sample_every} with data=tokens: the token ids come from a tokenizer "
            "dgtrain does not keep, so it cannot turn samples into text. Drop trainer.sample_every."
        )
    tel = cfg.get("telemetry")
    if tel is not None and int(tel.graph_every) < 1:
        out.append(f"telemetry.graph_every={tel.graph_every}: must be at least 1.")
    if tel is not None and tel.peak_tflops is not None and float(tel.peak_tflops) <= 0:
        out.append(f"telemetry.peak_tflops={tel.peak_tflops}: must be positive, or null for the GPU table.")
    threads = cfg.get("threads")
    if threads is not None and int(threads) < 1:
        out.append(
            f"threads={threads}: must be at least 1 (torch intra-op threads), or null for torch's default."
        )
    bs = cfg.data.get("batch_size")
    if _whole(bs) is None or _whole(bs) < 1:
        out.append(f"data.batch_size={bs}: must be a positive integer.")
    workers = cfg.data.get("num_workers", 0)
    if workers is not None and (_whole(workers) is None or _whole(workers) < 0):
        out.append(f"data.num_workers={workers}: must be a whole number, 0 or more.")
    try:
        check_pad_to_multiple(cfg.data.get("pad_to_multiple"))
    except DgtrainError as e:
        out.append(str(e))
    resident = flag(cfg.data.get("device_resident", "auto"))
    if resident not in ("auto", "true", "false"):
        out.append(f"data.device_resident={resident}: expected auto, true or false.")
    elif resident == "true" and (_whole(workers) or 0) > 0:
        out.append(
            f"data.device_resident=true needs data.num_workers=0 (got {cfg.data.num_workers}): "
            "device-resident batches are drawn in this process. Set one of them differently."
        )
    for key, value in (
        ("trainer.tf32", cfg.trainer.get("tf32", "auto")),
        ("optimizer.fused", cfg.optimizer.get("fused", "auto")),
        ("model.channels_last", cfg.model.get("channels_last", "auto")),
    ):
        if flag(value) not in ("auto", "true", "false"):
            out.append(f"{key}={value}: expected auto, true or false.")
    if not isinstance(cfg.data.get("pin_memory", True), bool):
        out.append(f"data.pin_memory={cfg.data.pin_memory}: expected true or false.")
    lr = cfg.optimizer.get("lr")
    if lr is not None and not (_number(lr) is not None and math.isfinite(_number(lr)) and _number(lr) >= 0):
        out.append(
            f"optimizer.lr={lr}: must be a finite, non-negative number (for example optimizer.lr=0.001)."
        )
    out += optimizer_problems(cfg.optimizer)
    out += scheduler_problems(cfg.scheduler)
    out += flag_and_loss_problems(cfg)
    out += logger_problems(cfg)
    out += argument_problems(cfg)
    if not device_spec_ok(cfg.device):
        out.append(f"device={str(cfg.device)!r}: expected auto, cpu, cuda or cuda:N.")
    out.extend(_distributed_problems(cfg))
    return out


def _distributed_problems(cfg: DictConfig) -> list[str]:
    tc, out = cfg.trainer, []
    devices = tc.get("devices")
    if devices is not None and str(devices) != "auto" and not (str(devices).isdigit() and int(devices) >= 1):
        out.append(f"trainer.devices={devices!r}: expected a positive integer, auto or null (one process).")
    strategy = str(getattr(tc.get("strategy"), "value", tc.get("strategy")))
    precision = str(getattr(cfg.precision, "value", cfg.precision))
    if strategy == "fsdp" and precision == "fp16":
        out.append(
            "trainer.strategy=fsdp with precision=fp16: FSDP's mixed precision here is bf16 (no loss scaling "
            "of sharded gradients); use precision=bf16, or trainer.strategy=ddp for fp16."
        )
    if tc.get("dist_timeout_s") is not None and float(tc.dist_timeout_s) <= 0:
        out.append(f"trainer.dist_timeout_s={tc.dist_timeout_s}: must be a positive number of seconds.")
    return out


# Arguments of dgtrain's models and datasets, by name, and what they must be. Checked here, so a bad value
# is one line of the config report rather than a traceback from deep inside torch.
POSITIVE = {
    "model": (
        "hidden_size",
        "d_model",
        "n_heads",
        "n_layers",
        "d_ff",
        "max_positions",
        "channels",
        "vocab_multiple",
    ),
    "data": (
        "max_examples",
        "max_test_examples",
        "num_examples",
        "seq_len",
        "max_len",
        "min_len",
        "num_symbols",
        "num_classes",
        "image_size",
        "channels",
        "in_features",
        "out_features",
        "max_chars",
    ),
}
FRACTIONS = {"model": {"dropout": "in [0, 1)"}, "data": {"val_fraction": "in (0, 1)"}}


def _number(v) -> float | None:
    if isinstance(v, bool):
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def optimizer_problems(node: DictConfig) -> list[str]:
    """torch.optim's own bounds on the usual arguments, checked here: a bad value was an internal-error
    traceback from the optimizer's constructor (or a str/float comparison inside it)."""
    out: list[str] = []
    if not str(node.get("_target_", "")).startswith("torch.optim."):
        return out  # a user's own optimizer keeps its own rules
    for k in ("weight_decay", "momentum", "eps"):
        v = node.get(k)
        if v is not None and not (_number(v) is not None and math.isfinite(_number(v)) and _number(v) >= 0):
            out.append(f"optimizer.{k}={v}: must be a finite number, 0 or more.")
    betas = node.get("betas")
    if betas is not None:
        values = list(betas) if isinstance(betas, (list, tuple, ListConfig)) else [betas]
        if len(values) != 2 or not all(_number(b) is not None and 0 <= _number(b) < 1 for b in values):
            out.append(
                f"optimizer.betas={betas}: expected two numbers in [0, 1), e.g. optimizer.betas=[0.9,0.999]."
            )
    return out


def scheduler_problems(node: DictConfig) -> list[str]:
    """The arguments of dgtrain's schedulers (dgtrain/optim.py): text was a traceback at the first step,
    step_size=0 a division by zero, and a negative warmup silently changed the schedule."""
    out: list[str] = []
    if not str(node.get("_target_", "")).startswith("dgtrain.optim."):
        return out
    warmup, size = node.get("warmup_steps"), node.get("step_size")
    if warmup is not None and (_whole(warmup) is None or _whole(warmup) < 0):
        out.append(f"scheduler.warmup_steps={warmup}: must be a whole number of steps, 0 or more.")
    if size is not None and (_whole(size) is None or _whole(size) < 1):
        out.append(f"scheduler.step_size={size}: must be a positive whole number of steps.")
    for k, low in (("gamma", "positive"), ("min_lr_ratio", "0 or more")):
        v = node.get(k)
        x = _number(v)
        if v is not None and not (
            x is not None and math.isfinite(x) and (x > 0 if low == "positive" else x >= 0)
        ):
            out.append(f"scheduler.{k}={v}: must be a finite number, {low}.")
    return out


# On/off settings of dgtrain's models and data and of torch's optimizers: any other value was read as
# Python truth, so model.head_bias=no meant a bias.
BOOLEANS = {
    "model": ("tie_weights", "head_bias", "activation_checkpointing"),
    "data": ("augment", "hflip"),
    "optimizer": ("group_decay", "nesterov", "amsgrad", "maximize"),
}


def flag_and_loss_problems(cfg: DictConfig) -> list[str]:
    """On/off settings that are not true/false, and the loss's arguments (a traceback at the first step)."""
    out = []
    for group, names in BOOLEANS.items():
        node = cfg.get(group)
        ours = isinstance(node, DictConfig) and str(node.get("_target_", "")).startswith(
            ("dgtrain.", "torch.optim.")
        )
        for k in names if ours else ():  # a user's own model or data keeps its own rules
            if k in node and node.get(k) is not None and not isinstance(node.get(k), bool):
                out.append(f"{group}.{k}={node.get(k)!r}: expected true or false.")
    loss = cfg.get("loss")
    if isinstance(loss, DictConfig) and str(loss.get("_target_", "")).startswith("dgtrain.losses."):
        smoothing, ignore = loss.get("label_smoothing"), loss.get("ignore_index")
        x = _number(smoothing)
        if smoothing is not None and not (x is not None and 0 <= x <= 1):
            out.append(f"loss.label_smoothing={smoothing}: must be a number in [0, 1] (0: none).")
        if ignore is not None and _whole(ignore) is None:
            out.append(
                f"loss.ignore_index={ignore}: must be a whole number (a class id), or null for the padding."
            )
    return out


def _whole(v) -> int | None:
    """v as an integer when it is a whole number (not a bool, not 1.5, not text), else None."""
    x = _number(v)
    return int(x) if x is not None and math.isfinite(x) and x == int(x) else None


def argument_problems(cfg: DictConfig) -> list[str]:
    """Sizes that must be positive integers, fractions that must lie in their interval."""
    out = []
    for group, names in POSITIVE.items():
        node = cfg.get(group)
        if not isinstance(node, DictConfig):
            continue
        for k in names:
            v = node.get(k)
            values = list(v) if isinstance(v, (list, tuple)) or OmegaConf.is_list(v) else [v]
            if v is not None and not all(_whole(x) is not None and _whole(x) >= 1 for x in values):
                out.append(
                    f"{group}.{k}={v}: must be a positive integer" + (", or null." if k == "d_ff" else ".")
                )
        for k, interval in FRACTIONS[group].items():
            if k not in node:
                continue
            v, x = node.get(k), _number(node.get(k))
            low_ok = x is not None and (x >= 0 if interval.startswith("in [") else x > 0)
            if not (low_ok and x < 1):
                out.append(f"{group}.{k}={v}: must be a number {interval}.")
    return out


def logger_problems(cfg: DictConfig) -> list[str]:
    """Settings of the console and W&B sinks. The sinks open on rank 0 only, after config.yaml is written:
    checked here, every rank of a trainer.devices=N run stops alike (the others had reported a lost peer
    as an internal error)."""
    out = []
    for name, node in (cfg.get("logger") or {}).items():
        target = str(node.get("_target_", "")) if isinstance(node, DictConfig) else ""
        if target == "dgtrain.loggers.console.ConsoleLogger":
            from dgtrain.loggers.console import settings_problems

            out += settings_problems(
                node.get("mode", "auto"), node.get("plain_interval_s", 1.0), f"logger.{name}"
            )
        elif target == "dgtrain.loggers.wandb.WandbLogger":
            from dgtrain.loggers.wandb import MODES

            mode = node.get("mode")
            if mode is not None and mode not in (*MODES, "dryrun"):
                out.append(
                    f"logger.{name}.mode={mode!r}: expected one of {', '.join(MODES)}, or null to choose "
                    "online/offline from your credentials."
                )
    return out


def installed(module: str) -> bool:
    """Whether `module` can be imported, found without importing it (a heavy package stays unloaded)."""
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module set to None in sys.modules
        return False


# The package each shipped logger imports when it opens, and the extra that installs it.
LOGGER_PACKAGES = {
    "dgtrain.loggers.mlflow.MlflowLogger": ("mlflow", "mlflow"),
    "dgtrain.loggers.wandb.WandbLogger": ("wandb", "wandb"),
    "dgtrain.loggers.tensorboard.TensorBoardLogger": ("tensorboard", "tensorboard"),
}


def check_logger_packages(cfg: DictConfig) -> None:
    """A training run's loggers can import their packages. Checked before the run dir is written: the
    loggers open last, after config.yaml and data_info.json, so a missing package left a run dir of a run
    that never started. Not part of `problems`: eval, predict and sample re-check stored configs, and do
    not need the logger a run trained with. Found, not imported: every rank checks, and only rank 0's
    sinks import their (heavy) packages."""
    out = []
    for name, node in (cfg.get("logger") or {}).items():
        need = LOGGER_PACKAGES.get(str(node.get("_target_"))) if isinstance(node, DictConfig) else None
        if need is not None and not installed(need[0]):
            out.append(
                f"logger={name} needs the {need[0]} package, which is not installed (no module named "
                f"{need[0]!r}): pip install 'dgtrain[{need[1]}]' (or choose another logger, e.g. logger=csv)."
            )
    if out:
        raise DgtrainError(" ".join(out))


def device_spec_ok(device: object) -> bool:
    """`device=` (or a command's --device): auto, cpu, cuda or cuda:N, whether or not this machine has it."""
    device = str(device)
    return device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())


def check_config(cfg: DictConfig, choices: dict[str, str] | None = None) -> None:
    found = problems(cfg, choices)
    if len(found) == 1:
        raise DgtrainError(found[0])
    if found:
        raise DgtrainError(f"{len(found)} problems in the config:\n" + "\n".join(f"  - {p}" for p in found))
