"""dgtrain's loop against the loops its users would otherwise write: same model, same data, one process.

    python scripts/bench.py [--device cpu|cuda] [--cases linreg mlp ...] [--steps N] [--repeats R]
                            [--compile auto|on|off] [--threads T] [--json FILE] [--set KEY=VALUE ...]

Runners, for each case:
- dgtrain:   `dgtrain.train.fit` on the composed config (defaults plus the case's overrides, logging every
             10 steps), timed by the loop's own `perf/step_ms`, averaged over the log windows of the second
             half of its steps (the first half is warm-up); each window also pays for a logging step;
- hand:      `for batch in DataLoader: to(device); autocast; loss; backward; step; zero_grad`, no sync,
             over the model, dataset and loss that `dgtrain.train.setup` builds (so they are the same);
- resident:  the data moved to the device once, batches drawn by `randperm` (token files: random windows),
             fused Adam on CUDA, channels_last for images; not for variable-length sequences;
- lightning: a LightningModule around the same model, when `lightning` is installed (skipped otherwise).

Every runner builds a fresh model from the same seed, runs `--steps` warm-up steps, then `--steps` timed
steps (ending with a device synchronize). Runs alternate (dgtrain, hand, resident, lightning, dgtrain, ...)
`--repeats` times, so drift in machine load falls on all alike; the table gives medians and ratios.
For the decoder LM it adds MFU, with FLOPs per token counted as nanoGPT does (6N + 12·L·H·Q·T, N the
parameters without the embedding tables) against `dgtrain.telemetry.peak_tflops` (or --peak-tflops).
On CUDA it reports each runner's peak allocated memory, and dgtrain's less the datasets it keeps on the
GPU (data.device_resident) over the hand loop's: the memory target leaves the resident data out.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's dgtrain

RUNNERS = ("dgtrain", "hand", "resident", "lightning")


@dataclass
class Case:
    name: str
    overrides: list[str]
    cuda_only: bool = False
    lm: bool = False  # a decoder LM: MFU is reported, and compile=auto compiles it on CUDA
    extra: dict = field(default_factory=dict)


def cases(device: str) -> dict[str, Case]:
    cuda = device == "cuda"
    bf16 = ["precision=bf16"] if cuda else []
    if cuda:  # GPT-2 small: d=768, 12 layers, 12 heads, T=1024, vocab 50,257 padded to 50,304; as GPT-2
        # (and nanoGPT) the head is tied to the token embedding and has no bias: 124M parameters
        lm = ["model.d_model=768", "model.n_layers=12", "model.n_heads=12", "data.seq_len=1024"]
        lm += ["model.tie_weights=true", "model.head_bias=false", "model.init=gpt2"]
        lm += ["model.max_positions=1024", "data.batch_size=16", "model.dropout=0.0", *bf16]
        vocab = 50257
    else:
        lm = ["model.d_model=64", "model.n_layers=2", "model.n_heads=4", "data.seq_len=64"]
        lm += ["model.max_positions=64", "data.batch_size=16", "model.dropout=0.0"]
        vocab = 512
    return {
        c.name: c
        for c in [
            Case("linreg", ["model=linreg", "data.batch_size=64"]),
            Case("mlp", ["model=mlp", "data.batch_size=64"]),
            Case("convnet", ["model=convnet", "data.batch_size=64"]),
            Case(
                "convnet_bf16",
                ["model=convnet", "data=synthetic_images", "data.image_size=32", "data.num_examples=8192"]
                + ["data.batch_size=512", "precision=bf16"],
                cuda_only=True,
            ),
            Case("seq2seq", ["model=transformer", "data.batch_size=64", *bf16]),
            Case(
                "lm",
                ["model=transformer", "data=tokens", "model.vocab_multiple=64", *lm],
                lm=True,
                extra={"vocab": vocab},
            ),
        ]
    }


# --------------------------------------------------------------------------------------------- set-up


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


def token_files(folder: Path, vocab: int, n_tokens: int) -> list[str]:
    """A random token stream (speed does not depend on what the tokens say) in nanoGPT's raw layout."""
    import numpy as np

    path = folder / "train.bin"
    if not path.exists():
        np.random.default_rng(0).integers(0, vocab, size=n_tokens, dtype=np.uint16).tofile(path)
        (folder / "meta.json").write_text(json.dumps({"vocab_size": vocab, "dtype": "uint16"}))
    return [f"data.train_path={path}", "data.val_fraction=0.01"]


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


@dataclass
class Built:
    """What the hand-written loops share with dgtrain: `dgtrain.train.setup`'s model, data and loss."""

    cfg: object
    device: object
    setup: object
    autocast: object
    opt_cls: type
    lr: float
    batch_size: int


