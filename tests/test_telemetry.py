"""Telemetry: saved-for-backward bytes, graph figures, FLOPs, and the figures a run logs."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dgtrain.models.linreg import LinearRegression
from dgtrain.models.mlp import MLP
from dgtrain.models.transformer import Transformer
from dgtrain.telemetry import graph_stats, peak_tflops, transformer_flops
from tests.conftest import read_metrics, run_cli


def test_saved_bytes_match_hand_count():
    """MLP 4 -> 8 -> 3 on a batch of 5 (float32), MSE loss. Saved for backward, parameters aside:
    fc1 saves its input x (5x4), sigmoid its output (5x8), which fc2 saves again (same storage, counted
    once), and mse_loss its prediction (5x3) and target (5x3)."""
    torch.manual_seed(0)
    model = MLP(4, 8, 3)
    x, y = torch.randn(5, 4), torch.randn(5, 3)
    stats = graph_stats(model, lambda b: F.mse_loss(model(b[0]), b[1]), (x, y))
    assert stats["saved_bytes"] == 4 * (5 * 4 + 5 * 8 + 5 * 3 + 5 * 3)  # 360 bytes
    assert stats["shapes"] == "5x4 5x3"


def _seq_batch(b: int, s: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(s * 100 + t)
    return torch.randint(3, 13, (b, s), generator=g), torch.randint(3, 13, (b, t), generator=g)


def test_transformer_graph_grows_with_sequence_length():
    torch.manual_seed(0)
    model = Transformer(13, d_model=16, n_heads=2, n_layers=1, pad_id=0, bos_id=1, eos_id=2)

    def loss(batch):
        src, tgt = batch
        return F.cross_entropy(model(src, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten())

    short = graph_stats(model, loss, _seq_batch(4, 5, 6))
    long = graph_stats(model, loss, _seq_batch(4, 11, 12))
    assert long["saved_bytes"] > short["saved_bytes"] > 0
    assert short["nodes"] > 50
    assert (short["shapes"], long["shapes"]) == ("4x5 4x6", "4x11 4x12")


def test_linreg_graph_does_not_depend_on_batch_content():
    torch.manual_seed(0)
    model = LinearRegression(8, 1)

    def loss(batch):
        return F.mse_loss(model(batch[0]), batch[1])

    a = graph_stats(model, loss, (torch.randn(16, 8), torch.randn(16, 1)))
    b = graph_stats(model, loss, (torch.randn(16, 8) * 100, torch.zeros(16, 1)))
    assert (a["nodes"], a["saved_bytes"]) == (b["nodes"], b["saved_bytes"])
    assert a["saved_bytes"] == 4 * (16 * 8 + 16 + 16)  # input, prediction, target


@pytest.mark.parametrize("arch", ["encdec", "decoder"])
def test_transformer_flops_match_torch_flop_counter(arch):
    """Forward FLOPs = a third of the training FLOPs; the math attention path makes every product visible."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = Transformer(
        13, arch=arch, d_model=32, n_heads=4, d_ff=48, dropout=0.0, pad_id=0, bos_id=1, eos_id=2
    )
    src, tgt = _seq_batch(3, 7, 10)
    batch = (src, tgt) if arch == "encdec" else (src, src)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(src, tgt[:, :-1]) if arch == "encdec" else model(src)
    assert transformer_flops(model, [t.shape for t in batch]) == 3 * counter.get_total_flops()


def test_peak_table_and_override():
    assert peak_tflops(torch.device("cpu")) is None
    assert peak_tflops(torch.device("cpu"), 2.5) == 2.5


def _fit(compose, tmp_path, overrides):
    from dgtrain.train import fit

    cfg = compose(["device=cpu", "trainer.eval_batches=1", *overrides])
    return fit(cfg, tmp_path)


