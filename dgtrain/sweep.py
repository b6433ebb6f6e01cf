"""Sweeps: one trial per Hydra job, its failure recorded rather than fatal, and the results side by side.

- `run_trial` is what a multirun job runs: it trains, returns the objective (`sweep.metric`, best value
  in `sweep.direction`) and adds a `sweep` section to the job's summary.json. A failed trial (any
  exception: a config error, a non-finite loss, CUDA out of memory) gets status "failed" and its error
  there, then fails its Hydra job, so the sweep goes on and any sweeper sees a failed trial.
- `summarize` rebuilds the results of a sweep directory from its job directories (.hydra/overrides.yaml
  + summary.json): a rich table, sweep_summary.csv, sweep_summary.json and sweep_objective.png.
  `SweepSummaryCallback` calls it at the end of every multirun; `dgtrain sweep-summary DIR`
  (dgtrain/commands/sweep_summary.py) at any time.

Nothing here imports torch at module level: `dgtrain sweep-summary` reads files only.
"""

from __future__ import annotations

import atexit
import csv
import json
import logging
import math
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from dgtrain.errors import DgtrainError
from dgtrain.loggers import FINISHED

log = logging.getLogger("dgtrain")

SUMMARY_FILES = ("sweep_summary.csv", "sweep_summary.json", "sweep_objective.png")
# Order of the statuses below the ranked (completed) trials in the table.
# A trial that early stopping ended finished as planned: it is ranked like a completed one.
STATUS_ORDER = {"completed": 0, "early_stopped": 0, "stopped": 1, "failed": 2, "incomplete": 3, "missing": 4}


class TrialFailed(CompactHydraException):
    """A trial's error, re-raised without the original traceback so that Hydra, which keeps the
    exception of every failed job, does not keep the failed run's tensors (and GPU memory) alive.
    Compact: at the end of a sweep Hydra prints its message only, not a traceback (the trial's own
    traceback is in its summary.json)."""


# ------------------------------------------------------------------------------------ one trial


def natural_direction(metric: str) -> str:
    from dgtrain.tasks import HIGHER_IS_BETTER

    return "maximize" if HIGHER_IS_BETTER.get(metric, False) else "minimize"


def _direction_of(cfg: DictConfig, metric: str) -> str:
    d = cfg.sweep.direction
    return str(getattr(d, "value", d)) if d is not None else natural_direction(metric)


def objective_from_history(history: list[dict[str, Any]], metric: str, direction: str) -> float:
    """Best finite value of `metric` over the logged steps, in `direction`."""
    values = [float(row[metric]) for row in history if isinstance(row.get(metric), (int, float))]
    values = [v for v in values if math.isfinite(v)]
    if not values:
        logged = sorted({k for row in history for k in row if "/" in k})
        raise DgtrainError(
            f"sweep.metric={metric!r} has no finite value in this run. Logged metrics: "
            f"{', '.join(logged) or 'none'}. Set sweep.metric to one of them (validation metrics are "
            "logged at every evaluation)."
        )
    return max(values) if direction == "maximize" else min(values)