def build(cfg, compile_: bool) -> Built:
    import torch

    from dgtrain.config import allowed_prefixes, locate
    from dgtrain.train import autocast_for, precision_of, resolve_device, seed_everything, setup

    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    s = setup(cfg, device)
    if compile_:
        s.model = torch.compile(s.model)  # as a user would; `trainer.compile` does the same in dgtrain
    opt_cls = locate(str(cfg.optimizer._target_), allowed_prefixes(cfg))
    return Built(
        cfg,
        device,
        s,
        autocast_for(device, precision_of(cfg)),
        opt_cls,
        float(cfg.optimizer.lr),
        int(cfg.data.batch_size),
    )


def identity(batch):
    return batch


def host_loader(b: Built):
    from torch.utils.data import DataLoader

    return DataLoader(
        b.setup.data.train,
        batch_size=b.batch_size,
        shuffle=True,
        collate_fn=identity,  # dgtrain's datasets return whole batches from __getitems__
        pin_memory=b.device.type == "cuda",
    )


def forever(loader):
    while True:
        yield from loader


def timed(step, steps: int, device) -> float:
    """ms per step of `steps` calls of `step()` after as many warm-up calls."""
    for _ in range(steps):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return 1000.0 * (time.perf_counter() - t0) / steps


# -------------------------------------------------------------------------------------------- runners


def resident_mb(data) -> float:
    """MB of the datasets dgtrain moved to the GPU (data.device_resident), which the memory target leaves out."""
    return sum(
        ds.nbytes() / 2**20
        for ds in (data.train, data.val)
        if getattr(ds, "device", None) is not None and ds.device.type == "cuda"
    )


def run_dgtrain(cfg, steps: int, compile_: bool, device) -> tuple[float, float]:
    """(ms per step, MB of data kept on the GPU)."""
    from dgtrain.train import fit

    over = copy.deepcopy(cfg)
    over.trainer.max_steps = 2 * steps  # the first half warms up, the second is timed
    over.trainer.eval_every = 10**9  # evaluate once, at the end, outside the timed steps
    over.trainer.eval_batches = 1
    if compile_:
        over.trainer.compile = True
    with tempfile.TemporaryDirectory() as run_dir, contextlib.redirect_stdout(io.StringIO()):
        result = fit(over, Path(run_dir))
    # the log windows of the timed half, at the case's own trainer.log_every (default 10): a window's
    # time includes the previous logging step's work (metrics, sinks, console), so logging is paid for
    rows = [r for r in result.history if "perf/step_ms" in r and r["step"] > steps]
    return statistics.fmean(float(r["perf/step_ms"]) for r in rows), resident_mb(result.setup.data)


def run_hand(b: Built, steps: int) -> float:
    s, task = b.setup, b.setup.task
    opt = b.opt_cls(s.model.parameters(), lr=b.lr)
    batches = forever(host_loader(b))
    s.model.train()

    def step():
        batch = [t.to(b.device, non_blocking=True) for t in next(batches)]
        with b.autocast():
            loss = task.loss(s.model, batch, s.loss_fn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, b.device)


def resident_batches(b: Built):
    """Batches drawn on the device from data moved there once; None for variable-length sequences."""
    import torch

    from dgtrain.data import TensorPairs
    from dgtrain.data.sequences import TokenWindows as TextWindows
    from dgtrain.data.tokens import TokenWindows as FileWindows

    ds, dev, bs = b.setup.data.train, b.device, b.batch_size
    if isinstance(ds, TensorPairs):
        x, y = ds.x.to(dev), ds.y.to(dev)
        if x.ndim == 4 and dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        n = len(x)

        def gen():
            while True:
                perm = torch.randperm(n, device=dev)
                for i in range(0, n, bs):
                    idx = perm[i : i + bs]
                    yield x[idx], y[idx]

        return gen()
    if isinstance(ds, (TextWindows, FileWindows)):
        import numpy as np

        if isinstance(ds, FileWindows):
            toks = torch.from_numpy(np.asarray(ds.file.tokens[ds.start : ds.stop]).astype(np.int64))
        else:
            toks = ds.tokens
        toks, t = toks.to(dev), ds.seq_len
        offsets = torch.arange(t + 1, device=dev)

        def gen():
            while True:  # nanoGPT's get_batch, on the device
                w = toks[torch.randint(len(toks) - t - 1, (bs,), device=dev)[:, None] + offsets]
                yield w[:, :-1], w[:, 1:]

        return gen()
    return None


