"""`dgtrain plot RUN_DIR [RUN_DIR ...] [-o OUT] [--metric KEY ...]`: overlay the curves of several runs in
one PNG (drawing: dgtrain/loggers/plots.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from dgtrain.errors import DgtrainError


def main(argv: list[str]) -> int:
    """`dgtrain plot RUN_DIR [RUN_DIR ...] [-o OUT] [--metric KEY ...]`."""
    p = argparse.ArgumentParser(
        prog="dgtrain plot",
        description="Overlay the curves of one or more dgtrain runs (their metrics.jsonl) in one PNG.",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument("-o", "--out", type=Path, default=Path("dgtrain_plot.png"), help="output PNG")
    p.add_argument(
        "--metric",
        action="append",
        help="plot this metric key (repeatable), e.g. --metric val/acc; default: loss, validation "
        "metric, learning rate and memory panels",
    )
    args = p.parse_args(argv)
    from dgtrain.loggers.plots import INSTALL_HINT, compare

    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise DgtrainError(
            f"dgtrain plot needs matplotlib, which is not installed ({e}): {INSTALL_HINT}"
        ) from e
    out = compare(args.run_dirs, args.out, args.metric)
    print(f"wrote {out}")
    return 0
