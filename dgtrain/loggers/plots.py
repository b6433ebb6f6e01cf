"""Every plot of a run's curves, from its `metrics.jsonl`: `PlotLogger`, the sink that writes PNGs into
`<run_dir>/plots/` when a run closes (completed, stopped or failed; always on, and without matplotlib it
warns once and skips), and `compare`, which `dgtrain plot RUN_DIR [RUN_DIR ...]`
(dgtrain/commands/plot.py) uses to overlay several runs in one figure.

matplotlib is imported only here. Run plots and comparisons are drawn on `matplotlib.figure.Figure`
objects outside pyplot: they render to PNG without a display, and never touch pyplot's backend or figure
list, so `fit` called from a notebook leaves the user's own plotting as it was. `pyplot()` is for the
commands that want pyplot's helpers (`dgtrain explain`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from dgtrain.errors import DgtrainError

log = logging.getLogger("dgtrain")

INSTALL_HINT = "pip install 'dgtrain[plots]'"


def new_figure(**kwargs):
    """A figure outside pyplot (`savefig` renders it with Agg); nothing to close, the garbage collector
    frees it."""
    from matplotlib.figure import Figure

    return Figure(**kwargs)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed, and never a window
    import matplotlib.pyplot as plt

    return plt


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of `<run_dir>/metrics.jsonl`; "nan"/"inf" strings back to floats, bad lines skipped
    (a SIGKILL can leave the last line half-written)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise DgtrainError(f"{run_dir}: no metrics.jsonl here; is this a dgtrain run directory?")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows.append({k: float(v) if v in ("nan", "inf", "-inf") else v for k, v in row.items()})
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    steps, values = [], []
    for row in rows:
        v = row.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool):
            steps.append(int(row["step"]))
            values.append(float(v))
    return steps, values


def keys(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        seen.update(dict.fromkeys(k for k in row if k != "step"))
    return list(seen)


def panels(rows: list[dict[str, Any]], monitor: str | None = None) -> list[tuple[str, str, list[str]]]:
    """(name, title, metric keys) for the loss, validation metric, learning rate and memory panels
    that these rows have data for."""
    present = keys(rows)
    val = [k for k in present if k.startswith("val/") and k != "val/loss"]
    if monitor in val:  # the task's own metric first
        val.remove(monitor)
        val.insert(0, monitor)
    out = [
        ("loss", "loss", [k for k in ("train/loss", "val/loss") if k in present]),
        ("val", "validation metric", val[:1]),
        ("lr", "learning rate", [k for k in ("train/lr",) if k in present]),
        ("memory", "memory (MB)", [k for k in present if k.startswith("mem/") and k.endswith("_mb")]),
    ]
    return [p for p in out if p[2]]


def _monitor(run_dir: Path) -> str | None:
    try:
        return json.loads((Path(run_dir) / "summary.json").read_text())["monitor"]["metric"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _draw(ax, runs: list[tuple[str, list[dict]]], metric_keys: list[str], title: str) -> None:
    colors = [f"C{i}" for i in range(10)]
    styles = ["-", "--", ":", "-."]
    for i, (label, rows) in enumerate(runs):
        for j, key in enumerate(metric_keys):
            steps, values = series(rows, key)
            if not steps:
                continue
            name = key if len(runs) == 1 else f"{label} {key}"
            # One point (a single evaluation) would be invisible as a line.
            marker = "o" if len(steps) == 1 else None
            ax.plot(steps, values, styles[j % 4], color=colors[i % 10], marker=marker, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if title == "learning rate" and any(v > 0 for _, rows in runs for v in series(rows, "train/lr")[1]):
        ax.set_yscale("log")
    ax.legend(fontsize="small")


def write_run_plots(run_dir: Path | str) -> list[Path]:
    """`<run_dir>/plots/{loss,val,lr,memory}.png` from the run's metrics.jsonl; returns the files."""
    run_dir = Path(run_dir)
    rows = read_history(run_dir)
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    files = []
    for name, title, metric_keys in panels(rows, _monitor(run_dir)):
        fig = new_figure(figsize=(6, 4), dpi=100)
        _draw(fig.subplots(), [(run_dir.name, rows)], metric_keys, title)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path)
        files.append(path)
    summary = run_dir / "summary.json"
    matrix = json.loads(summary.read_text()).get("confusion_matrix") if summary.is_file() else None
    if matrix:
        files.append(confusion_png(matrix, out_dir / "confusion_matrix.png"))
    return files


def confusion_png(matrix: list[list[int]], path: Path | str) -> Path:
    """The confusion matrix of the last evaluation (rows: true class, columns: predicted), counts shown."""
    n = len(matrix)
    size = min(12.0, 2.0 + 0.5 * n)
    fig = new_figure(figsize=(size, size), dpi=100)
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    top = max(max(row) for row in matrix) or 1
    if n <= 30:
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        for i, row in enumerate(matrix):
            for j, v in enumerate(row):
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize="small",
                    color="white" if v > top / 2 else "black",
                )
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("validation confusion matrix")
    fig.tight_layout()
    fig.savefig(path)
    return Path(path)


def labels_for(run_dirs: list[Path]) -> list[str]:
    """Short, distinct labels: each run dir relative to the folder the runs share."""
    resolved = [d.resolve() for d in run_dirs]
    if len(resolved) == 1:
        return [resolved[0].name]
    common = Path(os.path.commonpath(resolved))
    labels = [str(d.relative_to(common)) or d.name for d in resolved]
    return labels if len(set(labels)) == len(labels) else [str(d) for d in run_dirs]


def compare(run_dirs: list[Path], out: Path, metrics: list[str] | None = None) -> Path:
    """One figure overlaying the runs: a panel per metric group (or per metric given)."""
    runs = list(zip(labels_for(run_dirs), [read_history(d) for d in run_dirs], strict=True))
    if metrics:
        groups = [(k, k, [k]) for k in metrics]
        missing = [k for k in metrics if not any(series(rows, k)[0] for _, rows in runs)]
        if missing:
            have = sorted({k for _, rows in runs for k in keys(rows)})
            raise DgtrainError(
                f"--metric {', '.join(missing)}: not logged by any of these runs. Logged metrics: "
                f"{', '.join(have)}."
            )
    else:
        # Panels from the union of what the runs logged, validation metric from the first run's task.
        groups = panels([row for _, rows in runs for row in rows], _monitor(run_dirs[0]))
    if not groups:
        raise DgtrainError(f"{', '.join(map(str, run_dirs))}: no metrics logged yet, nothing to plot.")
    from dgtrain.checkpoint import write_output

    fig = figure(runs, groups)
    write_output(out, lambda f: fig.savefig(f, format=out.suffix[1:].lower() or "png"))  # never half a file
    return out


def figure(runs: list[tuple[str, list[dict]]], groups: list[tuple[str, str, list[str]]]):
    """A matplotlib figure with one panel per group, every run overlaid in each panel."""
    ncols = 2 if len(groups) > 1 else 1
    nrows = math.ceil(len(groups) / ncols)
    fig = new_figure(figsize=(6 * ncols, 4 * nrows), dpi=100)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax, (_, title, metric_keys) in zip(axes.flat, groups, strict=False):
        _draw(ax, runs, metric_keys, title)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    fig.tight_layout()
    return fig


class PlotLogger:
    def __init__(self, run_dir: Path | str):
        self.run_dir = Path(run_dir)

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass  # metrics.jsonl holds them (resumed runs included); the plots read it at the end

    def close(self, summary: dict[str, Any], status: str) -> None:
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
