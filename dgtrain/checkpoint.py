"""Checkpoints: atomic writes, rotation (`keep_last`), best-by-monitor, safe loading and exact resume.

A checkpoint is one `torch.save`d dict of tensors and plain data (no pickled objects), so it loads with
`torch.load(weights_only=True)`; anything else in the file is refused, never unpickled. docs/checkpoints.md
describes what is in it and how `resume=auto|PATH` picks one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from dgtrain import __version__
from dgtrain.config import find_targets, locate
from dgtrain.errors import DgtrainError

log = logging.getLogger("dgtrain")

FORMAT = "dgtrain-checkpoint"
VERSION = 2  # 2: the loop state of dgtrain.train.LoopState (pending_losses as a list of floats)
REQUIRED = ("step", "model", "optimizer", "scheduler", "scaler", "rng", "loop", "config")
STEP_FILE = re.compile(r"^step_(\d+)\.(pt|dcp)$")  # .dcp: an FSDP checkpoint, a directory of shards
WANDB_ID_FILE = "wandb_run_id.txt"  # written into the run dir by the W&B logger, when one is used

# Keys whose change between the checkpoint's config and the resumed run's does not break exactness.
RESUME_MAY_CHANGE = (
    "resume",
    "trainer.max_steps",
    "trainer.max_epochs",
    "trainer.sample_every",  # samples draw from their own generator: the run's state is untouched
    "checkpoint.",
    "logger.",
    "device",
)


_UMASK = os.umask(0)  # read once: mkstemp creates 0600 files, checkpoints get the usual permissions
os.umask(_UMASK)


class CheckpointError(DgtrainError):
    """A checkpoint that cannot be used: missing, truncated, corrupt, unsafe or not dgtrain's."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is truncated or damaged: garbage, never worth keeping."""


