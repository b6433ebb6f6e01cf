"""What the non-finite guard costs per optimizer step (docs/checkpoints.md, "Non-finite loss or gradients").

Times one fp32 training step of dgtrain's own models and data (default configs), each way below in
interleaved rounds (median), the guard exactly as `Loop.train_step` (dgtrain/train.py) runs it:

  plain        forward, backward, `optimizer.step()` of torch's default Adam (for-loop on CPU, foreach
               on CUDA): a loop without the guard
  host         + `faults.nonfinite_check` (one AMP `_amp_foreach_non_finite_check_and_unscale_` call over
               the loss and every gradient, unscale factor 1) whose flag the host reads (`.item()`) before
               stepping: what dgtrain does with optimizers that cannot skip an update themselves
  fused        forward, backward, step of fused Adam (`optimizer.fused=true`) without the guard
  fused+guard  + `nonfinite_check` handed to the fused optimizer as `found_inf` (folded into the sticky
               `nonfinite=fail` flag), the flags read back only every `--log-every` steps: what dgtrain
               does with fused optimizers (the default on CUDA); nothing crosses to the host per step

The fused columns are left out where torch has no fused Adam for the device.

    python scripts/bench_nonfinite_guard.py [--steps 100] [--rounds 5] [--device cpu]
        [--models mlp convnet transformer] [--log-every 10]

Measured on CPU (2 cores shared with other jobs, OMP_NUM_THREADS=1, torch 2.13; median of 5 interleaved
rounds; ms per step; the guard's cost against the column to its left; two runs for mlp and convnet, at
100 and 300 steps a round, one for the transformer, at 100):

    model        plain ms  host ms  host %  fused ms  fused+guard ms  guard %
    mlp             0.440    0.431   -2.0%     0.306           0.355   +16.3%
                    0.430    0.459   +6.8%     0.316           0.373   +18.0%
    convnet         2.309    2.299   -0.4%     2.088           2.184    +4.6%
                    2.408    2.428   +0.8%     2.251           2.308    +2.5%
    transformer    41.880   41.888   +0.0%    39.714          40.263    +1.4%

(mlp and convnet on digits, batch 64; the transformer on seq2seq reverse.) On the CPU the guard adds
0.03-0.1 ms a step, under 2% but for the smallest model: the check (one call, tensor by tensor on the CPU;
about 8 us for four small tensors, timed alone) and, for fused Adam, handing it `found_inf` (about 6 us). The host read itself costs nothing
there, since the CPU has run the queued work already; on a GPU it would stop the host from queueing
ahead, which the fused path avoids (docs/loop.md). Differences of a few percent are within the noise.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build(model_name: str, device: str):
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dgtrain.config import register_schema
    from dgtrain.paths import config_dir
    from dgtrain.train import BatchStream, setup

    register_schema()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model_name}", f"device={device}"])
    s = setup(cfg)
    return s, BatchStream(s.train_loader, s.device)


def fused_adam(params, lr: float) -> torch.optim.Optimizer | None:
    """Fused Adam on the parameters' device, or None where torch has none (or it cannot take found_inf)."""
    try:
        opt = torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, ValueError):
        return None
    return opt if getattr(opt, "_step_supports_amp_scaling", False) else None


def step_fn(kind: str, s, opt: torch.optim.Optimizer, stream, log_every: int):
    from dgtrain.faults import nonfinite_check

    params = [p for p in s.model.parameters() if p.requires_grad]
    one = torch.ones((), device=s.device)  # the loop's unscale factor
    found_buf = torch.zeros((), device=s.device)  # reused for the host read, as the loop does
    halted = torch.zeros((), device=s.device)  # nonfinite=fail: sticky from the first bad step
    unread: list[torch.Tensor] = []

    def step():
        batch = next(stream)
        loss = s.task.loss(s.model, batch, s.loss_fn)
        loss.backward()
        if kind == "host":
            found = nonfinite_check(loss.detach(), params, one, out=found_buf)
            if not found.item():
                opt.step()
        elif kind == "fused+guard":
            found = nonfinite_check(loss.detach(), params, one)
            opt.found_inf, opt.grad_scale = torch.maximum(halted, found, out=halted), None
            try:
                opt.step()
            finally:
                del opt.found_inf, opt.grad_scale
            unread.append(found)
            if len(unread) == log_every:  # the loop reads the flags with the losses at a logging step
                torch.stack(unread).tolist()
                unread.clear()
        else:  # plain, fused: no guard
            opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def time_steps(fn, steps: int, device: torch.device) -> float:
    for _ in range(10):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1000.0 * (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=100, help="timed steps per round and way")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the median is reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=["mlp", "convnet", "transformer"])
    ap.add_argument("--log-every", type=int, default=10, help="fused+guard: read the flags every N steps")
    args = ap.parse_args(argv)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(
        f"{'model':<12} {'plain ms':>8} {'host ms':>8} {'host %':>7} "
        f"{'fused ms':>9} {'fused+guard ms':>15} {'guard %':>8}"
    )
    for name in args.models:
        s, stream = build(name, args.device)
        params = [p for p in s.model.parameters() if p.requires_grad]
        plain_opt = torch.optim.Adam(params, lr=1e-3)
        fns = {k: step_fn(k, s, plain_opt, stream, args.log_every) for k in ("plain", "host")}
        fused_opt = fused_adam(params, lr=1e-3)
        if fused_opt is not None:
            fns.update(
                {k: step_fn(k, s, fused_opt, stream, args.log_every) for k in ("fused", "fused+guard")}
            )
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.rounds):  # interleaved rounds, median: robust to a noisy shared machine
            for k, fn in fns.items():
                times[k].append(time_steps(fn, args.steps, s.device))
        med = {k: statistics.median(v) for k, v in times.items()}
        row = f"{name:<12} {med['plain']:8.3f} {med['host']:8.3f} {100 * (med['host'] / med['plain'] - 1):+6.1f}%"
        if fused_opt is not None:
            guard = 100 * (med["fused+guard"] / med["fused"] - 1)
            row += f" {med['fused']:9.3f} {med['fused+guard']:15.3f} {guard:+7.1f}%"
        else:
            row += f" {'-':>9} {'-':>15} {'-':>8}"
        print(row, flush=True)


if __name__ == "__main__":
    main()
