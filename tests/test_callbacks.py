"""Callbacks (dgtrain/callbacks.py): the protocol, early stopping, EMA, top-k checkpoints, debug modes,
and what a resumed run reports (wall time, ETA)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from dgtrain.callbacks import EMA, CallbackList, EarlyStopping, FitContext, TopKCheckpoints, build_callbacks
from dgtrain.errors import DgtrainError
from dgtrain.loggers.console import ConsoleLogger
from tests.conftest import read_metrics, run_cli


def _ctx(tmp_path: Path, model=None, monitor="val/acc", mode="max", state=None) -> FitContext:
    model = model or torch.nn.Linear(2, 2)
    return FitContext(tmp_path, model, None, monitor, mode, lambda: {}, lambda: state or {"w": torch.ones(1)})


def test_early_stopping_patience_min_delta_and_state(tmp_path):
    ctx = _ctx(tmp_path)
    es = EarlyStopping(patience=2, min_delta=0.01)
    es.on_fit_start(ctx)
    for step, acc in [(1, 0.5), (2, 0.6), (3, 0.605), (4, 0.9)]:  # 0.605 is within min_delta: not better
        es.on_eval_end(ctx, step, {"val/acc": acc})
    assert ctx.stop_reason is None and (es.best, es.best_step, es.bad_evals) == (0.9, 4, 0)
    es.on_eval_end(ctx, 5, {"val/acc": 0.85})
    saved = es.state_dict()
    resumed = EarlyStopping(patience=2, min_delta=0.01)
    resumed.load_state_dict(saved)  # a resumed run remembers the best value and the count
    resumed.on_fit_start(ctx)
    resumed.on_eval_end(ctx, 6, {"val/acc": 0.88})
    assert ctx.stop_reason.startswith("early stopping: val/acc has not improved on 0.9 (step 4) for 2")
    loss_ctx = _ctx(tmp_path)
    es = EarlyStopping(monitor="val/loss", patience=1)  # the direction comes from the metric
    es.on_fit_start(loss_ctx)
    es.on_eval_end(loss_ctx, 1, {"val/loss": 1.0})
    es.on_eval_end(loss_ctx, 2, {"val/loss": 0.5})
    assert loss_ctx.stop_reason is None and es.mode == "min"
    with pytest.raises(DgtrainError, match="monitor=val/f1: the evaluation reports no such metric"):
        es.monitor = "val/f1"
        es.on_eval_end(loss_ctx, 3, {"val/loss": 0.4})
    with pytest.raises(DgtrainError, match="patience=0"):
        EarlyStopping(patience=0)


def test_ema_averages_on_the_device_without_reading_values(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 1)
    ctx = _ctx(tmp_path, model)
    ema = EMA(decay=0.9, warmup=False)
    ema.on_fit_start(ctx)
    w0 = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)

    def no_sync(*a, **k):
        raise AssertionError("a host read in a per-step hook")

    for name in ("item", "tolist", "__bool__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, no_sync)
    ema.on_train_step(ctx, 1)
    monkeypatch.undo()
    assert torch.allclose(ema.shadow[0], 0.9 * w0 + 0.1 * (w0 + 1.0))
    with ema.swapped(ctx):
        assert torch.allclose(model.weight, 0.9 * w0 + 0.1 * (w0 + 1.0))
    assert torch.allclose(model.weight, w0 + 1.0)  # the raw weights are back
    warm = EMA(decay=0.999)  # warmup: the first update weighs the new weights by 1 - 1/10
    with torch.no_grad():
        model.weight.copy_(w0)
    warm.on_fit_start(ctx)
    with torch.no_grad():
        model.weight.add_(1.0)
    warm.on_train_step(ctx, 1)
    assert torch.allclose(warm.shadow[0], 0.1 * w0 + 0.9 * (w0 + 1.0))
    with pytest.raises(DgtrainError, match="decay=1.5"):
        EMA(decay=1.5)


def test_top_k_keeps_the_best_and_indexes_them(tmp_path):
    ctx = _ctx(tmp_path, monitor="val/mse", mode="min")
    top = TopKCheckpoints(2, tmp_path)
    top.on_fit_start(ctx)
    for step, mse in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 5.0), (5, 0.5)]:
        top.on_eval_end(ctx, step, {"val/mse": mse})
    index = json.loads((tmp_path / "top_k" / "index.json").read_text())
    assert [(e["step"], e["value"]) for e in index["kept"]] == [(5, 0.5), (2, 1.0)]
    assert sorted(p.name for p in (tmp_path / "top_k").glob("*.pt")) == [
        "step_00000002.pt",
        "step_00000005.pt",
    ]


def test_top_k_resumed_into_another_dir_leaves_the_source_runs_checkpoints(tmp_path):
    # resume=OTHER_RUN hydra.run.dir=NEW: the checkpoint's top-k list names the other run's files; a better
    # value in the new run must not delete them (the other run's index.json still lists them)
    ctx = _ctx(tmp_path, monitor="val/mse", mode="min")
    src = TopKCheckpoints(2, tmp_path / "src")
    src.on_fit_start(ctx)
    for step, mse in [(1, 3.0), (2, 2.0)]:
        src.on_eval_end(ctx, step, {"val/mse": mse})
    top = TopKCheckpoints(2, tmp_path / "new")
    top.load_state_dict(src.state_dict())
    top.on_fit_start(ctx)
    for step, mse in [(3, 1.0), (4, 0.5)]:
        top.on_eval_end(ctx, step, {"val/mse": mse})
    assert sorted(p.name for p in (tmp_path / "src" / "top_k").glob("*.pt")) == [
        "step_00000001.pt",
        "step_00000002.pt",
    ]
    index = json.loads((tmp_path / "new" / "top_k" / "index.json").read_text())
    assert [(e["step"], e["value"]) for e in index["kept"]] == [(4, 0.5), (3, 1.0)]
    assert all(Path(e["path"]).parent == tmp_path / "new" / "top_k" for e in index["kept"])


def test_user_callbacks_come_through_target_and_must_implement_the_hooks(tmp_path):
    cfg = OmegaConf.create(
        {
            "allowed_targets": ["tests."],
            "callbacks": {"rec": {"_target_": "tests.targets.StepRecorder"}},
            "checkpoint": {"save_top_k": 3},
        }
    )
    cbs = build_callbacks(cfg, tmp_path)
    assert list(cbs.named) == ["rec", "save_top_k"]
    with pytest.raises(DgtrainError, match="callbacks.bad: Linear lacks on_fit_start"):
        CallbackList({"bad": torch.nn.Linear(1, 1)})
    cfg = OmegaConf.create({"callbacks": {"rec": {"_target_": "tests.targets.StepRecorder"}}})
    with pytest.raises(DgtrainError, match="not allowed"):
        build_callbacks(cfg, tmp_path)


def test_console_eta_after_a_resume(caplog):
    console = ConsoleLogger(mode="plain")
    console.start(100, first_step=50)
    console._t0 = time.perf_counter() - 10.0  # this process ran 10 steps in 10 s
    with caplog.at_level(logging.INFO):
        console.log_metrics({"train/loss": 1.0}, 60)
    assert caplog.records[-1].getMessage().endswith("eta 0:00:40")  # 40 steps left at 1 s each


@pytest.mark.slow
def test_early_stopping_monitors_val_ema_whatever_the_configured_order(tmp_path):
    """callbacks=[early_stopping,ema] (the order configs/callbacks/early_stopping.yaml shows) with
    monitor=val_ema/acc: EMA scores first, so early stopping sees val_ema/acc (the run failed at its first
    evaluation: 'the evaluation reports no such metric')."""
    model = torch.nn.Linear(2, 2)
    ctx = FitContext(tmp_path, model, None, "val/acc", "max", lambda: {"val/acc": 0.5}, lambda: {})
    es = EarlyStopping(monitor="val_ema/acc", mode="max", patience=1)
    cbs = CallbackList({"early_stopping": es, "ema": EMA(decay=0.9)})
    cbs.fit_start(ctx)
    metrics = {"val/acc": 0.5}
    cbs.eval_end(ctx, 5, metrics)
    assert metrics["val_ema/acc"] == 0.5 and es.best == 0.5 and es.best_step == 5


def test_early_stopped_run_with_user_callback_ema_and_top_k(tmp_path):
    run = tmp_path / "run"
    args = [
        "model=mlp",
        "device=cpu",
        "trainer.max_steps=400",
        "trainer.eval_every=5",
        "trainer.log_every=10",
        "callbacks=[early_stopping,ema]",
        "callbacks.early_stopping.patience=2",
        "callbacks.early_stopping.min_delta=0.01",
        "+callbacks.rec._target_=tests.targets.StepRecorder",
        "allowed_targets=[tests.]",
        "checkpoint.save_top_k=2",
    ]
    p = run_cli([*args, f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    steps = summary["steps"]
    assert summary["status"] == "early_stopped" and steps < 400
    assert summary["early_stopping"]["stopped"] and summary["early_stopping"]["bad_evals"] == 2
    assert (run / "checkpoints" / f"step_{steps:08d}.pt").is_file()  # a checkpoint at the stop
    raw, ema = load_file(run / "model.safetensors"), load_file(run / "model_ema.safetensors")
    assert raw.keys() == ema.keys() and not torch.equal(raw["fc1.weight"], ema["fc1.weight"])
    rows = read_metrics(run)
    assert all("val_ema/acc" in r for r in rows if "val/acc" in r)
    kept = json.loads((run / "checkpoints" / "top_k" / "index.json").read_text())["kept"]
    best_two = sorted((r["val/acc"] for r in rows if "val/acc" in r), reverse=True)[:2]
    assert [e["value"] for e in kept] == best_two
    calls = summary["rec"]["calls"]
    # on_step_end: logging steps only (log_every=10; evaluation-only steps have val/* but no train/*)
    assert {c[1] for c in calls if c[0] == "step_end" and "train/loss" in c[2]} <= set(
        range(10, steps + 1, 10)
    ) | {steps}
    assert [c[1] for c in calls if c[0] == "eval_end"] == list(range(5, steps + 1, 5))
    assert ("checkpoint", steps, f"step_{steps:08d}.pt") in [tuple(c) for c in calls]
    assert summary["rec"]["status"] == "early_stopped"


@pytest.mark.slow
def test_resumed_run_counts_all_processes_and_keeps_callback_state(tmp_path):
    run = tmp_path / "run"
    base = [
        "model=linreg",
        "device=cpu",
        "trainer.log_every=10",
        "checkpoint.every=20",
        "callbacks=[ema]",
        "callbacks.ema.decay=0.5",
        f"hydra.run.dir={run}",
    ]
    p = run_cli([*base, "trainer.max_steps=20"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    first = json.loads((run / "summary.json").read_text())
    ckpt = torch.load(run / "checkpoints" / "step_00000020.pt", weights_only=True)
    assert ckpt["loop"]["wall_s"] > 0 and len(ckpt["callbacks"]["ema"]["shadow"]) == 2
    p = run_cli([*base, "trainer.max_steps=40", "resume=auto"], tmp_path)
    assert p.returncode == 0, p.stderr[-2000:]
    second = json.loads((run / "summary.json").read_text())
    assert second["steps"] == 40 and second["wall_s"] > ckpt["loop"]["wall_s"] >= 0.5 * first["wall_s"]


@pytest.mark.slow
def test_debug_modes(tmp_path):
    fast = tmp_path / "fast"
    p = run_cli(
        ["model=convnet", "device=cpu", "trainer.fast_dev_run=true", f"hydra.run.dir={fast}"], tmp_path
    )
    assert p.returncode == 0, p.stderr[-2000:]
    written = sorted(str(f.relative_to(fast)) for f in fast.rglob("*") if f.is_file())
    assert [f for f in written if not f.startswith(".hydra/")] == ["dgtrain.log"]  # Hydra's own files aside
    assert "step 1/1" in p.stdout + p.stderr
    lim = tmp_path / "lim"
    p = run_cli(
        [
            "model=mlp",
            "device=cpu",
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=0.5",
            f"hydra.run.dir={lim}",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((lim / "summary.json").read_text())["steps"] == 6  # 3 batches x 2 epochs
    ov = tmp_path / "ov"
    p = run_cli(
        [
            "model=mlp",
            "device=cpu",
            "trainer.overfit_batches=1",
            "trainer.max_steps=100",
            "optimizer.lr=0.05",
            f"hydra.run.dir={ov}",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    summary = json.loads((ov / "summary.json").read_text())
    assert "training and validating on the same 64 examples" in p.stdout + p.stderr
    assert summary["final"]["val/acc"] == 1.0  # it fits the one batch it sees


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: EarlyStopping(patience="abc"),
            "callbacks.early_stopping.patience=abc: must be a whole number",
        ),
        (
            lambda: EarlyStopping(patience=1.5),
            "callbacks.early_stopping.patience=1.5: must be a whole number",
        ),
        (lambda: EarlyStopping(min_delta="abc"), "callbacks.early_stopping.min_delta=abc: must be a number"),
        (lambda: EarlyStopping(min_delta=-0.1), "callbacks.early_stopping.min_delta=-0.1: must be a number"),
        (lambda: EMA(decay="abc"), "callbacks.ema.decay=abc: must lie strictly between 0 and 1"),
        (lambda: EMA(decay=1.0), "callbacks.ema.decay=1.0: must lie strictly between 0 and 1"),
    ],
)
def test_callback_arguments_that_are_not_numbers_name_the_key(make, message):
    """`callbacks.ema.decay=abc` and `callbacks.early_stopping.patience=abc` were internal-error
    tracebacks (float('abc')); patience=1.5 was truncated to 1."""
    with pytest.raises(DgtrainError) as e:
        make()
    assert str(e.value).startswith(message) and e.value.exit_code == 2


def test_an_unknown_monitor_direction_fails_when_built_naming_the_group(tmp_path):
    """checkpoint.monitor=val/foo (no mode) failed only in on_fit_start, after config.yaml, metrics.jsonl
    and a 'failed' summary.json were written, and named 'monitor=' and 'mode=' without their group."""
    with pytest.raises(DgtrainError) as e:
        TopKCheckpoints(1, tmp_path, monitor="val/foo")
    assert str(e.value) == (
        "checkpoint.monitor=val/foo: its direction is unknown; set checkpoint.mode=min or checkpoint.mode=max."
    )
    with pytest.raises(DgtrainError, match=r"^callbacks.early_stopping.monitor=val/foo: its direction"):
        EarlyStopping(monitor="val/foo")
    TopKCheckpoints(1, tmp_path, monitor="val/foo", mode="max")  # a mode makes any metric fine


def test_top_k_fails_on_a_metric_the_evaluation_does_not_report(tmp_path):
    """checkpoint.monitor=val/acc_top5 without metrics=[top5]: no top-k checkpoint was ever kept, silently."""
    ctx = _ctx(tmp_path)
    top = TopKCheckpoints(2, tmp_path, monitor="val/acc_top5")
    top.on_fit_start(ctx)
    with pytest.raises(DgtrainError) as e:
        top.on_eval_end(ctx, 5, {"val/acc": 0.5, "val/loss": 1.0})
    assert str(e.value).startswith(
        "checkpoint.monitor=val/acc_top5: the evaluation reports no such metric (it reports val/acc, val/loss)"
    )
