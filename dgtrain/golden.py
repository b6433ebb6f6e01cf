"""Golden loss curves: the per-step train/loss of the deterministic CPU recipes, kept under tests/golden/.

A curve is the recipe at its smoke setting, cut to GOLDEN_STEPS steps and logged every step, on the CPU
with one thread. tests/test_recipes.py compares a fresh run with the stored curve; after a change that
is *meant* to alter training, refresh them with `python scripts/update_golden.py` and commit the diff.

Why a tolerance and not bitwise equality: the same program gives slightly different floating-point
sums on different CPUs (AVX2 vs AVX-512 kernels in oneDNN/MKL pick different reduction orders), thread
counts and torch releases. Those differences stay near 1e-7 relative over 20 steps here (1 vs 2 threads), while
anything that changes training (initialisation, data order, the loss, the optimizer, the schedule)
moves the curve by far more than RTOL; tests check both sides of that line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

# Recipes whose curves are stored: CPU runs that are a pure function of the seed.
GOLDEN_RECIPES = (
    "linreg_synthetic",
    "linreg_diabetes",
    "mlp_digits",
    "convnet_digits",
    "transformer_reverse",
    "transformer_charlm",
)
GOLDEN_STEPS = 20
RTOL = 1e-4
ATOL = 1e-6


def golden_overrides(smoke_overrides: list[str]) -> list[str]:
    return [*smoke_overrides, f"trainer.max_steps={GOLDEN_STEPS}", "trainer.log_every=1", "device=cpu"]


def run_curve(name: str, run_dir: Path, extra: list[str] | None = None) -> dict[str, Any]:
    """Train recipe `name` in this process (one CPU thread) and return its golden record."""
    import torch

    from dgtrain.recipes import compose
    from dgtrain.train import fit

    cfg, _ = compose([f"recipe={name}"])
    overrides = [f"recipe={name}", *golden_overrides([str(x) for x in cfg.smoke.overrides]), *(extra or [])]
    cfg, choices = compose(overrides)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        result = fit(cfg, run_dir, choices)
    finally:
        torch.set_num_threads(threads)
    rows = [r for r in result.history if "train/loss" in r]
    return {
        "recipe": name,
        "overrides": overrides[1:],
        "torch": torch.__version__,
        "rtol": RTOL,
        "atol": ATOL,
        "steps": [int(r["step"]) for r in rows],
        "train/loss": [float(r["train/loss"]) for r in rows],
    }


def compare(
    expected: dict[str, Any], actual: dict[str, Any], rtol: float = RTOL, atol: float = ATOL
) -> list[str]:
    """Every difference between two curves beyond |a - e| <= atol + rtol * |e| (empty: they match)."""
    if expected["steps"] != actual["steps"]:
        return [f"logged steps differ: expected {expected['steps']}, got {actual['steps']}"]
    out = []
    for step, e, a in zip(expected["steps"], expected["train/loss"], actual["train/loss"], strict=True):
        if not (math.isfinite(a) and abs(a - e) <= atol + rtol * abs(e)):
            out.append(
                f"step {step}: train/loss {a:.8g}, golden {e:.8g} (rel. diff {abs(a - e) / abs(e):.2e} > {rtol:g})"
            )
    return out


def golden_dir() -> Path:
    # Golden files are test data of the checkout; they do not travel in the wheel.
    return Path(__file__).resolve().parent.parent / "tests" / "golden"


def load(name: str) -> dict[str, Any]:
    return json.loads((golden_dir() / f"{name}.json").read_text())


def save(record: dict[str, Any]) -> Path:
    path = golden_dir() / f"{record['recipe']}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    # One key per line: a refreshed curve shows up as a readable diff.
    path.write_text(
        "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in record.items()) + "\n}\n"
    )
    return path