def _read_summary(job_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((job_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def _write_summary(job_dir: Path, summary: dict[str, Any]) -> None:
    if os.environ.get("RANK", "0") != "0":  # a job of several processes: rank 0 writes
        return
    tmp = job_dir / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=str) + "\n")
    tmp.replace(job_dir / "summary.json")


def _trial_key(overrides: list[str]) -> list[str]:
    """What identifies a trial: its overrides in any order, less `sweep.resume` itself."""
    return sorted(o for o in overrides if _split(o)[0] != "sweep.resume")


def finished_objective(job_dir: Path, overrides: list[str], cfg: DictConfig) -> float | None:
    """The objective of a completed trial already in `job_dir` with the same overrides and objective
    settings, or None when the job must (re)run."""
    summary = _read_summary(job_dir)
    sweep = (summary or {}).get("sweep") or {}
    if not summary or summary.get("status") not in FINISHED:
        return None
    if _trial_key(sweep.get("overrides") or []) != _trial_key(overrides):
        return None
    metric = cfg.sweep.metric or sweep.get("metric")
    if metric != sweep.get("metric") or _direction_of(cfg, metric) != sweep.get("direction"):
        return None
    return sweep.get("objective")


def run_trial(cfg: DictConfig, hc: Any) -> float:
    """One multirun job: train in the job's own directory and return the sweep objective."""
    job_dir = Path(hc.runtime.output_dir)
    overrides = [str(o) for o in hc.overrides.task]
    if cfg.sweep.resume:
        done = finished_objective(job_dir, overrides, cfg)
        if done is not None:
            log.info(f"sweep.resume: {job_dir} already completed ({' '.join(overrides)}); objective {done}")
            return done
    # A re-run job (sweep.resume, a reused sweep dir): the earlier attempt's files must not describe this one.
    # (A job of several processes, one per SLURM task: rank 0 owns the files.) With resume=auto the job
    # continues its earlier attempt (a requeued SLURM job): its metrics and checkpoints stay where they are.
    continues = str(cfg.get("resume")) == "auto"
    if os.environ.get("RANK", "0") == "0":
        (job_dir / "summary.json").unlink(missing_ok=True)
    if os.environ.get("RANK", "0") == "0" and (job_dir / "metrics.jsonl").exists() and not continues:
        (job_dir / "metrics.jsonl").replace(job_dir / "metrics.previous.jsonl")
    if (job_dir / "checkpoints").is_dir() and not continues:  # a fresh run refuses another run's (issue 10)
        shutil.rmtree(job_dir / "checkpoints.previous", ignore_errors=True)
        (job_dir / "checkpoints").replace(job_dir / "checkpoints.previous")

    t0 = time.perf_counter()
    error: str | None = None
    try:
        from dgtrain.distributed import run

        result = run(cfg, job_dir, hc)  # trainer.devices=N: this job's N workers train it
        metric = str(cfg.sweep.metric or result.summary["monitor"]["metric"])
        direction = _direction_of(cfg, metric)
        summary = result.summary
        summary["sweep"] = {"overrides": overrides, "metric": metric, "direction": direction}
        if result.exit_code:  # SIGTERM/SIGINT: the run stopped cleanly; end the sweep, as asked
            _write_summary(job_dir, summary)
            sys.exit(result.exit_code)
        objective = objective_from_history(result.history, metric, direction)
        summary["sweep"]["objective"] = objective
        _write_summary(job_dir, summary)
        return objective
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
        summary = _read_summary(job_dir) or {"run_dir": str(job_dir)}
        summary.setdefault("wall_s", round(time.perf_counter() - t0, 3))
        if "peak_rss_mb" not in summary:
            from dgtrain.memory import rss_peak_mb

            summary["peak_rss_mb"] = round(rss_peak_mb(), 1)
        torch = sys.modules.get("torch")
        if summary.get("peak_cuda_mb") is None and torch is not None and torch.cuda.is_initialized():
            # e.g. out of memory before the first logging step: the peak since the last reset
            summary["peak_cuda_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        summary.update(status="failed", error=error, traceback=traceback.format_exc())
        summary.setdefault("sweep", {"overrides": overrides})
        summary["sweep"]["objective"] = None
        _write_summary(job_dir, summary)
        log.error(f"trial failed ({' '.join(overrides)}): {error}")
    # Here, outside the except block, the failed run's frames are gone; give its cached GPU memory
    # back before the next trial in this process.
    _release_memory()
    raise TrialFailed(error)


def _release_memory() -> None:
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------- the results


def _load_yaml_list(path: Path) -> list[str]:
    try:
        return [str(x) for x in OmegaConf.load(path)]
    except Exception:
        return []


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _number(value: str) -> float | None:
    try:
        v = float(value)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _short(override: str) -> str:
    """`optimizer.lr=0.006431172050131994` -> `optimizer.lr=0.006431` for the table."""
    key, value = _split(override)
    v = _number(value)
    return f"{key}={v:.4g}" if v is not None and "." in value else override


def _expected_jobs(sweep_dir: Path) -> list[list[str]] | None:
    """The job override lists of a basic-sweeper grid, from multirun.yaml (None for other sweepers)."""
    try:
        cfg = OmegaConf.load(sweep_dir / "multirun.yaml")
        target = str(OmegaConf.select(cfg, "hydra.sweeper._target_") or "")
        if not target.endswith("BasicSweeper"):
            return None
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        args = [str(x) for x in OmegaConf.select(cfg, "hydra.overrides.task") or []]
        params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + args
        batches = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(args), None)
        return [job for batch in batches for job in batch]
    except Exception as e:  # an unreadable or unusual multirun.yaml: list the jobs that exist
        log.debug(f"could not expand the grid of {sweep_dir}: {e}")
        return None


def _sweep_settings(sweep_dir: Path) -> tuple[str | None, str | None]:
    try:
        cfg = OmegaConf.load(sweep_dir / "multirun.yaml")
        return OmegaConf.select(cfg, "sweep.metric"), OmegaConf.select(cfg, "sweep.direction")
    except Exception:
        return None, None


def collect(sweep_dir: Path | str) -> dict[str, Any]:
    """Every trial of a sweep directory, ranked: completed ones by objective, then the others."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DgtrainError(f"{sweep_dir}: no such directory. Pass the sweep directory of a `dgtrain -m` run.")
    job_dirs = sorted({p.parent.parent for p in sweep_dir.rglob(".hydra/overrides.yaml")} - {sweep_dir})
    if not job_dirs and not (sweep_dir / "multirun.yaml").exists():
        raise DgtrainError(
            f"{sweep_dir} holds no sweep jobs (no */.hydra/overrides.yaml, no multirun.yaml). Pass the "
            "directory a `dgtrain -m ...` run printed (hydra.sweep.dir, by default multirun/DATE/TIME)."
        )
    rows: list[dict[str, Any]] = []
    for job_dir in job_dirs:
        overrides = _load_yaml_list(job_dir / ".hydra" / "overrides.yaml")
        summary = _read_summary(job_dir)
        s = summary or {}
        sweep = s.get("sweep") or {}
        objective = sweep.get("objective")
        if objective is None and not sweep and s.get("status") in FINISHED:
            objective = (s.get("monitor") or {}).get("value")  # a run from before sweep.* existed
        rows.append(
            {
                "job": job_dir.relative_to(sweep_dir).as_posix(),
                "status": s.get("status", "incomplete") if summary else "incomplete",
                "objective": objective,
                "metric": sweep.get("metric") or (s.get("monitor") or {}).get("metric"),
                "direction": sweep.get("direction"),
                "wall_s": s.get("wall_s"),
                "peak_rss_mb": s.get("peak_rss_mb"),
                "peak_cuda_mb": s.get("peak_cuda_mb"),
                "steps": s.get("steps"),
                "error": s.get("error"),
                "overrides": overrides,
            }
        )
    expected = _expected_jobs(sweep_dir)
    if expected:
        seen = [sorted(r["overrides"]) for r in rows]
        for job in expected:
            if sorted(job) not in seen:
                rows.append({"job": None, "status": "missing", "objective": None, "overrides": job})

    default_metric, default_direction = _sweep_settings(sweep_dir)
    for r in rows:
        r["params"] = dict(_split(o) for o in r["overrides"])
        # Each trial is judged by its own objective: the metric it monitored, in that metric's direction.
        # Trials of different tasks (linreg: val/mse, convnet: val/acc) never share one ranking.
        if r.get("metric") is None and r["status"] in FINISHED:
            r["metric"] = default_metric
        if r.get("metric") and not r.get("direction"):
            r["direction"] = default_direction or natural_direction(r["metric"])
    groups = rank_groups(rows)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    keys = list(dict.fromkeys(k for r in rows for k in r["params"]))
    swept = [k for k in keys if len({r["params"].get(k) for r in rows}) > 1]
    single = groups[0] if len(groups) == 1 else None
    metric = single["metric"] if single else (default_metric if not groups else None)
    direction = single["direction"] if single else (default_direction if not groups else None)
    return {
        "sweep_dir": str(sweep_dir),
        # One metric for the whole sweep, or None when its trials monitor different metrics: then
        # `groups` holds one ranking per (metric, direction) and `best` is None (no common scale).
        "metric": metric,
        "direction": direction,
        "groups": groups,
        "mixed": len(groups) > 1,
        "counts": counts,
        "swept": swept,
        "best": single["best"] if single else None,
        "trials": rows,
    }


def _is_ranked(r: dict[str, Any]) -> bool:
    return r["status"] in FINISHED and isinstance(r.get("objective"), (int, float)) and bool(r.get("metric"))


def rank_groups(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rank completed trials within their (metric, direction) group; sort `rows` in place: each group's
    ranked trials in turn (in order of first appearance), then every unranked trial by status.

    A value of val/mse and one of val/acc are not comparable, so a sweep mixing tasks gets one ranking
    per metric; `rank` restarts at 1 in each group."""
    keys = list(dict.fromkeys((r["metric"], r["direction"]) for r in rows if _is_ranked(r)))
    groups = []
    for metric, direction in keys:
        sign = -1.0 if direction == "maximize" else 1.0
        members = [r for r in rows if _is_ranked(r) and (r["metric"], r["direction"]) == (metric, direction)]
        members.sort(key=lambda r: sign * r["objective"])
        for i, r in enumerate(members, start=1):
            r["rank"] = i
        groups.append({"metric": metric, "direction": direction, "trials": len(members), "best": members[0]})
    group_of = {k: i for i, k in enumerate(keys)}

    def order(r: dict[str, Any]) -> tuple:
        if _is_ranked(r):
            return (0, group_of[(r["metric"], r["direction"])], r["rank"], 0)
        return (1, 0, 0, STATUS_ORDER.get(r["status"], 5))

    for r in rows:
        if not _is_ranked(r):
            r["rank"] = None
    rows.sort(key=order)
    return groups


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


def write_csv(result: dict[str, Any], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in result["trials"] for k in r["params"]))
    cols = [
        "rank",
        "job",
        "status",
        "metric",
        "direction",
        "objective",
        *keys,
        "wall_s",
        "peak_rss_mb",
        "peak_cuda_mb",
        "steps",
    ]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow([*cols, "error", "overrides"])
        for r in result["trials"]:
            w.writerow(
                [r["params"].get(c, "") if c in keys else ("" if r.get(c) is None else r[c]) for c in cols]
                + [r.get("error") or "", " ".join(r["overrides"])]
            )