# ------------------------------------------------------------------------------------ files on disk


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (the directory entry itself must reach the disk)."""
    with contextlib.suppress(OSError):  # some filesystems cannot open or fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path in `path`'s directory; once the caller has written and fsynced it, rename
    it over `path`. A crash at any point leaves either the old file or the new one under `path`, never a
    partial one; on an exception the temporary file is removed (after SIGKILL, the next resume clears it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_UMASK)
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if _disk_full(e):
            try:
                free = f"{shutil.disk_usage(path.parent).free / 2**20:.1f} MB free"
            except OSError:
                free = "free space unknown"
            raise DgtrainError(
                f"could not write {path}: the disk holding {path.parent} is full ({free}; "
                f"{str(e).splitlines()[0][:120]}). Nothing was half-written: the previous files are intact. "
                "Free some space, or choose another directory (checkpoint.dir=... or hydra.run.dir=...)."
            ) from e
        raise
    fsync_dir(path.parent)


def _disk_full(e: BaseException) -> bool:
    """No space left (or over quota): an OSError saying so, or torch.save's zip writer failing mid-file,
    which reports only that its position is wrong ("unexpected pos N vs M", "file write failed")."""
    import errno

    if isinstance(e, OSError):
        return e.errno in (errno.ENOSPC, errno.EDQUOT)
    text = str(e)
    if type(e).__name__ == "SafetensorError":  # "I/O error: No space left on device (os error 28)"
        return "os error 28" in text or "os error 122" in text
    return isinstance(e, RuntimeError) and (
        "inline_container" in text or "PytorchStreamWriter failed" in text or "file write failed" in text
    )


def atomic_write(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through a temporary file in the same directory, fsync it, then rename it over `path`."""
    path = Path(path)
    with _atomic(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return path


def write_output(path: Path | str, write: Callable[[IO[bytes]], None]) -> Path:
    """A file the user named (`--out`): atomically when it is new or a regular file; written through when it
    is a symbolic link (/dev/stdout is one), a device or a pipe, which a rename would replace by a file."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        with open(path, "wb") as f:
            write(f)
        return path
    return atomic_write(path, write)


def save(state: dict[str, Any], path: Path | str) -> Path:
    return atomic_write(path, lambda f: torch.save(state, f))


def save_weights(model: torch.nn.Module, path: Path | str) -> Path:
    """The model's weights as safetensors (no pickle at all); tied weights are stored once."""
    from safetensors.torch import save_model

    path = Path(path)
    with _atomic(path) as tmp:
        save_model(model, str(tmp), metadata={"format": "pt", "dgtrain": __version__})
        os.chmod(tmp, 0o666 & ~_UMASK)  # safetensors writes the file itself, 0600: same mode as the others
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    return path


def save_state_weights(state: dict[str, torch.Tensor], path: Path | str) -> Path:
    """A state dict (FSDP's gathered full weights) as safetensors; shared tensors are stored as copies."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}
    with _atomic(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "dgtrain": __version__})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # save_file creates the file itself (0600)
    return path


def refused_global(e: Exception) -> str:
    """The line of torch's weights-only refusal that names what was refused ("GLOBAL posix.system ..."),
    not its advice around it (which suggests weights_only=False)."""
    lines = [x.strip() for x in str(e).splitlines() if "GLOBAL" in x]
    return lines[0].replace("WeightsUnpickler error: ", "") if lines else type(e).__name__


def load(path: Path | str) -> dict[str, Any]:
    """Load and validate a checkpoint with `torch.load(weights_only=True)`; never unpickles objects.

    An FSDP checkpoint (a `.dcp` directory) loads its small `meta.pt` here; `state["sharded"]` then names the
    directory whose shards `restore` (or `dgtrain eval`) reads through torch.distributed.checkpoint."""
    path = Path(path)
    if path.is_dir():
        from dgtrain.distributed import SHARDED_META, is_complete_sharded

        if not is_complete_sharded(path):
            raise CorruptCheckpointError(
                f"checkpoint {path} is incomplete: an FSDP checkpoint directory needs {SHARDED_META} and the "
                "torch.distributed.checkpoint .metadata file (written last). Resume from an earlier one."
            )
        state = load(path / SHARDED_META)
        state["sharded"] = str(path)
        return state
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported operand" in str(e):  # not a pickle at all: a YAML or text file, an image, ...
            raise CheckpointError(
                f"checkpoint {path} is not a checkpoint: torch.load cannot read it (not a file torch.save "
                "wrote). Give a run dir, a checkpoint (.pt) or a model.safetensors."
            ) from None
        first = refused_global(e)
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds Python objects other than tensors and plain data "
            f"({first[:200]}). dgtrain loads checkpoints only with torch.load(weights_only=True) because "
            "unpickling such objects can run arbitrary code; use a checkpoint written by dgtrain."
        ) from None
    except Exception as e:  # zip/pickle stream errors: a truncated or damaged file
        raise CorruptCheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(e).__name__}: {str(e).splitlines()[0][:160]})."
            " Resume from an earlier checkpoint (resume=auto picks the newest readable one)."
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a dgtrain checkpoint (no format={FORMAT!r} field).")
    missing = [k for k in REQUIRED if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}.")
    if int(state.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {state['version']}; this dgtrain ({__version__}) "
            f"reads up to version {VERSION}. Upgrade dgtrain."
        )
    return state


def list_checkpoints(directory: Path | str) -> list[Path]:
    """The step checkpoints in `directory` (files, or FSDP directories), oldest first (best and temporary
    files excluded)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_FILE.match(p.name))]
    return [p for _, p in sorted(found)]


# ------------------------------------------------------------------------- random-number generators


