"""`dgtrain sweep-summary SWEEP_DIR`: rebuild a sweep's results table, CSV, JSON and plot from its job
directories (dgtrain/sweep.py does the work)."""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="dgtrain sweep-summary",
        description="Rebuild the results table, sweep_summary.csv/.json and sweep_objective.png of a sweep "
        "directory from its job directories (also for an interrupted sweep).",
    )
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("--no-plot", action="store_true", help="do not write sweep_objective.png")
    p.add_argument("--json", action="store_true", help="print sweep_summary.json instead of the table")
    args = p.parse_args(argv)
    from dgtrain.sweep import summarize

    summarize(args.sweep_dir, table=not args.json, png=not args.no_plot)
    if args.json:
        print((args.sweep_dir / "sweep_summary.json").read_text(), end="")
    return 0