def run_resident(b: Built, steps: int) -> float | None:
    import torch

    batches = resident_batches(b)
    if batches is None:
        return None
    s, task = b.setup, b.setup.task
    if b.device.type == "cuda" and any(p.ndim == 4 for p in s.model.parameters()):
        s.model.to(memory_format=torch.channels_last)
    fused = {"fused": True} if b.device.type == "cuda" else {}
    opt = b.opt_cls(s.model.parameters(), lr=b.lr, **fused)
    s.model.train()

    def step():
        batch = next(batches)
        with b.autocast():
            loss = task.loss(s.model, batch, s.loss_fn)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return timed(step, steps, b.device)


def lightning_module():
    try:
        import lightning as L  # noqa: N812
    except ImportError:
        try:
            import pytorch_lightning as L  # noqa: N812
        except ImportError:
            return None
    return L


def run_lightning(b: Built, steps: int, L) -> float:  # noqa: N803
    s, task = b.setup, b.setup.task
    marks: dict[str, float] = {}

    class Wrapped(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = s.model

        def training_step(self, batch, batch_idx):
            return task.loss(self.model, batch, s.loss_fn)

        def configure_optimizers(self):
            return b.opt_cls(self.parameters(), lr=b.lr)

    class Clock(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            if trainer.global_step == steps and "t0" not in marks:
                sync(b.device)
                marks["t0"] = time.perf_counter()

        def on_train_end(self, trainer, module):
            sync(b.device)
            marks["t1"] = time.perf_counter()

    from dgtrain.train import precision_of

    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[precision_of(b.cfg)]
    trainer = L.Trainer(
        max_steps=2 * steps,
        accelerator="gpu" if b.device.type == "cuda" else "cpu",
        devices=1,
        precision=precision,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[Clock()],
    )
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer.fit(Wrapped(), train_dataloaders=host_loader(b))
    return 1000.0 * (marks["t1"] - marks["t0"]) / steps


# ----------------------------------------------------------------------------------------------- MFU


def lm_flops_per_token(model, seq_len: int) -> float:
    """nanoGPT's estimate: 6N + 12·L·H·Q·T, N without the embedding tables (lookups, no FLOPs); the
    output head counts, as nanoGPT's tied `wte` does (tied or not, the head's matrix is counted once)."""
    n = sum(p.numel() for p in model.parameters()) - model.pos_emb.weight.numel()
    if model.head.weight is not model.tok_emb.weight:  # untied: the embedding table is a lookup apart
        n -= model.tok_emb.weight.numel()
    layers, heads = len(model.decoder), model.decoder[0].self_attn.n_heads
    q = model.tok_emb.embedding_dim // heads
    return 6 * n + 12 * layers * heads * q * seq_len


# ---------------------------------------------------------------------------------------------- main


def machine(device) -> dict:
    import torch

    from dgtrain.train import _device_name

    return {
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "lightning": getattr(lightning_module(), "__version__", None),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--cases", nargs="+", help="default: every case the device supports")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (and as many warm-up steps)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--runners", nargs="+", default=list(RUNNERS), choices=RUNNERS)
    ap.add_argument("--compile", choices=["auto", "on", "off"], default="auto", help="auto: the LM on CUDA")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: GPU table)"
    )
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument(
        "--set",
        dest="extra",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override for every case and runner, after the case's own (e.g. data.batch_size=48)",
    )
    args = ap.parse_args(argv)

    logging.getLogger("dgtrain").setLevel(logging.WARNING)
    os.environ.setdefault("WANDB_MODE", "disabled")
    import torch

    from dgtrain.telemetry import peak_tflops

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: CUDA is not available", file=sys.stderr)
        return 2
    all_cases = cases(args.device)
    names = args.cases or [n for n, c in all_cases.items() if args.device == "cuda" or not c.cuda_only]
    unknown = [n for n in names if n not in all_cases]
    if unknown:
        print(f"unknown case(s) {unknown}; cases: {', '.join(all_cases)}", file=sys.stderr)
        return 2
    L = lightning_module()  # noqa: N806
    runners = [r for r in args.runners if r != "lightning" or L is not None]
    if "lightning" in args.runners and L is None:
        print("lightning is not installed: its column is skipped", file=sys.stderr)
    device = torch.device(args.device)
    peak = peak_tflops(device, args.peak_tflops)
    results = {"machine": machine(device), "args": {k: str(v) for k, v in vars(args).items()}, "cases": []}

    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            case = all_cases[name]
            if case.cuda_only and args.device != "cuda":
                print(f"{name}: CUDA only, skipped", file=sys.stderr)
                continue
            steps = args.steps or (50 if args.device == "cuda" else 100 if not case.lm else 30)
            overrides = [*case.overrides, f"device={args.device}", *args.extra]
            if case.lm:  # the last setting of a key wins, as in Hydra
                b = int([o for o in overrides if o.startswith("data.batch_size=")][-1].split("=")[1])
                t = int([o for o in overrides if o.startswith("data.seq_len=")][-1].split("=")[1])
                overrides += token_files(
                    Path(tmp), case.extra["vocab"], (4 * steps + 8) * b * (t + 1) + 4 * t
                )
            cfg = compose(overrides)
            compile_ = args.compile == "on" or (args.compile == "auto" and case.lm and args.device == "cuda")
            times: dict[str, list[float]] = {r: [] for r in runners}
            peaks: dict[str, float | None] = {}
            data_mb = 0.0
            for _ in range(args.repeats):
                for r in runners:
                    reset_peak(device)
                    if r == "dgtrain":
                        ms, data_mb = run_dgtrain(cfg, steps, compile_, device)
                    else:
                        built = build(cfg, compile_)
                        run = {"hand": run_hand, "resident": run_resident, "lightning": run_lightning}[r]
                        ms = run(built, steps, L) if r == "lightning" else run(built, steps)
                        del built
                    if ms is not None:
                        times[r].append(ms)
                    peaks[r] = peak_mb(device)
            med = {r: statistics.median(v) for r, v in times.items() if v}
            row = {"case": name, "steps": steps, "compile": compile_, "ms": times, "median_ms": med}
            row["batch_size"] = int(cfg.data.batch_size)
            row["peak_mb"], row["resident_data_mb"] = peaks, data_mb
            if peaks.get("dgtrain") and peaks.get("hand"):  # the memory target: less the resident dataset
                row["dgtrain_peak/hand"] = (peaks["dgtrain"] - data_mb) / peaks["hand"]
            if "dgtrain" in med:
                for r in ("hand", "resident"):
                    if r in med:
                        row[f"dgtrain/{r}"] = med["dgtrain"] / med[r]
                if "lightning" in med:
                    row["lightning/dgtrain"] = med["lightning"] / med["dgtrain"]
            if case.lm:
                model = build(cfg, False).setup.model
                tokens = int(cfg.data.batch_size) * int(cfg.data.seq_len)
                fpt = lm_flops_per_token(model, int(cfg.data.seq_len))
                row["flops_per_token"] = fpt
                row["tflops"] = {r: fpt * tokens / (ms / 1000) / 1e12 for r, ms in med.items()}
                if peak:
                    row["mfu"] = {r: tf / peak for r, tf in row["tflops"].items()}
            results["cases"].append(row)
            print(format_row(row), file=sys.stderr, flush=True)

    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _f(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def format_row(row: dict) -> str:
    med = row["median_ms"]
    cells = [
        row["case"],
        _f(med.get("dgtrain")),
        _f(med.get("hand")),
        _f(row.get("dgtrain/hand"), ".2f"),
        _f(med.get("resident")),
        _f(row.get("dgtrain/resident"), ".2f"),
        _f(med.get("lightning")),
        _f(row.get("lightning/dgtrain"), ".2f"),
    ]
    mfu = row.get("mfu")
    cells.append(
        " / ".join(f"{r} {100 * v:.1f}%" for r, v in mfu.items())
        if mfu
        else (
            " / ".join(f"{r} {v:.3f}" for r, v in row["tflops"].items()) + " TFLOP/s"
            if "tflops" in row
            else ""
        )
    )
    peaks = row.get("peak_mb") or {}
    cell = " / ".join(f"{r} {v:.0f}" for r, v in peaks.items() if v is not None)
    if "dgtrain_peak/hand" in row:
        cell += f"; dgtrain less {row['resident_data_mb']:.0f} MB data / hand {row['dgtrain_peak/hand']:.2f}"
    cells.append(cell)
    return "| " + " | ".join(cells) + " |"


def table(results: dict) -> str:
    m = results["machine"]
    head = (
        f"{m['device_name']}, torch {m['torch']}, {m['threads']} thread(s); ms/step, medians of "
        f"{results['args']['repeats']} alternating runs\n\n"
        "| case | dgtrain | hand | dgtrain/hand | resident | dgtrain/resident | Lightning | Lightning/dgtrain "
        "| LM MFU (or TFLOP/s) | peak CUDA MB |\n|---|---|---|---|---|---|---|---|---|---|"
    )
    return "\n".join([head, *(format_row(r) for r in results["cases"])])


if __name__ == "__main__":
    raise SystemExit(main())
