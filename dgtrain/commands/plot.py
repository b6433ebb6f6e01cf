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
        description="Overlay the curves of one or more dgtrain runs (their metrics.jsonl) in one figure.",
    )
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    p.add_argument(
        "-o",
        "--out",
        type=Path,
        default=Path("dgtrain_plot.png"),
        help="output image, its format from the suffix (.png, .pdf, .svg, ...; none: .png is added); "
        "default: dgtrain_plot.png",
    )
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
    out = args.out if args.out.suffix else args.out.with_name(args.out.name + ".png")  # as matplotlib does
    from matplotlib.backend_bases import FigureCanvasBase

    formats = sorted(FigureCanvasBase.get_supported_filetypes())
    if out.is_dir():
        raise DgtrainError(f"--out={out} is a folder; give a file name, e.g. --out {out / 'compare.png'}.")
    if out.suffix[1:].lower() not in formats:
        raise DgtrainError(
            f"--out={out}: matplotlib cannot write {out.suffix} files; give one of {', '.join(formats)}."
        )
    out = compare(args.run_dirs, out, args.metric)
    print(f"wrote {out}")
    return 0