def test_logged_figures_on_cpu(compose, tmp_path):
    """Graph figures on sampled steps only, distinct shapes on every log, and no CUDA keys at all."""
    result = _fit(
        compose,
        tmp_path,
        [
            "model=linreg",
            "trainer.max_steps=20",
            "trainer.log_every=5",
            "trainer.eval_every=20",
            "telemetry.graph_every=10",
        ],
    )
    rows = {r["step"]: r for r in result.history}
    assert set(rows) == {5, 10, 15, 20}
    assert "graph/nodes" in rows[5] and "graph/nodes" in rows[10] and "graph/nodes" in rows[20]
    assert "graph/nodes" not in rows[15]  # no sample in steps 11..15
    assert rows[5]["graph/saved_mb"] == rows[10]["graph/saved_mb"] > 0
    # 819 training examples: 12 batches of 64, then one of 51 at step 13 (a second shape)
    assert [rows[s]["graph/distinct_shapes"] for s in (5, 10, 15, 20)] == [1, 1, 2, 2]
    for r in rows.values():
        assert r["mem/rss_mb"] > 0 and r["mem/rss_peak_mb"] > 0
        assert not [k for k in r if k.startswith("mem/cuda")], r  # absent, not zero
        assert "perf/mfu" not in r and "perf/flops_per_token" not in r  # linreg: FLOPs not modelled
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["telemetry"]["largest_graph"]["nodes"] == rows[5]["graph/nodes"]
    assert summary["telemetry"]["distinct_shapes"] == 2
    assert summary["telemetry"]["common_shapes"][0] == {"shapes": "64x8 64x1", "batches": 19}
    assert summary["peak_cuda_mb"] is None


def test_transformer_flops_and_mfu_with_a_given_peak(compose, tmp_path):
    result = _fit(
        compose,
        tmp_path,
        [
            "model=transformer",
            "model.d_model=16",
            "model.n_heads=2",
            "model.n_layers=1",
            "data.num_examples=400",
            "data.batch_size=16",
            "trainer.max_steps=6",
            "trainer.log_every=3",
            "telemetry.peak_tflops=0.5",
        ],
    )
    for r in result.history:
        assert r["perf/flops_per_token"] > 0
        # mfu = flops / seconds / peak and flops_per_token = flops / tokens, so their ratio is tokens/s / peak
        assert r["perf/mfu"] == pytest.approx(
            r["perf/flops_per_token"] * r["perf/tokens_per_s"] / 0.5e12, rel=1e-6
        )
    assert result.summary["telemetry"]["distinct_shapes"] >= 1


def test_disabled_telemetry_logs_no_graph_figures(compose, tmp_path):
    result = _fit(compose, tmp_path, ["model=linreg", "trainer.max_steps=4", "telemetry.enabled=false"])
    for r in result.history:
        assert not [k for k in r if k.startswith("graph/") or k == "perf/flops_per_token"]
        assert "mem/rss_mb" in r
    assert result.summary["telemetry"] == {"enabled": False}


def test_bad_telemetry_settings_are_reported(compose):
    from dgtrain.errors import DgtrainError
    from dgtrain.validation import check_config

    cfg = compose(["model=linreg", "telemetry.graph_every=0", "telemetry.peak_tflops=-1"])
    with pytest.raises(DgtrainError) as e:
        check_config(cfg)
    assert "telemetry.graph_every=0: must be at least 1" in str(e.value)
    assert "telemetry.peak_tflops=-1" in str(e.value)


