"""What telemetry costs: the same training with `telemetry.enabled=false` and `true`, in one process.

    python scripts/bench_telemetry.py [--models linreg mlp transformer] [--repeats 7] [--steps N]
                                      [-- extra overrides, e.g. telemetry.graph_every=10]

Runs alternate off-on, on-off, off-on, ... so that drift in machine load (other processes, thermal) falls on
both sides alike. Each run's figure is its mean step time (`perf/step_ms`, which the loop measures
without evaluation), over every logging interval but the first (warm-up). Prints, per model, the
median of each side and the ratio on/off; the cost budget with the defaults is 1.01.

On a shared machine that end-to-end ratio is noisier than the cost it measures, so the script also
times the telemetry's own work directly: its per-step bookkeeping (a non-sampled step's calls) and
the extra time of a sampled forward (saved-tensor hooks + graph walk), and from these and the step
time estimates the overhead: (bookkeeping + sampled extra / graph_every) / step time.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import logging
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dgtrain

STEPS = {"linreg": 600, "mlp": 600, "convnet": 200, "transformer": 120}


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dgtrain.config import register_schema
    from dgtrain.paths import config_dir

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides)


def step_ms(overrides: list[str]) -> tuple[float, float]:
    """(mean wall ms per step, CPU seconds of the whole run) of one training run."""
    import time

    from dgtrain.train import fit

    cfg = compose(overrides)
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        cpu0 = time.process_time()
        result = fit(cfg, Path(run_dir))
        cpu = time.process_time() - cpu0
    rows = [r for r in result.history if "perf/step_ms" in r]
    # (mean step time, steps) of each logging interval after the first
    intervals = [
        (r["perf/step_ms"], r["step"] - prev["step"]) for prev, r in zip(rows, rows[1:], strict=False)
    ]
    return sum(ms * n for ms, n in intervals) / sum(n for _, n in intervals), cpu


def direct_cost(overrides: list[str], repeats: int = 2000) -> dict[str, float]:
    """Microseconds of telemetry work per plain step, and extra microseconds of a sampled forward."""
    import time

    from dgtrain.telemetry import Telemetry
    from dgtrain.train import resolve_device, setup

    cfg = compose(overrides)
    s = setup(cfg, resolve_device("cpu"))
    s.model.train()
    batch = next(iter(s.train_loader))
    tel = Telemetry(cfg.telemetry, s.model, resolve_device("cpu"))

    def fwd():
        return s.task.loss(s.model, batch, s.loss_fn)

    loss = fwd()
    tel.step = 1  # step 2 of a run: not sampled (unless graph_every is 1 or 2)
    t0 = time.process_time()  # CPU time of this (single-threaded) process: less hurt by other load
    for _ in range(repeats):
        with tel.forward(batch):
            pass
        tel.after_forward(loss)
        tel.after_backward()
        tel.after_step()
        tel.step = 1
    bookkeeping = (time.process_time() - t0) / repeats * 1e6

    plain, sampled = [], []
    for _ in range(30):
        t0 = time.process_time()
        fwd()
        plain.append(time.process_time() - t0)
        tel.step = 0  # the first step is always sampled
        t0 = time.process_time()
        with tel.forward(batch):
            out = fwd()
        tel.after_forward(out)
        sampled.append(time.process_time() - t0)
        tel.after_step()
    extra = (min(sampled) - min(plain)) * 1e6  # the minimum: the least disturbed by other load
    return {"bookkeeping_us": bookkeeping, "sample_extra_us": extra, "graph_every": tel.graph_every}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["linreg", "mlp", "transformer"])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default per model)")
    ap.add_argument("overrides", nargs="*", help="extra config overrides for every run")
    args = ap.parse_args()

    import torch

    logging.getLogger("dgtrain").setLevel(logging.WARNING)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device cpu, {args.repeats} repeats")
    print(
        f"{'model':<12} {'steps':>6} {'off ms/step':>12} {'on ms/step':>12} {'on/off':>8} {'cpu on/off':>11}"
        "  spread of wall on/off"
    )
    for model in args.models:
        steps = args.steps or STEPS.get(model, 200)
        base = [
            f"model={model}",
            "device=cpu",
            f"trainer.max_steps={steps}",
            "trainer.log_every=10",
            f"trainer.eval_every={steps}",
            "trainer.eval_batches=1",
            *args.overrides,
        ]
        step_ms(base + ["telemetry.enabled=true"])  # warm-up: first-call costs (imports, allocator)
        off, on, cpu_off, cpu_on = [], [], [], []
        for i in range(args.repeats):
            pair = [("false", off, cpu_off), ("true", on, cpu_on)]
            for flag, wall, cpu in pair if i % 2 == 0 else pair[::-1]:  # off-on, on-off, ...: no order bias
                gc.collect()
                ms, cpu_s = step_ms(base + [f"telemetry.enabled={flag}"])
                wall.append(ms)
                cpu.append(cpu_s)
        ratios = sorted(b / a for a, b in zip(off, on, strict=True))
        m_off, m_on = statistics.median(off), statistics.median(on)
        cpu_ratio = statistics.median(cpu_on) / statistics.median(cpu_off)
        print(
            f"{model:<12} {steps:>6} {m_off:>12.3f} {m_on:>12.3f} {m_on / m_off:>8.3f} {cpu_ratio:>11.3f}  "
            f"pairs {ratios[0]:.3f} .. {ratios[-1]:.3f} (median {statistics.median(ratios):.3f})"
        )
        d = direct_cost(base)
        # a negative extra (the sampled forward timed faster) is noise: count it as zero
        est = (d["bookkeeping_us"] + max(0.0, d["sample_extra_us"]) / d["graph_every"]) / (1000 * m_off)
        print(
            f"{'':<12} direct: {d['bookkeeping_us']:.1f} us/step bookkeeping, sampled forward "
            f"+{d['sample_extra_us'] / 1000:.2f} ms every {d['graph_every']} steps -> estimated "
            f"overhead {100 * est:.2f}% of {m_off:.3f} ms/step"
        )


if __name__ == "__main__":
    main()
