"""A trained run, loaded for use: the one path `dgtrain eval`, `sample`, `predict`, `export` and `explain`
take from a run dir, a checkpoint or a `model.safetensors` to a model with its weights.

The stored config is untrusted: it passes the `_target_` allow-list (`checkpoint.check_stored_config`)
before anything is imported or built, and its own `allowed_targets` are ignored.

`data_info.json`, written into the run dir when training starts, keeps what inference needs from the
data and cannot recompute from a new file: the vocabulary of a text run, the standardisation of the
features and targets, the image normalisation, the class and feature names.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dgtrain.errors import DgtrainError

DATA_INFO_FILE = "data_info.json"
log = logging.getLogger("dgtrain")


def _plain(v: Any) -> Any:
    """JSON-ready: tensors and arrays become (nested) lists, tuples lists; other objects are dropped."""
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if v is None or isinstance(v, str | int | float | bool):
        return v
    return None


def data_info_dict(info) -> dict[str, Any]:
    """A `DataInfo` as plain JSON data (its `extra` included)."""
    from dataclasses import asdict

    d = asdict(info)
    d["in_shape"] = list(info.in_shape)
    d["extra"] = _plain(info.extra)
    return d


def write_data_info(run_dir: Path | str, info) -> Path:
    """`<run_dir>/data_info.json`, atomically (training calls this once the data is built)."""
    from dgtrain.checkpoint import atomic_write

    text = json.dumps(data_info_dict(info), indent=1) + "\n"
    return atomic_write(Path(run_dir) / DATA_INFO_FILE, lambda f: f.write(text.encode()))


def read_data_info(candidates: list[Path]) -> dict[str, Any] | None:
    for d in candidates:
        f = d / DATA_INFO_FILE
        if f.is_file():
            try:
                return json.loads(f.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise DgtrainError(
                    f"{f}: unreadable ({e}); delete it to fall back to rebuilding the data."
                ) from e
    return None


def resolve_source(source: Path) -> tuple[dict[str, Any], str, Any, Path | None]:
    """(stored config, description of the weights, weights, run dir) where weights is a state dict or a
    path; the run dir is where the run's files (data_info.json) are, when known."""
    from omegaconf import OmegaConf

    from dgtrain import checkpoint as ckpt_io

    def run_config(d: Path) -> dict[str, Any]:
        f = d / "config.yaml"
        if not f.is_file():
            raise DgtrainError(
                f"{d}: no config.yaml next to the weights; give a checkpoint (.pt) of the run instead."
            )
        try:
            cfg = OmegaConf.to_container(OmegaConf.load(f), resolve=False)
        except Exception as e:  # noqa: BLE001 - YAML and OmegaConf raise many kinds for a damaged file
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise DgtrainError(
                f"{f}: not a readable config ({reason}); give a checkpoint (.pt) of the run instead, "
                "which holds its own copy of the config."
            ) from None
        if not isinstance(cfg, dict):
            raise DgtrainError(
                f"{f}: not a run's config (a YAML mapping); give a checkpoint (.pt) of the run instead."
            )
        return cfg

    def weights_of(state: dict[str, Any]) -> Any:  # an FSDP checkpoint's shards are read later, by path
        return Path(state["sharded"]) if state.get("sharded") else state["model"]

    def run_dir_of_folder(folder: Path) -> Path:
        """The run dir of a folder of checkpoints; "." (a command run inside checkpoints/) by its real name."""
        named = Path(os.path.abspath(folder)) if folder.name in ("", ".", "..") else folder
        return named.parent if named.name == "checkpoints" else folder

    def run_dir_of(ckpt: Path) -> Path:
        return run_dir_of_folder(ckpt.parent)

    if not source.exists():
        raise DgtrainError(f"{source}: no such file or directory; give a run dir, a checkpoint or weights.")
    if source.is_dir() and source.suffix == ".dcp":  # one FSDP checkpoint directory (docs/distributed.md)
        state = ckpt_io.load(source)
        return state["config"], f"{source} (step {state['step']})", weights_of(state), run_dir_of(source)
    if source.is_dir():
        if ckpt_io.final_weights_current(source):  # else a resumed run went on past it: its newest checkpoint
            w = source / "model.safetensors"
            return run_config(source), str(w), w, source
        d = ckpt_io.run_checkpoint_dir(source)  # RUN_DIR/checkpoints, the run's checkpoint.dir, or source
        found = ckpt_io.newest_valid(d, f"dgtrain {source}")
        if found is None and (source / "model.safetensors").is_file():  # the checkpoints are unreadable
            w = source / "model.safetensors"
            return run_config(source), str(w), w, source
        if found is None:
            raise DgtrainError(f"{source}: no model.safetensors and no checkpoint (step_*.pt) to load.")
        path, state = found
        run_dir = source if d != source else run_dir_of_folder(source)  # RUN_DIR, or a checkpoints folder
        return state["config"], f"{path} (step {state['step']})", weights_of(state), run_dir
    if source.suffix == ".safetensors":
        return run_config(source.parent), str(source), source, source.parent
    state = ckpt_io.load(source)
    return state["config"], f"{source} (step {state['step']})", weights_of(state), run_dir_of(source)


