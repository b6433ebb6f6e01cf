"""`dgtrain smoke [NAME ...] [device=cpu|cuda] [key=value ...]`: run each recipe's smoke contract.

Each recipe runs in its own subprocess (`python -m dgtrain recipe=NAME <smoke.overrides> ...`), so its
peak RSS and wall time are its own; the contract is then checked against the run's metrics.jsonl and
summary.json. A recipe whose data files are absent, or that needs CUDA where there is none, is
skipped with the reason: never counted as passed. Any failure makes the exit code 1.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from dgtrain.errors import DgtrainError

PASSED, FAILED, SKIPPED, ERROR = "passed", "FAILED", "skipped", "error"


@dataclass
class Check:
    """One expectation of a contract: what was measured against what was allowed."""

    what: str  # "metric" | "rss" | "cuda" | "time"
    ok: bool
    text: str  # "val/acc 0.903 >= 0.8"


@dataclass
class Outcome:
    recipe: str
    status: str
    reason: str = ""
    checks: list[Check] = field(default_factory=list)
    run_dir: str = ""
    wall_s: float | None = None

    def check(self, what: str) -> Check | None:
        return next((c for c in self.checks if c.what == what), None)


# --------------------------------------------------------------------------------- the contract


def contract_problems(contract: Any) -> list[str]:
    """What makes a smoke contract unusable (no metric, no bound, a nonsensical bound)."""
    out = []
    if not contract.get("metric"):
        out.append("smoke.metric is not set: name the metric the contract checks (e.g. val/acc).")
    elif str(contract.metric).split("/", 1)[0] not in ("train", "val", "perf", "mem"):
        out.append(f"smoke.metric={contract.metric}: expected a metric key such as train/loss or val/acc.")
    if all(contract.get(k) is None for k in ("min_drop", "min", "max")):
        out.append("smoke: no bound on the metric: set smoke.min_drop, smoke.min and/or smoke.max.")
    drop = contract.get("min_drop")
    if drop is not None and not 0 < float(drop) <= 1:
        out.append(f"smoke.min_drop={drop}: a fraction in (0, 1] (0.3: falls by at least 30%).")
    for key in ("rss_mb", "cuda_mb", "time_s"):
        if contract.get(key) is not None and float(contract[key]) <= 0:
            out.append(f"smoke.{key}={contract[key]}: a budget must be positive (or null for none).")
    return out


def check_contract(
    contract: Any, series: list[float], summary: dict, wall_s: float, cuda: bool
) -> list[Check]:
    """Check one finished run against its contract. `series`: the metric's logged values, in order."""
    metric = str(contract.metric)
    checks = []
    if not series:
        checks.append(Check("metric", False, f"{metric} was never logged"))
    else:
        first, last = series[0], series[-1]
        parts, ok = [], math.isfinite(last)
        if contract.get("min_drop") is not None:
            need = float(contract.min_drop)
            drop = (first - last) / abs(first) if first else 0.0
            ok = ok and drop >= need
            parts.append(
                f"{metric} fell {100 * drop:.1f}% ({first:.4g} -> {last:.4g}), bound >= {100 * need:g}%"
            )
        if contract.get("min") is not None:
            ok = ok and last >= float(contract.min)
            parts.append(f"{metric} {last:.4g}, bound >= {float(contract.min):g}")
        if contract.get("max") is not None:
            ok = ok and last <= float(contract.max)
            parts.append(f"{metric} {last:.4g}, bound <= {float(contract.max):g}")
        checks.append(Check("metric", ok, "; ".join(parts)))
    budgets = [("rss", "peak RSS", summary.get("peak_rss_mb"), contract.get("rss_mb"), "MB")]
    if cuda:
        budgets.append(("cuda", "peak CUDA", summary.get("peak_cuda_mb"), contract.get("cuda_mb"), "MB"))
    budgets.append(("time", "time", wall_s, contract.get("time_s"), "s"))
    for what, label, value, budget, unit in budgets:
        if budget is None:
            checks.append(Check(what, True, f"{label} {_num(value)} {unit} (no budget)"))
        elif value is None:
            checks.append(Check(what, False, f"{label} not recorded, budget {float(budget):g} {unit}"))
        else:
            ok = float(value) <= float(budget)
            checks.append(
                Check(
                    what, ok, f"{label} {_num(value)} {unit} {'<=' if ok else '>'} {float(budget):g} {unit}"
                )
            )
    return checks


def _num(v: Any) -> str:
    return "?" if v is None else f"{float(v):,.0f}" if float(v) >= 100 else f"{float(v):.1f}"


def read_series(run_dir: Path, metric: str) -> list[float]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [float(r[metric]) for r in rows if metric in r]


# ------------------------------------------------------------------------------------- running


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def smoke_command(name: str, contract_overrides: list[str], overrides: list[str], run_dir: Path) -> list[str]:
    """The command line of one smoke run (also what the golden curves are made from)."""
    return [
        sys.executable,
        "-m",
        "dgtrain",
        f"recipe={name}",
        *contract_overrides,
        *overrides,
        f"hydra.run.dir={run_dir}",
    ]