def rng_state() -> dict[str, Any]:
    """Python, NumPy (as plain lists, which weights_only loading accepts), torch CPU and CUDA states."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {
        "python": [version, list(mt), gauss],
        "numpy": [str(kind), keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        for i, s in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


# ------------------------------------------------------------------------------- configs inside files


def check_stored_config(config: Any, allowed: tuple[str, ...], source: Path | str) -> None:
    """The `_target_`s of a config read from a file must pass the same allow-list as a live config."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: the stored config is not a mapping.")
    problems = []
    for key, target in find_targets(config):
        try:
            locate(target, allowed, key=key)
        except DgtrainError as e:
            problems.append(str(e))
    if problems:
        raise CheckpointError(
            f"{source}: the stored config was refused, nothing was built from it:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )


def _flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def config_changes(old: dict, new: dict) -> list[str]:
    """Keys (other than RESUME_MAY_CHANGE) whose value differs between two configs."""
    a, b = _flatten(old), _flatten(new)
    changed = []
    for k in sorted(set(a) | set(b)):
        if any(k == p or (p.endswith(".") and k.startswith(p)) for p in RESUME_MAY_CHANGE):
            continue
        if a.get(k, "<absent>") != b.get(k, "<absent>"):
            changed.append(f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}")
    return changed


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data (enums as strings), storable in a weights_only checkpoint."""
    out = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(out, dict)
    return out


# ------------------------------------------------------------------------------------- the run's side


def trim_metrics(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl rows past `step`: the resumed run logs those steps again (identically)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            keep.append(line)
    if len(keep) != len(lines):
        atomic_write(path, lambda f: f.write("".join(x + "\n" for x in keep).encode()))
        log.info(
            f"metrics.jsonl: dropped {len(lines) - len(keep)} row(s) after step {step}, to be logged again"
        )


def read_wandb_id(run_dir: Path) -> str | None:
    p = run_dir / WANDB_ID_FILE
    return (p.read_text().strip() or None) if p.is_file() else None


def run_checkpoint_dir(run_dir: Path) -> Path:
    """Where a run dir's checkpoints are: `<run_dir>/checkpoints`, or the run's own `checkpoint.dir` (from its
    config.yaml) when it was set and that folder is found: from here, or (relative) from the folder the
    run was started in. Else `run_dir` itself, which may be a folder of checkpoints."""
    default = run_dir / "checkpoints"
    if default.is_dir():
        return default
    try:
        stored = (OmegaConf.load(run_dir / "config.yaml").get("checkpoint") or {}).get("dir")
    except Exception:  # noqa: BLE001 - no config.yaml, or a damaged one (reported when the run is loaded)
        stored = None
    if not stored:
        return run_dir
    stored = Path(str(stored)).expanduser()
    if stored.is_dir():
        return stored
    base = None if stored.is_absolute() else launch_dir(run_dir)
    return base / stored if base is not None and (base / stored).is_dir() else run_dir


def final_weights_current(run_dir: Path) -> bool:
    """Whether `run_dir/model.safetensors` holds the run's latest weights. It is written when a run completes;
    a resumed continuation that then stopped or failed leaves newer checkpoints beside the older file, and
    its summary.json says so."""
    if not (run_dir / "model.safetensors").is_file():
        return False
    try:
        status = json.loads((run_dir / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return True  # no readable summary: nothing says the file is stale
    return status not in ("stopped", "failed") or not list_checkpoints(run_checkpoint_dir(run_dir))


def newest_valid(
    directory: Path, why: str, run_id: str | None = None, remove_corrupt: bool = False
) -> tuple[Path, dict] | None:
    """The newest readable checkpoint in `directory`, saying which unreadable ones it passed over.
    With `run_id`, checkpoints of another run are passed over too; with `remove_corrupt`, truncated or
    damaged ones are deleted (rotation would otherwise keep them and delete the valid ones); files that
    are unsafe, foreign or from a newer dgtrain are only passed over."""
    candidates = list_checkpoints(directory)[::-1]
    errors = []
    for i, p in enumerate(candidates):
        nxt = f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates) else "none left"
        try:
            state = load(p)
        except CheckpointError as e:
            errors.append(str(e))
            removed = remove_corrupt and isinstance(e, CorruptCheckpointError)
            if removed:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            log.warning(f"{why}: {e} {'Removed it; ' if removed else ''}{nxt}.")
            continue
        if run_id is not None and state.get("run_id") not in (None, run_id):
            log.warning(f"{why}: {p} belongs to run {state['run_id']}, not to this run ({run_id}); {nxt}.")
            continue
        return p, state
    if errors:
        raise CheckpointError(
            f"{why}: none of the {len(candidates)} checkpoint(s) in {directory} is readable:\n"
            + "\n".join(f"  - {e}" for e in errors)
        )
    return None


# ------------------------------------------------------------------------------ one dir, one run

LOCK_FILE = ".dgtrain.lock"
RUN_FILE = "run.json"  # the run id of the run that owns a run dir


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


class DirLock:
    """An exclusive lock on a directory for the whole of a run: `<dir>/.dgtrain.lock`, held with
    flock (so the kernel releases it when the process dies, however it dies) and holding the holder's
    pid and host for the message a second run gets. A lock file left by a process that is gone is
    taken over, with a warning."""

    def __init__(self, directory: Path, what: str):
        self.path, self.what, self.fd = Path(directory) / LOCK_FILE, what, None

    def acquire(self, run_id: str) -> None:
        import fcntl
        import socket

        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                mine = _HELD.get(str(self.path.resolve()))
                if mine is not None:  # this process: a fit() that failed before its end kept it
                    log.warning(
                        f"{self.what} {self.path.parent}: taking over the lock an earlier run in this "
                        "process left behind"
                    )
                    mine.release()
                    continue
                raise DgtrainError(
                    f"{self.what} {self.path.parent} is in use by another dgtrain run (pid "
                    f"{holder.get('pid', '?')} on host {holder.get('host', '?')}, run {holder.get('run_id', '?')}, "
                    f"started {holder.get('started', '?')}). Two runs in one directory overwrite each other's "
                    "files: wait for it to finish, or choose another directory (hydra.run.dir=... or "
                    "checkpoint.dir=...)."
                ) from None
            except OSError as e:  # a filesystem without flock: say so, and go on unlocked
                log.warning(f"{self.what} {self.path.parent}: cannot lock ({e}); two runs here would collide")
                break
            try:  # the file we locked may have been removed by its previous holder meanwhile: lock again
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        old = _read_holder(fd)
        if old.get("pid"):
            alive = old.get("host") == host and _pid_alive(int(old["pid"]))
            log.warning(
                f"{self.what} {self.path.parent}: taking over the stale lock of pid {old['pid']} on host "
                f"{old.get('host', '?')} ({'pid reused by another process' if alive else 'no longer running'})"
            )
        info = {"pid": os.getpid(), "host": host, "run_id": run_id, "started": _now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        _HELD[str(self.path.resolve())] = self

    def release(self) -> None:
        if self.fd is not None:
            _HELD.pop(str(self.path.resolve()), None)
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still holding it, so nobody locks the old file
            os.close(self.fd)
            self.fd = None


# The locks this process holds, by path: a run that raised before releasing its lock (an in-process
# fit() whose exception is still referenced, as in a notebook) must not block the next run here.
_HELD: dict[str, DirLock] = {}


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        data = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _now() -> str:
    import datetime

    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def new_run_id() -> str:
    import uuid

    return uuid.uuid4().hex[:12]


def launch_dir(run_dir: Path) -> Path | None:
    """The folder the run was started from: run.json's `cwd`, else Hydra's record of it (a run dir
    written before run.json kept it)."""
    try:
        cwd = json.loads((Path(run_dir) / RUN_FILE).read_text()).get("cwd")
    except (OSError, ValueError, AttributeError):
        cwd = None
    if not cwd:
        import yaml

        try:
            cwd = yaml.safe_load((Path(run_dir) / ".hydra" / "hydra.yaml").read_text())["hydra"]["runtime"][
                "cwd"
            ]
        except (OSError, yaml.YAMLError, KeyError, TypeError):
            return None
    return Path(cwd) if isinstance(cwd, str) and cwd else None


def read_run_id(run_dir: Path) -> str | None:
    try:
        data = json.loads((Path(run_dir) / RUN_FILE).read_text())
    except (OSError, ValueError):
        return None
    return str(data["run_id"]) if isinstance(data, dict) and data.get("run_id") else None


def check_writable(directory: Path, key: str) -> None:
    """`directory` can hold the run's files: it is (or can be made) a directory we may write in."""
    from dgtrain.paths import blocked_dir

    blocked = blocked_dir(directory)
    if blocked:
        raise DgtrainError(
            f"{key}={directory}: {blocked[0]} {blocked[1]}; no checkpoint or result could be saved. "
            f"Choose another directory ({key}=...)."
        )


def run_files(run_dir: Path, ckpt_dir: Path) -> list[str]:
    """What in these directories shows that a run already used them (its results or checkpoints)."""
    found = [RUN_FILE_SUMMARY] if (run_dir / RUN_FILE_SUMMARY).is_file() else []
    ckpts = list_checkpoints(ckpt_dir) + ([ckpt_dir / "best.pt"] if (ckpt_dir / "best.pt").is_file() else [])
    if ckpts:
        found.append(f"{len(ckpts)} checkpoint(s) in {ckpt_dir}")
    return found


RUN_FILE_SUMMARY = "summary.json"


class Checkpointer:
    """Where a run's checkpoints go, when they are due, and which ones are kept (`cfg.checkpoint`)."""

    def __init__(self, cfg: DictConfig, run_dir: Path | str):
        node = cfg.get("checkpoint") or {}
        self.run_dir = Path(run_dir)
        self.dir = Path(node.get("dir") or self.run_dir / "checkpoints")
        self.every = int(node["every"]) if node.get("every") else None
        self.keep_last = int(node["keep_last"]) if node.get("keep_last") else None
        self.keeps_best = bool(node.get("best", True))
        self.explicit_dir = bool(node.get("dir"))
        self.run_id: str | None = None
        self._locks: list[DirLock] = []
        self._release = None

    # ---- before training: one dir, one run

    def claim(self, resume: Any) -> None:
        """Make sure this run may use its directories: they are writable, not in use by another live run
        (lock, held until `release`), and a fresh run (`resume` unset) does not start over the results or
        checkpoints of an earlier run. Sets `run_id` (a resumed run keeps its own; see load_for_resume)."""
        import weakref

        check_writable(self.run_dir, "hydra.run.dir")
        if self.explicit_dir:
            check_writable(self.dir, "checkpoint.dir")
        previous = read_run_id(self.run_dir)
        self.run_id = new_run_id() if resume is None or previous is None else previous
        self.run_dir.mkdir(parents=True, exist_ok=True)
        locks = [DirLock(self.run_dir, "run dir")]
        if self.explicit_dir and not self.dir.resolve().is_relative_to(self.run_dir.resolve()):
            self.dir.mkdir(parents=True, exist_ok=True)
            locks.append(DirLock(self.dir, "checkpoint.dir"))
        for lock in locks:
            try:
                lock.acquire(self.run_id)
            except BaseException:
                _release_all(self._locks)
                raise
            self._locks.append(lock)
        # released by release(), or when this object goes away (an error before training), or at exit
        self._release = weakref.finalize(self, _release_all, self._locks)
        used = run_files(self.run_dir, self.dir) if resume is None else []
        if used:
            self.release()
            raise DgtrainError(
                f"{self.run_dir} already holds a run ({', '.join(used)}); a fresh run there would overwrite "
                "its results and checkpoints. Continue that run with resume=auto, or choose a new directory "
                "(hydra.run.dir=..." + (", checkpoint.dir=...)." if self.explicit_dir else ").")
            )

    def release(self) -> None:
        if self._release is not None:
            self._release()

    def write_run_file(self) -> None:
        # cwd: relative data paths in the config are relative to it (commands run elsewhere find them)
        info = {"run_id": self.run_id, "started": _now(), "pid": os.getpid(), "cwd": os.getcwd()}
        text = json.dumps(info, indent=2) + "\n"
        atomic_write(self.run_dir / RUN_FILE, lambda f: f.write(text.encode()))

    def due(self, step: int) -> bool:
        return self.every is not None and step % self.every == 0

    def path(self, step: int) -> Path:
        return self.dir / f"step_{step:08d}.pt"

    def save_sharded(
        self,
        step: int,
        meta: dict[str, Any],
        model,
        optimizer,
        dist,
        *,
        regular: bool = True,
        best: bool = False,
    ) -> None:
        """An FSDP checkpoint (every rank calls this): `step_N.dcp/` and/or `best.dcp/`, same rules as below."""
        from dgtrain.distributed import save_sharded

        meta["run_id"] = self.run_id
        if regular:
            save_sharded(self.path(step).with_suffix(".dcp"), meta, model, optimizer, dist)
            if dist.is_main:
                self.prune(step)
        if best:
            save_sharded(self.dir / "best.dcp", meta, model, optimizer, dist)

    def save(self, step: int, state: dict[str, Any], *, regular: bool = True, best: bool = False) -> None:
        state["run_id"] = self.run_id
        if regular:
            save(state, self.path(step))
            log.debug(f"checkpoint: step {step} -> {self.path(step)}")
            self.prune(step)
        if best:
            save(state, self.dir / "best.pt")
            log.debug(f"checkpoint: new best at step {step} -> {self.dir / 'best.pt'}")

    def prune(self, step: int) -> None:
        """Keep the newest `keep_last` checkpoints up to `step`, the one just saved among them. Files of
        later steps (left by an abandoned continuation) are not this timeline's to rotate."""
        if self.keep_last:
            mine = [p for p in list_checkpoints(self.dir) if int(STEP_FILE.match(p.name).group(1)) <= step]
            for old in mine[: -self.keep_last]:
                if old.is_dir():  # an FSDP checkpoint
                    shutil.rmtree(old, ignore_errors=True)
                else:
                    old.unlink(missing_ok=True)

    def remove_stale_temp(self) -> None:
        """Temporary files left by a process killed mid-write (never a valid checkpoint)."""
        if self.dir.is_dir():
            for p in self.dir.glob(".*.tmp"):
                if p.is_dir():  # an FSDP save cut short
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        for p in self.run_dir.glob(".model.safetensors.*.tmp"):  # the final weights' own temp file
            p.unlink(missing_ok=True)

    def load_for_resume(self, cfg: DictConfig, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        """`resume=auto`: the newest valid checkpoint of this run (None: start fresh); `resume=PATH`: that
        file (a directory: its newest valid one). The stored config must pass the allow-list. A resumed
        run keeps the run id of its checkpoint; run.json in the run dir records it."""
        try:
            state = self._load_for_resume(cfg, allowed)
        except BaseException:
            self.release()
            raise
        if state is not None and state.get("run_id"):
            self.run_id = str(state["run_id"])
        if not cfg.trainer.get("fast_dev_run"):  # a debug run writes nothing but its log
            self.write_run_file()
        return state

    def _refuse_starting_over(self) -> None:
        """resume=auto found no checkpoint: fine for a run that never saved one (a requeued job's first
        start, a run that failed early), not for one whose summary says it saved one (completed, early
        stopped, stopped): starting from step 0 would drop its metrics and replace its weights."""
        try:
            summary = json.loads((self.run_dir / RUN_FILE_SUMMARY).read_text())
        except (OSError, ValueError):
            return
        status = summary.get("status") if isinstance(summary, dict) else None
        if status not in ("completed", "early_stopped", "stopped"):
            return
        self.release()
        relative = (
            "" if self.dir.is_absolute() else f" (a relative checkpoint.dir is read from {os.getcwd()})"
        )
        raise DgtrainError(
            f"resume=auto: {self.run_dir} holds a {status} run ({summary.get('steps')} steps), but {self.dir}"
            f"{relative} has no checkpoint of it; starting over from step 0 would drop its metrics and "
            "replace its weights. Point checkpoint.dir=... (or resume=PATH) at its checkpoints, or train a "
            "new run in another directory (hydra.run.dir=...)."
        )

    def _load_for_resume(self, cfg: DictConfig, allowed: tuple[str, ...]) -> dict[str, Any] | None:
        resume = cfg.get("resume")
        if resume is None:
            return None
        self.remove_stale_temp()  # only when resuming: a fresh run may share an explicit checkpoint.dir
        resume = str(resume)
        if resume == "auto":
            mine = read_run_id(self.run_dir)  # resume=auto continues only the run this dir belongs to
            found = newest_valid(self.dir, "resume=auto", run_id=mine, remove_corrupt=True)
            if found is None:
                self._refuse_starting_over()
                log.info(f"resume=auto: no checkpoint in {self.dir} yet; starting from step 0")
                trim_metrics(self.run_dir, 0)
                return None
            other = found[1].get("run_id")
            if mine is None and other and self.explicit_dir:  # a new run dir, a checkpoint.dir in use
                self.release()
                raise DgtrainError(
                    f"resume=auto: checkpoint.dir={self.dir} holds the checkpoints of run {other} "
                    f"({found[0].name}), and the run dir {self.run_dir} has no run yet (no {RUN_FILE}); "
                    "continuing there would take that run over and rotate its checkpoints away. Continue it "
                    "from its own run dir (hydra.run.dir=...); for a new run, or one that starts from that "
                    f"checkpoint (resume={found[0]}), choose another checkpoint.dir."
                )
        elif (
            Path(resume).is_dir() and Path(resume).suffix != ".dcp"
        ):  # a run dir (a .dcp dir is one checkpoint)
            d = run_checkpoint_dir(Path(resume))  # its checkpoints/, its checkpoint.dir, or a folder of them
            found = newest_valid(d, f"resume={resume}")
            if found is None:
                raise CheckpointError(f"resume={resume}: no checkpoint (step_*.pt or step_*.dcp) in {d}.")
        else:
            found = (Path(resume), load(resume))
        path, state = found
        check_stored_config(state["config"], allowed, path)
        owner = read_run_id(self.run_dir)
        if resume != "auto" and owner is None and self.explicit_dir and list_checkpoints(self.dir):
            self.release()  # a new run dir whose checkpoint.dir holds another run dir's checkpoints
            raise DgtrainError(
                f"resume={resume}: checkpoint.dir={self.dir} already holds checkpoints "
                f"({', '.join(run_files(self.run_dir, self.dir))}) and the run dir {self.run_dir} has no run "
                f"yet (no {RUN_FILE}); this run would write its checkpoints among them and rotate them away. "
                "Choose another checkpoint.dir, or continue that run from its own run dir (resume=auto)."
            )
        if resume != "auto" and owner and state.get("run_id") != owner and run_files(self.run_dir, self.dir):
            raise DgtrainError(
                f"resume={resume}: {path} belongs to run {state.get('run_id') or '(none)'}, but {self.run_dir} "
                f"holds run {owner} ({', '.join(run_files(self.run_dir, self.dir))}); continuing here would "
                "overwrite that run's results. Resume into a new directory (hydra.run.dir=...)."
            )
        changed = config_changes(state["config"], plain_config(cfg))
        if changed:
            log.warning(
                f"resuming from {path} with a config that differs from the one it was saved with "
                f"(exact resume needs the same one): {'; '.join(changed[:8])}"
                + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")
            )
        log.info(f"resuming from {path} (step {state['step']})")
        wandb_id = state.get("wandb_run_id")
        if wandb_id and not (self.run_dir / WANDB_ID_FILE).exists():
            (self.run_dir / WANDB_ID_FILE).write_text(wandb_id + "\n")  # the W&B run continues too
        trim_metrics(self.run_dir, int(state["step"]))
        state["path"] = str(path)
        return state


def _release_all(locks: list[DirLock]) -> None:
    for lock in reversed(locks):
        lock.release()
    locks.clear()


def make_state(
    *,
    model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer | None,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    loop: dict[str, Any],
    config: dict[str, Any],
    run_dir: Path,
    monitor: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything exact resume needs: the objects' states, the loop's counters and the RNG states.
    model=None, optimizer=None: an FSDP checkpoint's meta.pt (their shards are written apart)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "dgtrain": __version__,
        "torch": str(torch.__version__),  # TorchVersion is a class weights_only loading refuses
        "step": int(loop["step"]),
        "model": model.state_dict() if model is not None else "sharded",
        "optimizer": optimizer.state_dict() if optimizer is not None else "sharded",
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_state(),
        "loop": loop,
        "config": config,
        "monitor": monitor,
        "wandb_run_id": read_wandb_id(run_dir),
    }


def _hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """The numeric settings of each param group (`lr`: the schedule's base lr, `initial_lr`, since the
    current lr follows the schedule)."""
    out = []
    for group in optimizer.param_groups:
        h: dict[str, Any] = {}
        for k, v in group.items():
            if isinstance(v, (tuple, list)) and v and all(isinstance(x, (int, float)) for x in v):
                v = tuple(v)
            elif isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            h[k] = v
        if "initial_lr" in h:
            h["lr"] = h.pop("initial_lr")
        out.append(h)
    return out


def _settings_kept(fresh: list[dict[str, Any]], loaded: list[dict[str, Any]]) -> list[str]:
    """`optimizer.KEY=NEW (the checkpoint's OLD)` for each setting the loaded param groups override."""
    kept: dict[str, str] = {}
    for new, old in zip(fresh, loaded, strict=False):
        for k, v in new.items():
            if k in old and old[k] != v and k not in kept:
                kept[k] = f"optimizer.{k}={v} (the checkpoint's {old[k]})"
    return list(kept.values())


def restore(
    state: dict[str, Any],
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler,
    stream: Any,
    rank: int = 0,
) -> dict[str, Any]:
    """Load the objects' states, move the batch stream to the saved position, then (last, because
    starting a DataLoader iterator draws from torch's RNG) the RNG states: this rank's own when the
    checkpoint holds every rank's (`rng_ranks`, several processes), else the saved process's. Returns the
    loop's state dict (the caller has loaded it into its LoopState already)."""
    path = state.get("path", "checkpoint")
    try:
        if state.get("sharded"):  # an FSDP checkpoint: resharded onto this run's processes (any number)
            from dgtrain.distributed import load_sharded

            load_sharded(Path(state["sharded"]), model, optimizer)
        elif type(model).__name__ == "FSDPModule" or hasattr(model, "set_requires_gradient_sync"):
            raise CheckpointError(
                f"{path} is a single-process/DDP checkpoint; resume it with trainer.strategy=ddp "
                "(FSDP resumes from FSDP checkpoints, on any number of processes)."
            )
        else:
            model.load_state_dict(state["model"])
            fresh = _hyperparameters(optimizer)
            needs = [set(g) for g in optimizer.param_groups]
            optimizer.load_state_dict(state["optimizer"])
            lacks = sorted(
                set().union(*(n - set(g) for n, g in zip(needs, optimizer.param_groups, strict=False)))
            )
            if lacks:  # another optimizer's param groups: its step would fail (KeyError: 'momentum')
                saved = ((state.get("config") or {}).get("optimizer") or {}).get("_target_", "?")
                raise CheckpointError(
                    f"{path} was saved with another optimizer ({saved}) than this run's "
                    f"({type(optimizer).__module__}.{type(optimizer).__name__}): its settings lack "
                    f"{', '.join(lacks)}. Resume with the optimizer it was saved with (optimizer=...), or start "
                    "a new run from its weights with init_from=CHECKPOINT, which starts the optimizer afresh."
                )
            kept = _settings_kept(fresh, _hyperparameters(optimizer))
            if kept:  # the saved param groups (and the schedule's base lr) win: say so, not just "differs"
                log.warning(
                    f"{path}: not applied: {', '.join(kept)}; the optimizer's settings are kept from the "
                    "checkpoint, with its state. To train on with other settings, start a new run from these "
                    "weights (init_from=CHECKPOINT), which starts the optimizer afresh."
                )
    except (RuntimeError, ValueError, KeyError) as e:
        raise CheckpointError(
            f"{path} does not fit this run's model/optimizer ({str(e).splitlines()[0][:200]}). "
            "Resume with the config the checkpoint was saved with."
        ) from None
    scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    loop = state["loop"]
    position = int(loop["position"])
    # Resuming on another number of processes: the position counts global batches (data.batch_size x
    # processes). Keep the global batch (e.g. 2 x 32 -> 1 x 64) and the data position is exact.
    saved_gb, gb = loop.get("global_batch"), getattr(stream.loader.batch_sampler, "global_batch", None)
    if saved_gb and gb and int(saved_gb) != gb:
        position = position * int(saved_gb) // gb
        log.warning(
            f"{path}: saved with a global batch of {saved_gb}, resumed with {gb} (data.batch_size x processes): "
            f"continuing at batch {position} of epoch {loop['epoch']}, which is not an exact resume. "
            "Keep data.batch_size x processes unchanged for that."
        )
    stream.seek(int(loop["epoch"]), position, int(loop["completed_epochs"]))
    per_rank = state.get("rng_ranks") or []
    set_rng_state(per_rank[rank] if rank < len(per_rank) else state["rng"])
    return loop