def _arrow(direction: str | None) -> str:
    return "max" if direction == "maximize" else "min"


def print_table(result: dict[str, Any], file=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    swept = result["swept"]
    mixed = result.get("mixed", False)
    counts = ", ".join(f"{n} {s}" for s, n in result["counts"].items())
    if mixed:
        # No common scale: one ranking per metric, each starting at #1 (a rule between the groups).
        heading = "trials monitor different metrics, ranked within each: " + "; ".join(
            f"{g['metric']} ({_arrow(g['direction'])}): {g['trials']} trials" for g in result["groups"]
        )
    else:
        heading = f"{result['metric'] or 'objective'} ({_arrow(result['direction'])})"
    # Everything from files or the command line is escaped: `logger=[console,wandb]` is not rich markup.
    table = Table(title=escape(f"sweep {result['sweep_dir']}: {heading} | {counts}"), title_justify="left")
    table.add_column("#", justify="right")
    table.add_column("job")
    table.add_column("overrides")
    if mixed:
        table.add_column("metric")
    table.add_column("objective" if mixed else escape(result["metric"] or "objective"), justify="right")
    for name in ("status", "wall s", "peak MB", "error"):
        table.add_column(name, justify="right" if name in ("wall s", "peak MB") else "left")
    previous = None
    for r in result["trials"]:
        group = (r.get("metric"), r.get("direction")) if r["rank"] is not None else None
        if mixed and previous is not None and group != previous:
            table.add_section()
        previous = group
        shown = [_short(o) for o in r["overrides"] if not swept or _split(o)[0] in swept]
        peak = r.get("peak_cuda_mb") or r.get("peak_rss_mb")
        error = (r.get("error") or "")[:80]
        style = "bold green" if r["rank"] == 1 else ("red" if r["status"] == "failed" else None)
        metric_cell = [f"{r['metric']} ({_arrow(r['direction'])})" if r["rank"] is not None else ""]
        table.add_row(
            _fmt(r["rank"]),
            escape(r["job"] or "-"),
            escape(" ".join(shown)),
            *([escape(metric_cell[0])] if mixed else []),
            _fmt(r["objective"], 6),
            r["status"],
            _fmt(r.get("wall_s"), 3),
            _fmt(peak, 5),
            escape(error),
            style=style,
        )
    out = file or sys.stdout
    # A terminal sets its own width; a log file or pipe gets room for the error column.
    Console(file=out, width=None if out.isatty() else 160).print(table)


def plot(result: dict[str, Any], path: Path) -> bool:
    """The objective against each swept parameter (numbers on a log axis when they span >= 100x); one
    row of panels per metric group, each with its own metric on the y axis."""
    groups = result.get("groups") or []
    swept = result["swept"]
    if not groups or not swept:
        path.unlink(missing_ok=True)
        return False
    from dgtrain.loggers.plots import new_figure

    fig = new_figure(figsize=(4 * len(swept), 3.4 * len(groups)))
    axes = fig.subplots(len(groups), len(swept), squeeze=False)
    for g, group in enumerate(groups):
        rows = [
            r
            for r in result["trials"]
            if r["rank"] is not None
            and (r["metric"], r["direction"]) == (group["metric"], group["direction"])
        ]
        for ax, key in zip(axes[g], swept, strict=True):
            raw = [r["params"].get(key, "") for r in rows]
            nums = [_number(v) for v in raw]
            numeric = all(n is not None for n in nums)
            cats = list(dict.fromkeys(raw))
            x = nums if numeric else [cats.index(v) for v in raw]
            ax.scatter(x, [r["objective"] for r in rows])
            if numeric and min(nums) > 0 and max(nums) / min(nums) >= 100:
                ax.set_xscale("log")
            if not numeric:
                ax.set_xticks(range(len(cats)), cats, rotation=30, ha="right")
            best = group["best"]
            bx = x[rows.index(best)]
            ax.scatter([bx], [best["objective"]], marker="*", s=160, color="tab:red", label="best")
            ax.set_xlabel(key)
            ax.set_ylabel(f"{group['metric']} ({_arrow(group['direction'])})")
            ax.grid(alpha=0.3)
    n = sum(g["trials"] for g in groups)
    title = (
        f"{result['metric']} ({result['direction']})"
        if len(groups) == 1
        else "ranked per metric: " + ", ".join(g["metric"] for g in groups)
    )
    fig.suptitle(f"{title} over {n} completed trials")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return True


def summarize(sweep_dir: Path | str, table: bool = True, png: bool = True) -> dict[str, Any]:
    """Write sweep_summary.json/.csv (and the plot) into `sweep_dir`; print the table."""
    sweep_dir = Path(sweep_dir)
    result = collect(sweep_dir)
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    write_csv(result, sweep_dir / "sweep_summary.csv")
    if png:
        try:
            plot(result, sweep_dir / "sweep_objective.png")
        except ImportError:
            log.warning("matplotlib is not installed: no sweep_objective.png (pip install 'dgtrain[plots]')")
    if table:
        print_table(result)
    return result


class SweepSummaryCallback(Callback):
    """Summarises the sweep when the multirun ends, and also when it ends early: Hydra skips
    `on_multirun_end` when a sweeper raises (a failed job in a basic sweep) or a job is interrupted,
    so an exit handler writes the summary then."""

    def __init__(self) -> None:
        self._sweep_dir: Path | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._sweep_dir = Path(str(config.hydra.sweep.dir))
        atexit.register(self._summarize)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._summarize()

    def _summarize(self) -> None:
        if self._sweep_dir is None or not self._sweep_dir.is_dir():
            return
        sweep_dir, self._sweep_dir = self._sweep_dir, None  # once
        if not any(d.is_dir() for d in sweep_dir.iterdir()):  # each job runs in its own subfolder
            # no job started (Hydra refused the command line: `-m model=linreg,mpl`): a table of "missing"
            # trials would bury its error, and a folder holding only multirun.yaml is no sweep
            if {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
                shutil.rmtree(sweep_dir, ignore_errors=True)
                cwd, parent = Path.cwd().resolve(), sweep_dir.resolve().parent
                while parent != cwd and parent.is_relative_to(cwd) and not any(parent.iterdir()):
                    parent.rmdir()  # multirun/DATE/ that Hydra made for it, never above the cwd
                    parent = parent.parent
            return
        try:
            summarize(sweep_dir)
            log.info(f"sweep summary: {sweep_dir / 'sweep_summary.csv'} (and .json, sweep_objective.png)")
        except Exception as e:  # the summary must never turn a finished sweep into a crash
            log.warning(f"could not summarise {sweep_dir}: {type(e).__name__}: {e}")
