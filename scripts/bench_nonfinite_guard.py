"""What the non-finite guard costs per optimizer step (docs/checkpoints.md, "Non-finite loss").

Compares three versions of one training step on dgtrain's own models and data:
  plain   forward, backward, optimizer step (the loop before the guard)
  flag    + a device-side finite flag over the loss and all gradients, read by the host every step
          (one bool crosses; this is what dgtrain does)
  masked  sync-free alternative: snapshot parameters and optimizer state, step, then
          torch.where(flag, new, old) over all of them (never reads the flag on the host)

    python scripts/bench_nonfinite_guard.py [--steps 150] [--device cpu] [--models mlp transformer]
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
    opt = torch.optim.Adam(s.model.parameters(), lr=1e-3)
    return s, opt, BatchStream(s.train_loader, s.device)


def step_fn(kind: str, s, opt, stream):
    from dgtrain.faults import finite_flag

    params = [p for p in s.model.parameters() if p.requires_grad]

    def one():
        batch = next(stream)
        loss = s.task.loss(s.model, batch, s.loss_fn)
        loss.backward()
        if kind == "plain":
            opt.step()
        elif kind == "flag":
            if bool(finite_flag(loss.detach(), params)):
                opt.step()
        else:  # masked: keep the old values, step, select per tensor on the device
            ok = finite_flag(loss.detach(), params)
            state = [t for p in params for t in opt.state[p].values() if torch.is_tensor(t)]
            old = [t.clone() for t in params + state]
            opt.step()
            new = params + [t for p in params for t in opt.state[p].values() if torch.is_tensor(t)]
            with torch.no_grad():
                for n, o in zip(new, old, strict=False):
                    n.copy_(torch.where(ok, n, o))
        opt.zero_grad(set_to_none=True)

    return one


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", nargs="+", default=["mlp", "convnet", "transformer"])
    args = ap.parse_args()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}")
    print(f"{'model':<12} {'plain ms':>9} {'flag ms':>9} {'masked ms':>10} {'flag %':>7} {'masked %':>9}")
    for name in args.models:
        s, opt, stream = build(name, args.device)
        fns = {k: step_fn(k, s, opt, stream) for k in ("plain", "flag", "masked")}
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(args.rounds):  # interleaved rounds, median: robust to a noisy shared machine
            for k, fn in fns.items():
                times[k].append(time_steps(fn, args.steps, s.device))
        med = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"{name:<12} {med['plain']:9.3f} {med['flag']:9.3f} {med['masked']:10.3f} "
            f"{100 * (med['flag'] / med['plain'] - 1):+6.1f}% {100 * (med['masked'] / med['plain'] - 1):+8.1f}%"
        )


if __name__ == "__main__":
    main()
