"""2-process DDP scaling on CPU: samples/s of `trainer.devices=2` (2 x B) against one process (1 x 2B).

    python scripts/bench_ddp.py [--model convnet] [--batch 64] [--steps 300] [--repeats 3] [--device cpu]
                                [-- extra overrides]

Both sides train the same global batch, so they do the same arithmetic per step; the 2-process side splits
it over two workers (gloo on CPU, nccl on CUDA). Each run's figure is `perf/samples_per_s` (summed over
ranks by the loop), averaged over every logging interval but the first (warm-up, imports excluded).
Runs alternate 1, 2, 1, 2, ... so that drift in machine load falls on both sides alike; the script prints
the median of each side and the ratio 2-proc / 1-proc (ideal: 2.0 with two free cores or GPUs).

`--device cuda --devices 1` measures DDP's own overhead on one GPU: `trainer.devices=1` is one process
without DDP, so for that figure run with torchrun --nproc-per-node=1 (see docs/distributed.md).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(procs: int, args: argparse.Namespace, extra: list[str], out: Path) -> float:
    batch = args.batch // procs  # per process: the global batch is the same on both sides
    overrides = [
        f"model={args.model}",
        f"device={args.device}",
        f"data.batch_size={batch}",
        f"trainer.max_steps={args.steps}",
        f"trainer.log_every={args.steps // 6}",
        f"trainer.eval_every={10 * args.steps}",
        "trainer.eval_batches=1",
        "checkpoint.every=null",
        "telemetry.enabled=false",
        f"hydra.run.dir={out}",
        *([f"trainer.devices={procs}"] if procs > 1 else []),
        *extra,
    ]
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    p = subprocess.run(
        [sys.executable, "-m", "dgtrain", *overrides], env=env, capture_output=True, text=True, cwd=out.parent
    )
    if p.returncode:
        sys.exit(f"run failed ({procs} process(es)):\n{p.stderr[-2000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["perf/samples_per_s"] for r in rows if "perf/samples_per_s" in r][1:]
    return statistics.mean(rates)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="convnet")
    ap.add_argument("--batch", type=int, default=64, help="global batch (split over the processes)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("extra", nargs="*", help="more overrides, after --")
    args = ap.parse_args()
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            one.append(run(1, args, args.extra, Path(tmp) / f"one{i}"))
            two.append(run(2, args, args.extra, Path(tmp) / f"two{i}"))
            print(
                f"repeat {i + 1}: 1 process {one[-1]:,.0f} samples/s | 2 processes {two[-1]:,.0f} samples/s"
            )
    a, b = statistics.median(one), statistics.median(two)
    print(
        f"{args.model}, global batch {args.batch}, {args.device}, OMP_NUM_THREADS="
        f"{os.environ.get('OMP_NUM_THREADS', '1')}: 1 process {a:,.0f} samples/s, 2 processes (DDP) "
        f"{b:,.0f} samples/s, ratio {b / a:.2f}x"
    )


if __name__ == "__main__":
    main()
