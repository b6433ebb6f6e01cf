"""Weights & Biases sink: one W&B run per dgtrain run, online with credentials, offline without.

`wandb` is imported only when this sink is built. The W&B files live in `<run_dir>/wandb/` (unless
`WANDB_DIR` says otherwise) and the run id in `<run_dir>/wandb_run_id.txt`, so a resumed run can
reattach to the same W&B run (`read_run_id`, then `logger.wandb.id=...`).
"""

from __future__ import annotations

import json
import logging
import math
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from dgtrain.errors import DgtrainError
from dgtrain.loggers import FINISHED

log = logging.getLogger("dgtrain")

RUN_ID_FILE = "wandb_run_id.txt"
MODES = ("online", "offline", "disabled")


def read_run_id(run_dir: Path | str) -> str | None:
    """The W&B run id a previous run in `run_dir` logged to, or None if it did not use W&B."""
    path = Path(run_dir) / RUN_ID_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def has_credentials() -> bool:
    """True when W&B could log in without asking: an API key or identity token in the environment,
    or a netrc entry for the W&B host ($WANDB_BASE_URL, default api.wandb.ai)."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else []
    candidates += [os.path.expanduser("~/.netrc"), os.path.expanduser("~/_netrc")]
    for path in candidates:
        if not os.path.isfile(path):
            continue
        try:
            entry = netrc.netrc(path).authenticators(host)
        except (netrc.NetrcParseError, OSError):
            continue
        if entry and entry[2]:
            return True
    return False


def resolve_mode(mode: str | None) -> str:
    """`logger.wandb.mode` wins, then $WANDB_MODE, then online with credentials and offline without."""
    chosen = mode or os.environ.get("WANDB_MODE") or None
    if chosen in ("dryrun",):  # W&B's old name for offline
        chosen = "offline"
    if chosen is None:
        return "online" if has_credentials() else "offline"
    if chosen not in MODES:
        raise DgtrainError(
            f"logger.wandb.mode={chosen!r}{' (from $WANDB_MODE)' if not mode else ''}: "
            f"expected one of {', '.join(MODES)}, or null to choose online/offline from your credentials."
        )
    return chosen


def _hydra_defaults(run_dir: Path) -> tuple[str | None, str | None]:
    """(group, name) defaults from Hydra: a multirun groups its jobs under the sweep directory and
    names each job by its number and overrides; a single run is named after its run directory."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None, run_dir.name
    if not HydraConfig.initialized():
        return None, run_dir.name
    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        group = str(hc.sweep.dir)[-128:]  # W&B caps group names at 128 characters
        overrides = hc.job.override_dirname
        return group, f"{hc.job.num}" + (f": {overrides}" if overrides else "")
    return None, run_dir.name


def _plain(v: Any) -> Any:
    """Summary values: numbers stay numbers; NaN/inf become strings W&B can store."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class WandbLogger:
    """Logs the resolved config, every metric with its step, and the final metrics as the run summary."""

    def __init__(
        self,
        run_dir: Path | str,
        project: str | None = None,
        entity: str | None = None,
        group: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        notes: str | None = None,
        mode: str | None = None,
        id: str | None = None,
        job_type: str | None = None,
    ):
        try:
            import wandb
        except ImportError as e:
            raise DgtrainError(
                f"logger=wandb needs the wandb package, which is not installed ({e}): "
                "pip install 'dgtrain[wandb]' (or choose another logger, e.g. logger=console)."
            ) from e
        self._wandb = wandb
        self.run_dir = Path(run_dir)
        self.mode = resolve_mode(mode)
        hydra_group, hydra_name = _hydra_defaults(self.run_dir)
        run_id = id or os.environ.get("WANDB_RUN_ID")
        if hydra_group and not id and run_id:
            # One $WANDB_RUN_ID for every job of a sweep would pour them all into one run.
            log.warning(f"$WANDB_RUN_ID={run_id} ignored in a multirun: each job gets its own W&B run")
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
        self._init_kwargs = dict(
            project=project or os.environ.get("WANDB_PROJECT") or "dgtrain",
            entity=entity,  # None: $WANDB_ENTITY, else the account's default entity
            group=group or os.environ.get("WANDB_RUN_GROUP") or hydra_group,
            name=name or os.environ.get("WANDB_NAME") or hydra_name,
            tags=list(tags) if tags else None,
            notes=notes,
            job_type=job_type,
            mode=self.mode,
            id=run_id,
            resume="allow" if run_id else None,
            # The run's files next to the rest of the run, unless the user pointed W&B elsewhere.
            dir=None if os.environ.get("WANDB_DIR") else str(self.run_dir),
        )
        self.run = None

    def _start(self, config: dict[str, Any] | None) -> None:
        wandb = self._wandb
        # Offline, wandb's several banner lines are replaced by dgtrain's one line at the end.
        settings = wandb.Settings(silent=True) if self.mode == "offline" else None
        try:
            # A previous run in this process (a multirun job) is finished before this one starts.
            self.run = wandb.init(
                config=config, settings=settings, reinit="finish_previous", **self._init_kwargs
            )
        except Exception as e:
            raise DgtrainError(
                f"logger=wandb: wandb.init failed: {e}. Check logger.wandb.project/entity and your "
                "credentials (`wandb login`), or log offline with logger.wandb.mode=offline."
            ) from e
        if self.run.id and self.mode != "disabled":  # a disabled run has nothing to reattach to
            (self.run_dir / RUN_ID_FILE).write_text(self.run.id + "\n")

    def log_config(self, config: dict[str, Any]) -> None:
        config = json.loads(json.dumps(config, default=str))  # plain data: enums and paths become strings
        if self.run is None:
            self._start(config)
        else:
            self.run.config.update(config, allow_val_change=True)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run is None:
            self._start(None)
        row = dict(metrics)
        for k, v in metrics.items():
            if isinstance(v, str):  # a text sample (trainer.sample_every): a table W&B shows as text
                row[k] = self._wandb.Table(columns=["step", "text"], data=[[step, v]])
        self.run.log(row, step=step)

    def close(self, summary: dict[str, Any], status: str) -> None:
        if self.run is None:
            return
        run, self.run = self.run, None
        try:
            for k, v in summary.get("final", {}).items():
                run.summary[k] = _plain(v)
            for k, b in summary.get("best", {}).items():
                run.summary[f"best/{k}"] = _plain(b["value"])
                run.summary[f"best/{k}_step"] = b["step"]
            for k in ("status", "steps", "epochs", "wall_s", "parameters", "peak_rss_mb", "peak_cuda_mb"):
                if summary.get(k) is not None:
                    run.summary[k] = summary[k]
        finally:
            # Always finished, so W&B never shows a completed-looking run that failed or was stopped.
            run.finish(exit_code=0 if status in FINISHED else 1)
        if self.mode == "offline":
            sync_dir = run.settings.sync_dir
            log.info(f"W&B run {run.id} saved offline in {sync_dir}; upload it with: wandb sync {sync_dir}")
