"""scripts/bench.py runs dgtrain's public fit and the hand-written loops on the same case, and reports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO, cli_env


def run_script(tmp_path, name: str, *args: str) -> subprocess.CompletedProcess:
    """`python scripts/<name> ARGS` as a user runs it, from a scratch folder."""
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def import_bench():
    """scripts/bench.py as a module (scripts/ is not a package)."""
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import bench
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return bench


@pytest.mark.slow
def test_bench_compares_dgtrain_with_the_hand_and_resident_loops(tmp_path):
    out = tmp_path / "bench.json"
    p = run_script(
        tmp_path,
        "bench.py",
        *["--cases", "linreg", "lm", "--steps", "3", "--repeats", "2"],
        *["--runners", "dgtrain", "hand", "resident", "--json", str(out)],
        *["--set", "data.batch_size=8"],  # after each case's own settings
    )
    assert p.returncode == 0, p.stdout + p.stderr
    assert "| linreg |" in p.stdout and "dgtrain/hand" in p.stdout
    res = json.loads(out.read_text())
    assert res["machine"]["device"] == "cpu"
    rows = {r["case"]: r for r in res["cases"]}
    for name in ("linreg", "lm"):
        row = rows[name]
        assert row["batch_size"] == 8
        assert all(len(row["ms"][r]) == 2 and min(row["ms"][r]) > 0 for r in ("dgtrain", "hand", "resident"))
        assert row["dgtrain/hand"] == pytest.approx(row["median_ms"]["dgtrain"] / row["median_ms"]["hand"])
    # nanoGPT's count for the CPU LM (d=64, 2 layers, 4 heads, T=64, vocab 512): 6N + 12*L*H*Q*T
    attn, ff, norms = 4 * 64 * 64 + 4 * 64, 2 * 64 * 256 + 256 + 64, 2 * 2 * 64
    n = 2 * (attn + ff + norms) + 2 * 64 + (512 * 64 + 512)  # blocks, final norm, head (no embeddings)
    assert rows["lm"]["flops_per_token"] == 6 * n + 12 * 2 * 4 * 16 * 64


def test_lm_flops_count_a_tied_head_once():
    """GPT-2 (the CUDA case) ties the head to the token embedding: the head's matrix still counts, once,
    so tied and untied models of the same shape do the same FLOPs; without a head bias, V fewer."""
    bench = import_bench()
    from dgtrain.models.transformer import Transformer

    def flops(**kw):
        return bench.lm_flops_per_token(Transformer(512, arch="decoder", d_model=64, n_layers=2, **kw), 64)

    assert flops(tie_weights=True) == flops() > flops(tie_weights=True, head_bias=False) == flops() - 6 * 512


@pytest.mark.slow
def test_bench_nonfinite_guard_times_the_guard_the_loop_runs(tmp_path):
    """scripts/bench_nonfinite_guard.py on CPU: plain vs the host-read guard, and fused Adam vs fused Adam
    with the guard as found_inf (torch has a fused Adam on CPU), one row per model with positive times."""
    p = run_script(tmp_path, "bench_nonfinite_guard.py", "--steps", "2", "--rounds", "1", "--models", "mlp")
    assert p.returncode == 0, p.stdout + p.stderr
    header, row = p.stdout.splitlines()[1:3]
    assert header.split()[:8] == ["model", "plain", "ms", "host", "ms", "host", "%", "fused"]
    cells = row.split()
    assert cells[0] == "mlp" and len(cells) == 7, row
    plain, host, fused, guarded = (float(cells[i]) for i in (1, 2, 4, 5))
    assert min(plain, host, fused, guarded) > 0
    assert float(cells[3].rstrip("%")) == pytest.approx(100 * (host / plain - 1), abs=1.0)  # printed rounded


def test_the_memory_ratio_leaves_out_only_the_data_kept_on_the_gpu():
    """The peak-memory target leaves out the datasets dgtrain keeps on the GPU: bench counts those (train
    and validation) and nothing that stays on the host."""
    from types import SimpleNamespace

    import torch

    bench = import_bench()

    def split(mb, device):
        return SimpleNamespace(device=torch.device(device), nbytes=lambda: mb * 2**20)

    on_gpu = SimpleNamespace(train=split(96, "cuda"), val=split(32, "cuda"))
    assert bench.resident_mb(on_gpu) == 128
    assert bench.resident_mb(SimpleNamespace(train=split(96, "cpu"), val=split(32, "cpu"))) == 0
    assert bench.resident_mb(SimpleNamespace(train=object(), val=object())) == 0  # token files: not held
