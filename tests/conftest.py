"""Shared test helpers: compose configs in-process, and run the real CLI in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Small, fast settings for end-to-end runs; tests add their own overrides.
FAST = ["trainer.log_every=5"]


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # The subprocess imports this checkout's dgtrain (also from a git worktree), plain lines, no colour.
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["WANDB_MODE"] = env.get("WANDB_MODE", "offline")
    env["WANDB_SILENT"] = "true"
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m dgtrain ARGS` in `cwd`; returns the completed process (stdout and stderr as text)."""
    return subprocess.run(
        [sys.executable, "-m", "dgtrain", *args],
        cwd=cwd,
        env=env or cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def compose():
    """compose(overrides) -> the composed DictConfig (Hydra's compose API over dgtrain's configs)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dgtrain.config import register_schema
    from dgtrain.paths import config_dir

    register_schema()

    def _compose(overrides: list[str] | None = None, config_name: str = "train"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
            return hydra_compose(config_name=config_name, overrides=overrides or [])

    yield _compose
    GlobalHydra.instance().clear()