@pytest.mark.slow
def test_cli_run_plain_console_shows_telemetry(tmp_path):
    run_dir = tmp_path / "run"
    p = run_cli(
        [
            "model=mlp",
            "device=cpu",
            "trainer.max_steps=10",
            "trainer.log_every=5",
            f"hydra.run.dir={run_dir}",
        ],
        cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert " graph " in out and "KB" in out and "saved for backward" in out
    rows = read_metrics(run_dir)
    assert rows[0]["graph/nodes"] > 0 and not [k for k in rows[0] if k.startswith("mem/cuda")]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_memory_and_phase_peaks(compose, tmp_path):
    result = _fit(
        compose,
        tmp_path,
        ["model=transformer", "device=cuda", "trainer.max_steps=6", "trainer.log_every=3", "precision=bf16"]
        + ["telemetry.graph_every=3"],  # sampled (and phase-probed) steps 1, 3 and 6: one in each interval
    )
    for r in result.history:
        for key in ("alloc", "reserved", "peak", "active_peak", "peak_fwd", "peak_bwd", "peak_opt"):
            assert r[f"mem/cuda_{key}_mb"] > 0, key
        assert r["mem/cuda_peak_mb"] >= max(r["mem/cuda_peak_fwd_mb"], r["mem/cuda_peak_bwd_mb"])
        assert 0 < r["mem/cuda_peak_reserved_pct"] <= 100
        assert r["mem/cuda_ooms"] == 0
        assert r["perf/flops_per_token"] > 0
        if peak_tflops(torch.device("cuda")) is not None:
            assert 0 < r["perf/mfu"] < 1


def test_allocator_figures_read_from_the_nested_stats_equal_torchs_flat_ones(monkeypatch):
    """dgtrain reads the CUDA allocator's statistics in their nested form (cheaper on every logging step);
    each figure must be the one torch.cuda.memory_stats gives under the same flat name."""
    from dgtrain.memory import cuda_stats

    def figures(base: int) -> dict:
        return {"current": base, "peak": 3 * base, "allocated": 5 * base, "freed": 4 * base}

    nested = {
        "num_alloc_retries": 2,
        "num_ooms": 1,
        "num_sync_all_streams": 0,
        **{
            kind: {pool: figures(i * 100 + j) for j, pool in enumerate(("all", "large_pool", "small_pool"))}
            for i, kind in enumerate(
                ("allocated_bytes", "active_bytes", "reserved_bytes", "inactive_split"), 1
            )
        },
    }
    if not torch.cuda.is_available():  # the flattening itself is torch's own code, device or not
        monkeypatch.setattr(torch.cuda.memory, "memory_stats_as_nested_dict", lambda device=None: nested)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours, torchs = cuda_stats(device), torch.cuda.memory_stats(device)
    assert len(ours) == 8
    for key, value in ours.items():
        assert value == torchs[key], key


def test_cuda_phase_probes_run_on_the_sampled_steps_only(monkeypatch):
    """Reading the CUDA allocator costs tens of microseconds, so its phase peaks are probed on the steps
    whose graph is sampled (the first, then every graph_every), not every step; each probe feeds the
    next logging step's phase peaks. The allocator is stood in for, so this runs without a GPU."""
    from omegaconf import OmegaConf

    import dgtrain.telemetry as tm

    reads = []
    peaks = {"allocated": 1 << 20, "active": 1 << 20, "reserved": 2 << 20}
    monkeypatch.setattr(tm, "cuda_peak_bytes", lambda d: reads.append(tel.step) or peaks)
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda d: None)
    monkeypatch.setattr(tm, "memory_metrics", lambda d, earlier_peaks=None: {})
    model = torch.nn.Linear(3, 1)
    cfg = OmegaConf.create({"enabled": True, "graph_every": 10, "peak_tflops": 1.0})  # no device name asked
    tel = tm.Telemetry(cfg, model, torch.device("cuda"))
    x = torch.randn(4, 3)
    phases = []
    for _ in range(25):
        with tel.forward((x,)):
            loss = model(x).sum()
        tel.after_forward(loss)
        loss.backward()
        tel.after_backward()
        tel.after_step()
        phases.append(sorted(k for k in tel.metrics(1.0, None) if "peak_" in k))
    assert sorted(set(reads)) == [0, 9, 19], "probed steps: the first, then every graph_every-th"
    assert len(reads) == 3 * 4, "before and after forward, after backward, after the update"
    probed = ["mem/cuda_peak_bwd_mb", "mem/cuda_peak_fwd_mb", "mem/cuda_peak_opt_mb"]
    assert [i for i, p in enumerate(phases) if p] == [0, 9, 19] and phases[9] == probed
