"""The console: a live rich progress display on a terminal, plain log lines elsewhere (CI, pipes),
and a summary table at the end. Metric values reach it only on logging steps."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

log = logging.getLogger("dgtrain")


def _fmt(key: str, v: Any) -> str:
    if isinstance(v, float):
        if key.endswith("lr"):
            return f"{v:.2e}"
        if key.startswith("mem/") or key.endswith("_per_s"):
            return f"{v:,.0f}"
        return f"{v:.4g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.3e}"
    return str(v)


def _mb(mb: float) -> str:
    return f"{mb:,.1f} MB" if mb >= 1 else f"{mb * 1024:,.1f} KB"


def _eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def settings_problems(mode: Any, plain_interval_s: Any, key: str = "logger.console") -> list[str]:
    """What is wrong with the console's settings (`key`: where the config holds them); the config check
    (dgtrain/validation.py) and the constructor share it."""
    out = []
    if mode not in ("auto", "rich", "plain"):
        out.append(f"{key}.mode={mode!r}: expected auto, rich or plain.")
    interval = plain_interval_s
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or not interval >= 0:
        out.append(f"{key}.plain_interval_s={interval!r}: expected a number of seconds, 0 or more.")
    return out


class ConsoleLogger:
    def __init__(self, mode: str = "auto", plain_interval_s: float = 1.0):
        from dgtrain.errors import DgtrainError

        problems = settings_problems(mode, plain_interval_s)
        if problems:
            raise DgtrainError(problems[0])
        # plain lines: at most one per interval (a fast model logs every few milliseconds; metrics.jsonl
        # keeps every logging step). Evaluations, text samples and the last step always print.
        self.plain_interval_s, self._last_line = float(plain_interval_s), None
        self._last_advance = 0.0
        self.interactive = mode == "rich" or (mode == "auto" and sys.stdout.isatty())
        self.console = Console()
        self._progress: Progress | None = None
        self._swapped: list[tuple[logging.Logger, logging.Handler]] = []
        self.total = 0
        self._t0 = time.perf_counter()
        self._first = 0
        self._graph = ""  # the latest graph sample, kept between the logging steps that carry one

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, total_steps: int, description: str = "train", first_step: int = 0) -> None:
        """`first_step`: where a resumed run starts, so the ETA comes from this process's own pace."""
        self.total, self._t0, self._first = total_steps, time.perf_counter(), first_step
        if not self.interactive:
            return
        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn(
                "loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[speed]}  mem {task.fields[mem]}"
            ),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            refresh_per_second=4,
        )
        self._task = self._progress.add_task(
            description, total=total_steps, completed=first_step, loss="-", lr="-", speed="-", mem="-"
        )
        self._progress.start()
        # Route log records through rich while the live display runs, so lines print above the bar.
        from rich.logging import RichHandler

        root = logging.getLogger()
        for h in list(root.handlers):
            if type(h) is logging.StreamHandler and getattr(h, "stream", None) in (sys.stdout, sys.stderr):
                root.removeHandler(h)
                self._swapped.append((root, h))
        if self._swapped:
            self._rich_handler = RichHandler(console=self.console, show_path=False)
            root.addHandler(self._rich_handler)

    def advance(self, step: int) -> None:
        """Every step: the bar's position. The display redraws 4 times a second, so the (locked) update
        of rich's task is made at most 20 times a second, not on each of thousands of steps."""
        if self._progress is not None:
            now = time.perf_counter()
            if now - self._last_advance >= 0.05:
                self._last_advance = now
                self._progress.update(self._task, completed=step)

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self._progress is not None:
            fields = {}
            if "train/loss" in metrics:
                fields["loss"] = _fmt("train/loss", metrics["train/loss"])
            if "train/lr" in metrics:
                fields["lr"] = _fmt("train/lr", metrics["train/lr"])
            if "perf/samples_per_s" in metrics:
                tok = metrics.get("perf/tokens_per_s")
                fields["speed"] = f"{metrics['perf/samples_per_s']:,.0f} samples/s" + (
                    f" {tok:,.0f} tok/s" if tok is not None else ""
                )
            if "graph/saved_mb" in metrics:
                self._graph = f" graph {_mb(metrics['graph/saved_mb'])}"
            if "mem/rss_mb" in metrics:
                fields["mem"] = (
                    f"rss {metrics['mem/rss_mb']:,.0f} MB"
                    + (
                        f" cuda {metrics['mem/cuda_peak_mb']:,.0f} MB"
                        if "mem/cuda_peak_mb" in metrics
                        else ""
                    )
                    + self._graph
                )
            self._progress.update(self._task, completed=step, **fields)
            val = {k: v for k, v in metrics.items() if k.startswith(("val/", "test/"))}
            if val:
                self._progress.console.log(
                    f"step {step}: " + "  ".join(f"{k} {_fmt(k, v)}" for k, v in val.items())
                )
            for k, v in metrics.items():
                if isinstance(v, str):  # a text sample (trainer.sample_every)
                    self._progress.console.log(f"step {step} {k}:\n{v}")
            return
        now = time.perf_counter()
        if (
            self._last_line is not None
            and now - self._last_line < self.plain_interval_s
            and step < self.total
            and not any(k.startswith(("val/", "test/", "sample/")) for k in metrics)
        ):
            return
        self._last_line = now
        elapsed = now - self._t0
        done = step - self._first  # steps this process ran (a resumed run started at _first)
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        log.info(plain_line(step, self.total, metrics, eta))

    def close(self, summary: dict[str, Any], status: str) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            root = logging.getLogger()
            if self._swapped:
                root.removeHandler(self._rich_handler)
            for lg, h in self._swapped:
                lg.addHandler(h)
            self._swapped = []
        if summary:
            self.console.print(summary_table(summary, status))
            # Below the table, on one line of its own, so that no terminal or CI width cuts it.
            self.console.print(
                f"run dir: {summary.get('run_dir')}", soft_wrap=True, markup=False, highlight=False
            )


