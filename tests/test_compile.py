"""trainer.compile: the forward through torch.compile, in place (plain state_dict keys), one graph for
every sequence length, compile figures in the metrics, and exact resume with compile."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dgtrain.compile import compile_model, parse_mode
from dgtrain.data import DataInfo
from dgtrain.errors import DgtrainError
from dgtrain.models.transformer import Transformer
from dgtrain.tasks import make_task
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
    criterion = compiled.criterion(torch.nn.CrossEntropyLoss(ignore_index=0))  # its own graph
    task = make_task("seq2seq", pad_id=0)
    g = torch.Generator().manual_seed(0)
    for i, length in enumerate(range(3, 11)):
        b = 4 if i % 2 else 3
        src = torch.randint(3, 13, (b, length), generator=g)
        tgt = torch.randint(3, 13, (b, length + 1), generator=g)
        criterion(*task.outputs(model, (src, tgt))).backward()
    assert compiled.compiles == 2 and compiled.metrics()["perf/recompiles"] == 0  # the model, the loss
    model.eval()
    with torch.no_grad():
        model(src, tgt[:, :-1])
    assert compiled.metrics()["perf/recompiles"] == 1  # evaluation: one more graph, no more
    assert list(model.state_dict()) == keys  # no `_orig_mod.` prefix: the module itself is unchanged
    torch._dynamo.reset()


def test_pad_to_multiple_bounds_the_graphs_of_a_static_compile():
    """Without dynamic dims, every batch shape is a graph of its own: data.pad_to_multiple=8 caps the
    widths of sequences of up to 22 tokens at ceil(22/8) = 3 per tensor, so an epoch of batches of 4
    compiles a handful of graphs, where unpadded batches compile one per width (the eager backend stands
    in for inductor: dynamo decides what to compile)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    from dgtrain.data import make_loader
    from dgtrain.data.sequences import seq2seq_synthetic

    graphs, shapes = {}, {}
    for multiple in (None, 8):
        data = seq2seq_synthetic(seed=0, num_examples=120, min_len=2, max_len=20, pad_to_multiple=multiple)
        torch.manual_seed(0)
        model = Transformer.from_data(data.info, d_model=16, n_heads=2, n_layers=1, dropout=0.0)
        torch._dynamo.reset()
        static = torch.compile(model, backend="eager", dynamic=False)
        frames0 = counters["frames"]["ok"]
        seen = set()
        with torch._dynamo.config.patch(recompile_limit=64), torch.no_grad():
            for src, tgt in make_loader(data.train, 4, shuffle=True, seed=0):
                static(src, tgt[:, :-1])
                seen.add((tuple(src.shape), tuple(tgt.shape)))
        graphs[multiple], shapes[multiple] = counters["frames"]["ok"] - frames0, seen
    torch._dynamo.reset()
    assert {s[1] for s, _ in shapes[8]} <= {8, 16, 24} and {t[1] for _, t in shapes[8]} <= {9, 17, 25}
    assert graphs[8] == len(shapes[8]) <= 3 * 3
    assert graphs[None] == len(shapes[None]) > graphs[8], (graphs, shapes)


@pytest.mark.slow
def test_compiled_seq2seq_run_with_pad_to_multiple(tmp_path):
    """Inductor, end to end: seq2seq with data.pad_to_multiple=8 and trainer.compile=true trains with
    the source widths a multiple of 8 (the target's a multiple plus one, so that the decoder reads a
    multiple) and compiles once for training and at most once for evaluation."""
    why = _inductor_works()
    if why:
        pytest.skip(why)
    run = tmp_path / "run"
    args = [
        "model=transformer",
        "data=seq2seq_synthetic",
        "data.pad_to_multiple=8",
        "data.num_examples=400",
        "data.min_len=2",
        "data.max_len=20",
        "data.batch_size=4",
        "model.d_model=16",
        "model.n_heads=2",
        "model.n_layers=1",
        "trainer.compile=true",
        "trainer.max_steps=12",
        "trainer.log_every=4",
        "trainer.eval_batches=2",
        "device=cpu",
        f"hydra.run.dir={run}",
    ]
    p = run_cli(args, tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed"
    widths = [
        [int(t.split("x")[1]) for t in s["shapes"].split()] for s in summary["telemetry"]["common_shapes"]
    ]
    assert widths and all(src % 8 == 0 and tgt % 8 == 1 for src, tgt in widths), widths
    assert 1 <= summary["telemetry"]["distinct_shapes"] <= 3 * 3, summary["telemetry"]
    rows = [r for r in read_metrics(run) if "perf/recompiles" in r]
    assert rows and rows[-1]["perf/recompiles"] <= 1 and all(math.isfinite(r["train/loss"]) for r in rows)


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


def test_the_compiled_training_loss_equals_the_eager_one():
    """trainer.compile also compiles the training criterion (the float32 cast and the loss, fused): an
    LM's loss and the gradient of its bf16 logits match the eager criterion's."""
    why = _inductor_works()
    if why:
        pytest.skip(why)
    import torch._dynamo

    from dgtrain.compile import Compiled
    from dgtrain.tasks import float_loss

    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 997, generator=g).bfloat16()
    target = torch.randint(0, 997, (64,), generator=g)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    grads = []
    for criterion in (float_loss(loss_fn), Compiled(True, None, "lm").criterion(loss_fn)):
        x = logits.clone().requires_grad_()
        loss = criterion(x, target)
        loss.backward()
        grads.append((loss.detach(), x.grad.float()))
    (eager, eager_grad), (fused, fused_grad) = grads
    assert eager.dtype == fused.dtype == torch.float32
    assert torch.allclose(eager, fused, rtol=1e-5) and torch.allclose(eager_grad, fused_grad, atol=1e-6)
    torch._dynamo.reset()


def test_the_training_loss_never_compiles_into_cuda_graphs(monkeypatch):
    """The loop keeps each step's loss until the next logging step, but a CUDA graph's output is
    overwritten by its next replay: under reduce-overhead and max-autotune the model's forward is
    compiled in the run's mode, the loss in the same mode without CUDA graphs."""
    modes = []
    monkeypatch.setattr(torch, "compile", lambda fn, mode=None: modes.append(mode) or fn)
    for value, model_mode, loss_mode in [
        (True, None, None),
        ("reduce-overhead", "reduce-overhead", "default"),
        ("max-autotune", "max-autotune", "max-autotune-no-cudagraphs"),
    ]:
        modes.clear()
        model = torch.nn.Linear(2, 1)
        compile_model(model, value, "regression").criterion(torch.nn.MSELoss())
        assert modes == [model_mode, loss_mode], value