@dataclass
class LoadedRun:
    source: Path
    weights_name: str
    run_dir: Path | None
    cfg: Any  # the validated DictConfig
    setup: Any  # dgtrain.train.Setup: device, data, task, model (eval mode), loss, loaders
    info: dict[str, Any]  # data_info.json, or the rebuilt data's DataInfo when the run has none

    @property
    def model(self):
        return self.setup.model

    @property
    def device(self):
        return self.setup.device

    @property
    def extra(self) -> dict[str, Any]:
        return self.info.get("extra") or {}


def load_run(
    source: Path | str, device: str = "auto", allow: tuple[str, ...] = (), data: bool = True
) -> LoadedRun:
    """Rebuild the model from the stored config (after the allow-list) and load the weights into it.

    data=False: when the run stored its data_info.json, the model is sized from it and the training data
    is not built at all (so `predict` and `sample` work after the training files are gone); the
    Setup then has no data and no loaders."""
    from omegaconf import OmegaConf

    from dgtrain import checkpoint as ckpt_io
    from dgtrain.config import allowed_targets_problems
    from dgtrain.validation import check_config, device_spec_ok

    source = Path(source)
    # the command's own options first, so that their problems are not blamed on the stored config
    device = str(device)
    if not device_spec_ok(device):
        raise DgtrainError(f"--device={device}: expected auto, cpu, cuda or cuda:N.")
    refused = allowed_targets_problems(allow, option="--allow-target")
    if refused:
        raise DgtrainError(refused[0])
    config, weights_name, weights, run_dir = resolve_source(source)
    ckpt_io.check_stored_config(config, tuple(allow), source)  # before anything is imported or built
    cfg = OmegaConf.create(config)
    cfg.allowed_targets = list(allow)  # the stored list is not trusted
    cfg.device = device
    cfg.init_from = None  # the run's own weights are loaded; its fine-tuning source may be gone
    if run_dir is not None:
        rebase_data_paths(cfg, run_dir)
    try:
        check_config(cfg)
    except DgtrainError as e:
        raise DgtrainError(f"{source}: the stored config does not validate: {e}") from None

    stored = read_data_info([run_dir]) if run_dir is not None else None
    s = _setup_from_info(cfg, stored) if stored is not None and not data else None
    if s is None:
        from dgtrain.train import setup

        s = setup(cfg)
    from safetensors import SafetensorError

    try:
        if isinstance(weights, Path) and weights.is_dir():  # FSDP shards, gathered into one process
            from dgtrain.distributed import load_sharded

            load_sharded(weights, s.model, None)
        elif isinstance(weights, Path):
            from safetensors.torch import load_model

            load_model(s.model, str(weights), device=str(s.device))
        else:
            s.model.load_state_dict(weights)
    except SafetensorError as e:  # a damaged file (before the model is touched)
        raise DgtrainError(
            f"{weights_name}: not a readable safetensors file, truncated or corrupt ({str(e)[:200]}). "
            "Give one of the run's checkpoints (.pt) instead."
        ) from None
    except (RuntimeError, ValueError, KeyError) as e:
        raise DgtrainError(
            f"{weights_name}: the weights do not fit the model its config builds ({str(e).splitlines()[0][:200]})."
        ) from None
    s.model.eval()
    info = stored or data_info_dict(s.data.info)
    return LoadedRun(source, weights_name, run_dir, cfg, s, info)


DATA_PATH_KEYS = ("path", "root", "test_root", "train_path", "val_path", "meta_path")


def rebase_data_paths(cfg, run_dir: Path) -> None:
    """A stored config's relative data paths (data.path=reg.csv) are relative to the folder the run was
    started from. A command run from another folder finds them there, when they do not exist from here."""
    from dgtrain.checkpoint import launch_dir

    base = launch_dir(run_dir)
    data = cfg.get("data")
    if base is None or not hasattr(data, "get"):
        return
    for key in DATA_PATH_KEYS:
        value = data.get(key)
        if not isinstance(value, str) or not value or "${" in value:
            continue
        p = Path(value).expanduser()
        if p.is_absolute() or p.exists() or not (base / p).exists():
            continue
        data[key] = str(base / p)
        log.info(f"data.{key}={value}: read from {data[key]}, relative to the folder the run started in")


def _setup_from_info(cfg, stored: dict[str, Any]):
    """A Setup without data: the model sized from the stored DataInfo, the task and its loss."""
    from dataclasses import fields

    import torch

    from dgtrain.config import allowed_prefixes
    from dgtrain.data import DataInfo
    from dgtrain.losses import build_loss
    from dgtrain.tasks import make_task
    from dgtrain.train import Setup, build_model, resolve_device

    known = {f.name for f in fields(DataInfo)}  # a file from another dgtrain version may hold other keys
    info = DataInfo(**{k: v for k, v in stored.items() if k in known})
    info.in_shape = tuple(stored.get("in_shape") or ())
    allowed = allowed_prefixes(cfg)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, info, allowed).to(device)
    loss_fn = build_loss(cfg.loss, allowed, info.task, info.pad_id)
    return Setup(device, None, make_task(info.task, info.pad_id), model, loss_fn, None, None)


def out_dir(run: LoadedRun, name: str) -> Path:
    """`<run_dir>/<name>`, or next to the source when the run dir is unknown."""
    base = run.run_dir or (run.source if run.source.is_dir() else run.source.parent)
    return Path(base) / name
