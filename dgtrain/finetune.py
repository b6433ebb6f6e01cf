"""Starting from trained weights (`init_from`) and freezing parameters (`model.freeze`).

`init_from` loads weights only, matched by name: no optimizer state, step, schedule or RNG, so the run
is a fresh run that starts from those weights (resume=... is for continuing the same run).
"""

from __future__ import annotations

import fnmatch
import logging
import pickle
from pathlib import Path

import torch
from omegaconf import DictConfig

from dgtrain import checkpoint as ckpt_io
from dgtrain.errors import DgtrainError

log = logging.getLogger("dgtrain")


def weights_file(path: str | Path) -> Path:
    """A run dir means its final `model.safetensors` (unless a resumed run went on past it and stopped),
    else its newest valid checkpoint."""
    p = Path(path).expanduser()
    if p.is_dir():
        if ckpt_io.final_weights_current(p):
            return p / "model.safetensors"
        ckpts = ckpt_io.newest_valid(
            ckpt_io.run_checkpoint_dir(p), "init_from"
        )  # checkpoints/, its checkpoint.dir
        if ckpts is None:
            raise DgtrainError(
                f"init_from={path}: the directory holds neither model.safetensors nor a checkpoint "
                "(checkpoints/step_*.pt). Point init_from at a run dir, a .pt checkpoint or a .safetensors file."
            )
        return ckpts[0]
    if not p.is_file():
        raise DgtrainError(
            f"init_from={path}: no such file or directory. Point it at a run dir, a .pt checkpoint or a "
            ".safetensors file."
        )
    return p


def read_weights(path: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    p = weights_file(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return p, load_file(str(p))
        except Exception as e:  # noqa: BLE001 - a damaged header or a file of another kind
            raise DgtrainError(f"init_from={p}: not a readable safetensors file ({e}).") from None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        reason = (
            "not a file torch.save wrote"  # a YAML or text file, an image, ...
            if "Unsupported operand" in str(e)
            else f"it holds Python objects other than tensors, refused unread: {ckpt_io.refused_global(e)[:200]}"
        )
        raise DgtrainError(
            f"init_from={p}: cannot be read as a weights-only checkpoint ({reason}). Point init_from at a "
            "run dir, a dgtrain checkpoint (.pt), a state dict saved with torch.save, or a .safetensors file."
        ) from None
    except Exception as e:  # noqa: BLE001 - a damaged file
        raise DgtrainError(
            f"init_from={p}: cannot be read as a weights-only checkpoint ({str(e).splitlines()[0][:200]})."
        ) from None
    if isinstance(state, dict) and state.get("format") == ckpt_io.FORMAT:
        state = state["model"]
    if not (isinstance(state, dict) and state and all(isinstance(v, torch.Tensor) for v in state.values())):
        raise DgtrainError(
            f"init_from={p}: holds neither a dgtrain checkpoint nor a state dict (name -> tensor)."
        )
    return p, state


def _aliases(model: torch.nn.Module) -> dict[str, set[str]]:
    """Names that share storage (tied weights): safetensors stores one of them only."""
    groups: dict[tuple, set[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        groups.setdefault(key, set()).add(name)
    return {n: g for g in groups.values() for n in g}


def load_init_weights(model: torch.nn.Module, path: str | Path, strict: bool = True) -> dict[str, list[str]]:
    """Copy the tensors of `path` into `model` by name. Strict: any missing, unexpected or mis-shaped
    tensor is an error listing each one; not strict: those are skipped and listed in the log."""
    p, state = read_weights(path)
    own = model.state_dict()
    aliases = _aliases(model)
    mismatched = [
        f"{k}: {tuple(state[k].shape)} in {p.name}, {tuple(v.shape)} in the model"
        for k, v in own.items()  # in the model's order
        if k in state and state[k].shape != v.shape
    ]
    unexpected = sorted(k for k in state if k not in own)
    missing = sorted(k for k in own if k not in state and not (aliases.get(k, set()) & state.keys()))
    report = {"shape_mismatch": mismatched, "missing": missing, "unexpected": unexpected}
    if strict and (mismatched or missing or unexpected):
        lines = [f"  shape mismatch  {m}" for m in mismatched]
        lines += [f"  missing         {k} (in the model, not in the file)" for k in missing]
        lines += [f"  unexpected      {k} (in the file, not in the model)" for k in unexpected]
        raise DgtrainError(
            f"init_from={p}: the weights do not fit this model ({len(lines)} tensor(s)):\n"
            + "\n".join(lines)
            + "\nTo load the tensors that fit and keep the others' fresh initialisation (a new head, "
            "for example), set init_from_strict=false."
        )
    loadable = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
    model.load_state_dict(loadable, strict=False)
    log.info(f"init_from {p}: loaded {len(loadable)} of {len(own)} tensors (weights only)")
    for what, names in report.items():
        if names:
            log.warning(f"init_from: skipped ({what.replace('_', ' ')}): {'; '.join(names)}")
    return report


def freeze(model: torch.nn.Module, patterns: list[str]) -> list[str]:
    """`requires_grad=False` for every parameter whose name matches a glob; returns the frozen names."""
    names = [n for n, _ in model.named_parameters()]
    frozen: list[str] = []
    for pat in patterns:
        hits = fnmatch.filter(names, pat)
        if not hits:
            shown = ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")
            raise DgtrainError(
                f"model.freeze: the pattern {pat!r} matches no parameter. Patterns are globs over "
                f"parameter names ({shown}); for example model.freeze=['{names[0].split('.')[0]}.*']."
            )
        frozen += [n for n in hits if n not in frozen]
    params = dict(model.named_parameters())
    for n in frozen:
        params[n].requires_grad_(False)
    return frozen


def prepare(cfg: DictConfig, model: torch.nn.Module, load_weights: bool = True) -> int:
    """Apply `init_from` (not when resuming: the checkpoint has the weights) and `model.freeze`.
    Returns the number of trainable parameters."""
    if load_weights and cfg.get("init_from"):
        load_init_weights(model, str(cfg.init_from), strict=bool(cfg.get("init_from_strict", True)))
    patterns = list(cfg.model.get("freeze") or [])
    if patterns:
        frozen = freeze(model, [str(x) for x in patterns])
        log.info(f"model.freeze: {len(frozen)} parameter tensor(s) frozen ({', '.join(frozen)})")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if trainable == 0:
        raise DgtrainError("model.freeze froze every parameter: nothing is left to train.")
    return trainable
