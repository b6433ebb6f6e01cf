"""The end-of-run plots as a sink: when the run closes (completed, stopped or failed), PNG curves of
what it logged go into `<run_dir>/plots/`. Always on; without matplotlib it warns once and skips."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("dgtrain")


class PlotLogger:
    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir)

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass  # metrics.jsonl holds them (resumed runs included); the plots read it at the end

    def close(self, summary: dict[str, Any], status: str) -> None:
        from dgtrain.plots import INSTALL_HINT, write_run_plots

        try:
            import matplotlib  # noqa: F401
        except ImportError:
            log.warning(f"plots skipped: matplotlib is not installed ({INSTALL_HINT})")
            return
        try:
            files = write_run_plots(self.run_dir)
        except Exception as e:  # a plot must never turn a finished run into a failed one
            log.warning(f"plots skipped: {type(e).__name__}: {e}")
            return
        if files:
            log.info(f"plots: {self.run_dir / 'plots'} ({', '.join(f.name for f in files)})")
