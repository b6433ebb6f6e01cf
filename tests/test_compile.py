"""trainer.compile: the forward through torch.compile, in place (plain state_dict keys), one graph for
every sequence length, compile figures in the metrics, and exact resume with compile."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dgtrain.compile import compile_model, parse_mode
from dgtrain.data import DataInfo
from dgtrain.errors import DgtrainError
from dgtrain.models.transformer import Transformer
from tests.conftest import read_metrics, run_cli


def _inductor_works() -> str | None:
    """None when inductor compiles here, else why not (no C++ compiler, ...)."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))
    except Exception as e:  # noqa: BLE001
        return f"torch.compile (inductor) cannot compile on this machine: {type(e).__name__}: {e}"[:300]
    return None


def test_compile_values_are_checked():
    assert parse_mode(False) == (False, None) and parse_mode(True) == (True, None)
    assert parse_mode("max-autotune") == (True, "max-autotune")
    with pytest.raises(DgtrainError, match="trainer.compile='fast': expected false, true, reduce-overhead"):
        parse_mode("fast")


def test_varying_sequence_lengths_compile_one_graph(monkeypatch):
    """A seq2seq batch of each length 3..10 (and two batch sizes) must not recompile: the dims are marked
    dynamic before the first call. Dynamo decides recompiles, whatever the backend, so the cheap `eager`
    backend stands in for inductor here."""
    import torch._dynamo

    torch._dynamo.reset()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", **kw))
    torch.manual_seed(0)
    info = DataInfo(task="seq2seq", vocab_size=13, pad_id=0, bos_id=1, eos_id=2, max_len=16)
    model = Transformer.from_data(info, d_model=16, n_heads=2, n_layers=1, dropout=0.1)
    keys = list(model.state_dict())
    compiled = compile_model(model, True, "seq2seq")
    g = torch.Generator().manual_seed(0)
    for i, length in enumerate(range(3, 11)):
        b = 4 if i % 2 else 3
        src = torch.randint(3, 13, (b, length), generator=g)
        tgt = torch.randint(3, 13, (b, length + 1), generator=g)
        F.cross_entropy(model(src, tgt[:, :-1]).flatten(0, 1), tgt[:, 1:].flatten()).backward()
    assert compiled.compiles == 1 and compiled.metrics()["perf/recompiles"] == 0
    model.eval()
    with torch.no_grad():
        model(src, tgt[:, :-1])
    assert compiled.metrics()["perf/recompiles"] == 1  # evaluation: one more graph, no more
    assert list(model.state_dict()) == keys  # no `_orig_mod.` prefix: the module itself is unchanged
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_run_resumes_exactly_and_saves_plain_weights(tmp_path):
    """Inductor, end to end: a compiled run checkpointed at step 5, resumed from there in a fresh process
    (which compiles again), ends with the same weights and losses as the uninterrupted compiled run."""
    why = _inductor_works()
    if why:
        pytest.skip(why)
    args = [
        "model=mlp",
        "trainer.compile=true",
        "trainer.max_steps=10",
        "trainer.log_every=1",
        "checkpoint.every=5",
        "device=cpu",
    ]
    ref = tmp_path / "ref"
    p = run_cli([*args, f"hydra.run.dir={ref}"], tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    run = tmp_path / "resumed"
    p = run_cli(
        [*args, f"resume={ref / 'checkpoints' / 'step_00000005.pt'}", f"hydra.run.dir={run}"], tmp_path
    )
    assert p.returncode == 0, p.stdout + p.stderr

    from safetensors.torch import load_file

    from dgtrain.checkpoint import load

    wa, wb = load_file(ref / "model.safetensors"), load_file(run / "model.safetensors")
    assert sorted(wa) == ["fc1.bias", "fc1.weight", "fc2.bias", "fc2.weight"]  # no `_orig_mod.` prefix
    assert not any("_orig_mod" in k for k in load(ref / "checkpoints" / "step_00000010.pt")["model"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    losses = {r["step"]: r["train/loss"] for r in read_metrics(ref) if "train/loss" in r}
    resumed = {r["step"]: r["train/loss"] for r in read_metrics(run) if "train/loss" in r}
    assert all(resumed[s] == losses[s] for s in range(6, 11))
    rows = [r for r in read_metrics(ref) if "perf/compile_s" in r]
    assert rows and rows[0]["perf/compile_s"] > 0 and rows[-1]["perf/recompiles"] == 0
    assert json.loads((ref / "summary.json").read_text())["status"] == "completed"
