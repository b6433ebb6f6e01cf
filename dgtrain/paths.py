"""Where the packaged configs and recipes live (repository checkout or installed wheel)."""

from __future__ import annotations

import os
from pathlib import Path

_PKG = Path(__file__).resolve().parent


def _first_dir(*candidates: Path) -> Path:
    for cand in candidates:
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"none of {[str(c) for c in candidates]} exists; is dgtrain installed correctly?")


def config_dir() -> Path:
    # A wheel carries configs inside the package; a checkout (or editable install) has them at the top.
    return _first_dir(_PKG / "configs", _PKG.parent / "configs")


def recipes_dir() -> Path:
    # DGTRAIN_RECIPES_DIR points at another folder of recipes (tests use it; so can a team's own set).
    override = os.environ.get("DGTRAIN_RECIPES_DIR")
    if override:
        return _first_dir(Path(override).expanduser())
    return _first_dir(_PKG / "recipes", _PKG.parent / "recipes")


def blocked_dir(directory: Path | str) -> tuple[Path, str] | None:
    """Why `directory` cannot hold a run's files, if it cannot: (the path in the way, the reason)."""
    probe = Path(directory)
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return probe, "is a file, so no directory can be made there"
    if not os.access(probe, os.W_OK | os.X_OK):
        return probe, "is not writable by this user"
    return None