def plain_line(step: int, total: int, metrics: dict[str, Any], eta: float) -> str:
    """One short log line per logging step for CI logs and pipes: what the live bar shows (loss, lr,
    speed, memory, ETA) plus evaluation results. Every metric is in metrics.jsonl."""
    pct = f" ({100 * step // total}%)" if total else ""
    parts = [f"step {step}/{total}{pct}" + (f" epoch {metrics['epoch']}" if "epoch" in metrics else "")]
    for key, name in (("train/loss", "loss"), ("train/lr", "lr"), ("train/grad_norm", "grad_norm")):
        if key in metrics:
            parts.append(f"{name} {_fmt(key, metrics[key])}")
    if metrics.get("train/skipped_steps"):
        parts.append(f"skipped {metrics['train/skipped_steps']}")
    if "perf/samples_per_s" in metrics:
        speed = f"{metrics['perf/samples_per_s']:,.0f} samples/s"
        if "perf/tokens_per_s" in metrics:
            speed += f" {metrics['perf/tokens_per_s']:,.0f} tok/s"
        if "perf/step_ms" in metrics:
            speed += f" {metrics['perf/step_ms']:.3g} ms/step"
        parts.append(speed)
    if "mem/rss_mb" in metrics:
        mem = f"rss {metrics['mem/rss_mb']:,.0f} MB"
        if "mem/cuda_peak_mb" in metrics:
            mem += f" cuda peak {metrics['mem/cuda_peak_mb']:,.0f} MB"
        if "graph/saved_mb" in metrics:
            mem += f" graph {_mb(metrics['graph/saved_mb'])}"
        parts.append(mem)
    evals = [f"{k} {_fmt(k, v)}" for k, v in metrics.items() if k.startswith(("val/", "test/"))]
    if evals:
        parts.append("  ".join(evals))
    if step < total:
        parts.append(f"eta {_eta(eta)}")
    return " | ".join(parts)


def summary_table(summary: dict[str, Any], status: str) -> Table:
    t = Table(title=f"dgtrain run: {status}", show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("final", justify="right")
    t.add_column("best", justify="right")
    final, best = summary.get("final", {}), summary.get("best", {})
    for k in sorted(final):
        if k.startswith(("train/", "val/", "test/")):
            b = best.get(k)
            t.add_row(k, _fmt(k, final[k]), "" if b is None else f"{_fmt(k, b['value'])} @ {b['step']}")
    t.add_section()
    t.add_row("steps", f"{summary.get('steps')} ({summary.get('epochs')} full epochs)", "")
    if "skipped_steps" in summary:  # updates trainer.nonfinite=skip dropped
        t.add_row("skipped updates", str(summary["skipped_steps"]), "")
    t.add_row("wall time", f"{summary.get('wall_s', 0):.1f} s", "")
    t.add_row("peak RSS", f"{summary.get('peak_rss_mb', 0):,.0f} MB", "")
    if summary.get("peak_cuda_mb") is not None:
        t.add_row("peak CUDA allocated", f"{summary['peak_cuda_mb']:,.0f} MB", "")
    g = (summary.get("telemetry") or {}).get("largest_graph")
    if g:  # the largest sampled graph (docs/telemetry.md)
        t.add_row(
            "saved for backward",
            _mb(g["saved_mb"]),
            f"{g['nodes']} nodes, shapes {g['shapes']} @ {g['step']}",
        )
    if (summary.get("telemetry") or {}).get("distinct_shapes"):
        t.add_row("distinct batch shapes", str(summary["telemetry"]["distinct_shapes"]), "")
    t.add_row("parameters", f"{summary.get('parameters', 0):,}", "")
    t.add_row("device", str(summary.get("device_name", summary.get("device"))), "")
    return t  # the run dir is printed below the table, uncut