def run_one(name: str, overrides: list[str], device: str | None, out: Path) -> Outcome:
    from dgtrain.recipes import compose, missing_data_files

    run_dir = out / name
    try:
        cfg, _ = compose([f"recipe={name}", *overrides])
        contract = cfg.smoke
        bad = contract_problems(contract)
        if bad:
            return Outcome(name, ERROR, "; ".join(bad))
        smoke_overrides = [str(x) for x in contract.overrides]
        cfg, _ = compose([f"recipe={name}", *smoke_overrides, *overrides])
    except Exception as e:  # noqa: BLE001 - Hydra/OmegaConf composition errors: report and go on
        return Outcome(name, ERROR, f"the config does not compose: {_one_line(e)}")

    own = str(cfg.device)
    if own.startswith("cuda") and device == "cpu":
        # Its budgets (time, memory) are CUDA budgets: run on the CPU they would fail for the wrong reason.
        return Outcome(
            name,
            SKIPPED,
            f"a CUDA recipe (device={own}, CUDA time and memory budgets): not run with device=cpu",
        )
    # Contracts are CPU budgets: a recipe that leaves the device to `auto` runs on the CPU.
    dev = device or (str(cfg.device) if str(cfg.device) != "auto" else "cpu")
    if dev == "auto":  # asked for on the command line: judge the run by the device it will really use
        dev = "cuda" if cuda_available() else "cpu"
    if dev.startswith("cuda") and not cuda_available():
        return Outcome(name, SKIPPED, f"needs CUDA (device={dev}) and torch sees no CUDA device")
    missing = missing_data_files(cfg)
    if missing:
        return Outcome(name, SKIPPED, f"data files absent: {missing}")

    run_dir.mkdir(parents=True, exist_ok=True)
    cmd = smoke_command(name, smoke_overrides, [*overrides, f"device={dev}"], run_dir)
    timeout = 3 * float(contract.time_s) + 60 if contract.time_s else None
    env = dict(os.environ, NO_COLOR="1")
    # Budgets are measured single-threaded: on a loaded or small machine, several torch threads per run
    # make the wall time erratic (tens of times slower when oversubscribed). Set OMP_NUM_THREADS to change.
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as logf:
        logf.write(" ".join(cmd) + "\n")
        logf.flush()
        try:
            proc = subprocess.run(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = None
    wall_s = time.perf_counter() - t0
    if rc is None:
        return Outcome(
            name,
            FAILED,
            f"timed out after {wall_s:.0f} s (budget {contract.time_s} s)",
            [],
            str(run_dir),
            wall_s,
        )
    if rc != 0:
        tail = _last_error(out / f"{name}.log")
        return Outcome(name, FAILED, f"the run exited with code {rc}: {tail}", [], str(run_dir), wall_s)
    summary = json.loads((run_dir / "summary.json").read_text())
    series = read_series(run_dir, str(contract.metric))
    checks = check_contract(contract, series, summary, wall_s, cuda=dev.startswith("cuda"))
    failed = [c.text for c in checks if not c.ok]
    return Outcome(name, FAILED if failed else PASSED, "; ".join(failed), checks, str(run_dir), wall_s)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _last_error(log: Path) -> str:
    lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    marked = [x for x in lines if "error" in x.lower()]
    return (marked or lines or ["(no output)"])[-1][-400:]


# ------------------------------------------------------------------------------------- the report


def print_report(outcomes: list[Outcome]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 150), no_color=bool(os.environ.get("NO_COLOR")))
    table = Table(title="dgtrain smoke", title_justify="left")
    for col in ("recipe", "status", "metric vs bound", "peak memory vs budget", "time vs budget"):
        table.add_column(col)
    style = {PASSED: "green", FAILED: "bold red", ERROR: "bold red", SKIPPED: "yellow"}
    for o in outcomes:
        metric = o.check("metric")
        mem = " | ".join(c.text for c in o.checks if c.what in ("rss", "cuda"))
        tm = o.check("time")
        table.add_row(
            o.recipe,
            f"[{style[o.status]}]{o.status}[/]",
            metric.text if metric else o.reason,
            mem or "-",
            tm.text if tm else (f"{o.wall_s:.1f} s" if o.wall_s is not None else "-"),
        )
    console.print(table)
    # The reasons again as plain lines: a narrow table may wrap them, a log search should find them.
    for o in outcomes:
        if o.status != PASSED:
            print(f"{o.recipe}: {o.status}: {o.reason}")
    counts = {s: sum(o.status == s for o in outcomes) for s in (PASSED, FAILED, ERROR, SKIPPED)}
    print(", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n) or "no recipes")


def main(argv: list[str]) -> int:
    from dgtrain.recipes import select

    parser = argparse.ArgumentParser(
        prog="dgtrain smoke",
        description="Run the smoke contract of each recipe (all by default) and print a table; "
        "exit 1 if any fails. key=value arguments apply to every run; device=cpu|cuda picks the device.",
    )
    parser.add_argument("items", nargs="*", metavar="NAME | key=value")
    parser.add_argument("--out", type=Path, help="folder for the runs (default outputs/smoke/<time>)")
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    recipes, overrides = select(args.items)
    device = next((x.split("=", 1)[1] for x in overrides if x.startswith("device=")), None)
    overrides = [x for x in overrides if not x.startswith("device=")]
    if not recipes:
        raise DgtrainError("no recipes to run (the recipes folder is empty).")
    out = args.out or Path("outputs/smoke") / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)

    outcomes = []
    for r in recipes:
        print(f"smoke: {r.name} ...", flush=True)
        outcomes.append(run_one(r.name, overrides, device, out))
        o = outcomes[-1]
        print(f"smoke: {r.name} {o.status}" + (f" in {o.wall_s:.1f} s" if o.wall_s else ""), flush=True)
    print_report(outcomes)
    print(f"runs and logs in {out}")
    if args.json:
        args.json.write_text(json.dumps([asdict(o) for o in outcomes], indent=2) + "\n")
    return 1 if any(o.status in (FAILED, ERROR) for o in outcomes) else 0
