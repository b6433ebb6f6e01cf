"""The training loop in-process: it matches a hand-written PyTorch loop, is reproducible, recovers
known weights, accumulates gradients correctly and stops on a non-finite loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dgtrain.data import epoch_generator
from dgtrain.data.images import digits
from dgtrain.errors import DgtrainError, NonFiniteLossError
from dgtrain.models.convnet import ConvNet
from dgtrain.train import fit


def _losses(result) -> list[float]:
    return [row["train/loss"] for row in result.history if "train/loss" in row]


def test_loss_series_equals_a_handwritten_pytorch_loop(compose, tmp_path):
    steps, seed, bs = 40, 3, 64  # 40 steps cross an epoch boundary (23 batches per epoch)
    cfg = compose(
        [
            "model=convnet",
            f"seed={seed}",
            f"trainer.max_steps={steps}",
            "trainer.log_every=1",
            "trainer.eval_every=1000",
            f"data.batch_size={bs}",
            "device=cpu",
        ]
    )
    dg = _losses(fit(cfg, tmp_path))

    # The same model, data order and optimizer, written by hand.
    data = digits(seed=seed)
    torch.manual_seed(seed)
    model = ConvNet(in_channels=1, image_size=(8, 8), num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x_all, y_all = data.train.x, data.train.y
    n, hand, epoch = len(x_all), [], 0
    while len(hand) < steps:
        order = torch.randperm(n, generator=epoch_generator(seed, epoch))
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            hand.append(loss.item())
            if len(hand) == steps:
                break
        epoch += 1
    assert dg == hand  # bitwise: same ops in the same order


def test_direct_indexing_trains_bit_identically_to_the_dataloader_path(compose, tmp_path):
    """num_workers=0 indexes in-memory data directly; a DataLoader with a worker serves the same batches.
    The transformer has dropout, so this also holds the global RNG stream (and evaluation) equal."""
    common = [
        "model=transformer",
        "model.d_model=32",
        "model.n_layers=1",
        "data.num_examples=200",
        "data.batch_size=32",
        "trainer.max_steps=8",
        "trainer.log_every=1",
        "trainer.eval_every=4",
        "trainer.eval_batches=2",
        "device=cpu",
    ]
    (tmp_path / "direct").mkdir(), (tmp_path / "loader").mkdir()
    direct = fit(compose([*common, "data.num_workers=0"]), tmp_path / "direct")
    loader = fit(compose([*common, "data.num_workers=1"]), tmp_path / "loader")

    def series(r):
        return [{k: v for k, v in row.items() if k.startswith(("train/", "val/"))} for row in r.history]

    assert series(direct) == series(loader)
    assert type(direct.setup.train_loader).__name__ == "DirectLoader"


def test_same_seed_same_series_other_seed_differs(compose, tmp_path):
    def run(seed, d):
        cfg = compose(
            ["model=mlp", f"seed={seed}", "trainer.max_steps=15", "trainer.log_every=1", "device=cpu"]
        )
        return _losses(fit(cfg, tmp_path / d))

    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir(), (tmp_path / "c").mkdir()
    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    assert a == b
    assert a != c


def test_linreg_recovers_the_true_weights(compose, tmp_path):
    cfg = compose(
        [
            "model=linreg",
            "trainer.max_epochs=40",
            "scheduler=cosine",
            "scheduler.warmup_steps=0",
            "data.noise=0.05",
            "device=cpu",
        ]
    )
    result = fit(cfg, tmp_path)
    true_w = result.setup.data.info.extra["true_weight"]
    true_b = result.setup.data.info.extra["true_bias"]
    lin = result.model.linear
    # With noise 0.05 on 819 examples, least squares itself is within ~0.005 of the truth.
    torch.testing.assert_close(lin.weight.detach(), true_w, atol=0.02, rtol=0)
    torch.testing.assert_close(lin.bias.detach(), true_b, atol=0.02, rtol=0)
    assert result.summary["final"]["val/r2"] > 0.99


def test_gradient_accumulation_matches_a_larger_batch(compose, tmp_path):
    """Two micro-batches of 32 then one step == one batch of 64 (same examples, same order)."""
    common = ["model=linreg", "trainer.max_steps=10", "trainer.log_every=1", "device=cpu", "optimizer=sgd"]
    (tmp_path / "big").mkdir(), (tmp_path / "acc").mkdir()
    big = fit(compose(common + ["data.batch_size=64"]), tmp_path / "big")
    acc = fit(compose(common + ["data.batch_size=32", "trainer.grad_accum_steps=2"]), tmp_path / "acc")
    assert _losses(acc) == pytest.approx(_losses(big), rel=1e-5)
    for p, q in zip(big.model.parameters(), acc.model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_max_epochs_with_gradient_accumulation_trains_every_epoch_to_its_end(compose, tmp_path):
    """linreg has 13 batches an epoch: 2 epochs of 4-batch steps take 7 steps (26 batches, rounded up to a
    whole step), not 6 (24 batches: the second epoch cut short, never evaluated at its end)."""
    cfg = compose(
        ["model=linreg", "trainer.max_epochs=2", "trainer.grad_accum_steps=4", "trainer.log_every=1"]
        + ["device=cpu"]
    )
    r = fit(cfg, tmp_path)
    batches = len(r.setup.train_loader)
    assert r.summary["steps"] == math.ceil(2 * batches / 4) > 2 * batches // 4
    assert [row["step"] for row in r.history if "val/loss" in row] == [
        math.ceil(batches / 4),
        r.summary["steps"],
    ]


@pytest.mark.parametrize(
    "loss",
    [
        ["loss._target_=torch.nn.L1Loss", "~loss.label_smoothing"],
        ["loss._target_=tests.targets.ScaledL1", "~loss.label_smoothing", "+loss.scale=2.0"],
    ],
)
def test_a_loss_target_without_task_and_pad_id_trains(compose, tmp_path, loss):
    """dgtrain passes `task` and `pad_id` to its own loss builders; torch's losses and a user's class that
    do not take them are called with their own settings only (they failed: unexpected keyword 'task')."""
    cfg = compose(["model=linreg", "trainer.max_steps=3", "device=cpu", "allowed_targets=[tests.]", *loss])
    r = fit(cfg, tmp_path)
    assert r.summary["status"] == "completed"
    assert type(r.setup.loss_fn).__name__ == cfg.loss._target_.rsplit(".", 1)[-1]
    assert getattr(r.setup.loss_fn, "scale", 2.0) == 2.0


def test_summary_counts_the_epochs_trained(compose, tmp_path):
    """summary.json's `epochs` after max_epochs=2 is 2 (epochs fully trained); it was 1, the 0-based
    index of the epoch the last batch came from (the console said '26 (epoch 1)')."""
    r = fit(
        compose(["model=linreg", "trainer.max_epochs=2", "device=cpu", "trainer.log_every=100"]), tmp_path
    )
    assert r.summary["steps"] == 2 * len(r.setup.train_loader) and r.summary["epochs"] == 2


def test_nonfinite_loss_stops_naming_the_step(compose, tmp_path):
    cfg = compose(
        [
            "model=linreg",
            "optimizer=sgd",
            "optimizer.lr=10",
            "optimizer.momentum=0",
            "trainer.max_steps=200",
            "trainer.log_every=50",
            "device=cpu",
        ]
    )
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+) \(last finite loss .* at step \d+\)") as e:
        fit(cfg, tmp_path)
    import re

    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert 1 < bad < 50, "the exact step is named, not the logging step"


@pytest.mark.parametrize("fused", ["false", "true"])
def test_the_rows_logged_before_a_nonfinite_failure_carry_their_own_grad_norm(compose, tmp_path, fused):
    """nonfinite=fail logs the window's good steps before raising; their train/grad_norm is not the norm
    of the failing step (inf: the row of step 1 said grad_norm inf beside a finite loss)."""
    from tests.conftest import read_metrics

    cfg = compose(
        ["model=linreg", "optimizer.lr=1e20", "trainer.clip_grad_norm=1.0", "trainer.max_steps=30"]
        + ["trainer.log_every=5", "device=cpu", f"optimizer.fused={fused}"]
    )
    with pytest.raises(NonFiniteLossError):
        fit(cfg, tmp_path)
    rows = [r for r in read_metrics(tmp_path) if "train/loss" in r]
    assert rows and all(math.isfinite(float(r["train/loss"])) for r in rows)
    assert all(math.isfinite(float(r.get("train/grad_norm", 0.0))) for r in rows), rows


def test_a_stop_requested_between_logging_steps_logs_the_steps_since_the_last_log(compose, tmp_path):
    """A callback's request_stop from on_train_step at step 7 (log_every=5): steps 6 and 7 are logged
    (train/loss at step 7) before the run stops, as after a stop signal; they were left out of the log."""
    from tests.conftest import read_metrics

    cfg = compose(
        [
            "model=linreg",
            "trainer.max_steps=50",
            "trainer.log_every=5",
            "device=cpu",
            "allowed_targets=[tests.]",
        ]
        + ["+callbacks.stop._target_=tests.targets.StopAtStep", "+callbacks.stop.at=7"]
    )
    r = fit(cfg, tmp_path)
    assert r.summary["status"] == "early_stopped" and r.summary["steps"] == 7
    assert [row["step"] for row in read_metrics(tmp_path) if "train/loss" in row] == [5, 7]


def test_nonfinite_advice_fits_the_runs_settings(compose, tmp_path):
    """The message does not tell an fp32 run with clipping to 'set trainer.clip_grad_norm, use
    precision=fp32': both are set already."""
    from dgtrain.faults import nonfinite_error, too_many_skipped

    cfg = compose(
        ["model=linreg", "optimizer.lr=1e20", "trainer.clip_grad_norm=1.0", "trainer.max_steps=30"]
        + ["device=cpu", "optimizer=sgd"]
    )
    with pytest.raises(NonFiniteLossError) as e:
        fit(cfg, tmp_path)
    text = str(e.value)
    assert "lower trainer.clip_grad_norm (now 1)" in text and "precision=" not in text, text
    assert "set trainer.clip_grad_norm" in str(nonfinite_error(3, math.nan, [], None, "fp32"))
    assert "use precision=bf16 or precision=fp32" in str(nonfinite_error(3, math.nan, [], None, "fp16"))
    assert "use precision=fp32" in str(too_many_skipped(4, 5, 3, 0.5, "bf16"))


def test_step_time_leaves_out_checkpoint_writes_and_text_samples(compose, tmp_path, monkeypatch):
    """perf/step_ms (and samples_per_s) time the training steps: a checkpoint written, or a text sample
    generated, after a logging step was counted into the next window's steps (a 1 s write: +500 ms/step)."""
    import time

    import dgtrain.checkpoint
    import dgtrain.train

    def slow(real):
        def run(*args, **kwargs):
            time.sleep(1.0)
            return real(*args, **kwargs)

        return run

    monkeypatch.setattr(dgtrain.checkpoint.Checkpointer, "save", slow(dgtrain.checkpoint.Checkpointer.save))
    monkeypatch.setattr(dgtrain.train, "lm_sample", slow(dgtrain.train.lm_sample))
    cfg = compose(
        ["model=transformer", "data=text", "model.n_layers=1", "model.d_model=16", "data.batch_size=4"]
        + ["trainer.max_steps=6", "trainer.log_every=2", "trainer.sample_every=2", "checkpoint.every=2"]
        + ["checkpoint.best=false", "trainer.eval_every=100", "device=cpu", "telemetry.enabled=false"]
    )
    r = fit(cfg, tmp_path)
    times = [row["perf/step_ms"] for row in r.history if "perf/step_ms" in row]
    assert len(times) == 3 and max(times[1:]) < 250, times


@pytest.mark.parametrize("extra", [[], ["trainer.overfit_batches=1"], ["data.num_workers=1"]])
def test_a_users_plain_dataset_trains(compose, tmp_path, extra):
    """docs/extending.md: train/val may be any map-style Dataset of (x, y) items. Such items are stacked
    into batches (torch's default collate); they arrived as a list of pairs ('tuple' has no 'to')."""
    cfg = compose(
        ["model=mlp", "data._target_=tests.targets.plain_blobs", "allowed_targets=[tests.]", "device=cpu"]
        + ["trainer.max_steps=4", "trainer.log_every=2", *extra]
    )
    r = fit(cfg, tmp_path)
    assert r.summary["status"] == "completed" and "val/acc" in r.summary["final"]


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        (
            ["+model.in_features=16", "+model.num_classes=3"],
            r"model.num_classes=3, .* 4 classes.*num_classes=4",
        ),
        (
            ["+model.in_features=15", "+model.num_classes=4"],
            r"model.in_features=15, .* 16 features.*in_features=16",
        ),
    ],
)
def test_a_plain_models_sizes_are_checked_against_the_data(compose, tmp_path, sizes, message):
    """A model without from_data takes its sizes from the config; one that does not fit the data stops
    before training naming the key (it was an internal error at the first step: 'Target 3 is out of
    bounds', 'mat1 and mat2 shapes cannot be multiplied')."""
    cfg = compose(
        [
            "~model",
            "+model._target_=tests.targets.PlainMLP",
            *sizes,
            "data._target_=tests.targets.plain_blobs",
        ]
        + ["allowed_targets=[tests.]", "device=cpu", "trainer.max_steps=2"]
    )
    with pytest.raises(DgtrainError, match=message):
        fit(cfg, tmp_path)
    ok = compose(
        ["~model", "+model._target_=tests.targets.PlainMLP", "+model.in_features=16", "+model.num_classes=4"]
        + ["data._target_=tests.targets.plain_blobs", "allowed_targets=[tests.]", "device=cpu"]
        + ["trainer.max_steps=2"]
    )
    (tmp_path / "ok").mkdir()
    assert fit(ok, tmp_path / "ok").summary["status"] == "completed"


def test_clipping_and_precision_options_run(compose, tmp_path):
    for i, extra in enumerate([["trainer.clip_grad_norm=0.5"], ["precision=bf16"], ["precision=fp16"]]):
        d = tmp_path / str(i)
        d.mkdir()
        r = fit(
            compose(["model=mlp", "trainer.max_steps=12", "trainer.log_every=4", "device=cpu", *extra]), d
        )
        assert r.summary["status"] == "completed"
        if "trainer.clip_grad_norm=0.5" in extra:
            assert all(row["train/grad_norm"] > 0 for row in r.history if "train/loss" in row)


def test_bad_combinations_fail_before_training(compose, tmp_path):
    with pytest.raises(
        DgtrainError, match=r"model=convnet cannot train on data=text.*Data for model=convnet: .*digits"
    ):
        fit(compose(["model=convnet", "data=text"]), tmp_path, choices={"model": "convnet", "data": "text"})
    assert not (tmp_path / "metrics.jsonl").exists()
    with pytest.raises(DgtrainError, match="loss=mse does not fit"):
        fit(compose(["model=mlp", "loss=mse"]), tmp_path)
    with pytest.raises(DgtrainError, match=r"os\.system.*not allowed"):
        fit(compose(["model=mlp", "model._target_=os.system"]), tmp_path)


def test_cuda_defaults_are_decided_per_device_and_switchable():
    """optimizer.fused and trainer.tf32: auto turns them on for CUDA only (CPU runs are unchanged)."""
    from dgtrain.optim import fused_choice
    from dgtrain.train import tf32, use_tf32

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert fused_choice("auto", torch.optim.AdamW, cuda) and fused_choice("auto", torch.optim.Adam, cuda)
    assert not fused_choice("auto", torch.optim.Adam, cpu), "CPU keeps the for-loop Adam of a hand loop"
    assert not fused_choice("auto", torch.optim.SGD, cuda) and not fused_choice(
        "auto", torch.optim.RMSprop, cuda
    )
    assert fused_choice(True, torch.optim.SGD, cpu) and not fused_choice(False, torch.optim.Adam, cuda)
    with pytest.raises(DgtrainError, match=r"optimizer.fused=true: torch.optim.rmsprop.RMSprop has no fused"):
        fused_choice("true", torch.optim.RMSprop, cuda)

    assert use_tf32("auto", cuda, "fp32") and not use_tf32("auto", cuda, "bf16")
    assert use_tf32(True, cuda, "bf16") and not use_tf32(False, cuda, "fp32")
    assert not use_tf32(True, cpu, "fp32"), "TF32 is a CUDA matter"
    before = torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32
    with tf32("auto", cuda, "fp32"):  # the settings themselves work without a GPU
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cudnn.allow_tf32
    with tf32("false", cuda, "fp32"):
        assert torch.get_float32_matmul_precision() == "highest" and not torch.backends.cudnn.allow_tf32
    with tf32("true", cpu, "fp32"):
        assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before, "put back"


def test_fused_adam_on_request_trains_like_the_plain_one(compose, tmp_path):
    """optimizer.fused=true on CPU (torch has a fused CPU Adam): the same training, to rounding."""
    common = ["model=mlp", "trainer.max_steps=20", "trainer.log_every=1", "device=cpu"]
    (tmp_path / "plain").mkdir(), (tmp_path / "fused").mkdir()
    plain = fit(compose([*common, "optimizer.fused=false"]), tmp_path / "plain")
    fused = fit(compose([*common, "optimizer.fused=true"]), tmp_path / "fused")
    assert _losses(fused) == pytest.approx(_losses(plain), rel=1e-4)
    from dgtrain import checkpoint as ckpt_io

    groups = [
        ckpt_io.load(d / "checkpoints" / "step_00000020.pt")["optimizer"]["param_groups"][0]
        for d in (tmp_path / "plain", tmp_path / "fused")
    ]
    assert not groups[0]["fused"] and groups[1]["fused"] is True


def test_cuda_switch_values_are_checked_before_training(compose):
    from dgtrain.validation import problems

    bad = ["model=convnet", "trainer.tf32=often", "optimizer.fused=maybe", "model.channels_last=sometimes"]
    found = problems(compose(bad))
    for text in ("trainer.tf32=often", "optimizer.fused=maybe", "model.channels_last=sometimes"):
        assert any(p.startswith(text) and "expected auto, true or false" in p for p in found), text
    good = ["model=convnet", "trainer.tf32=false", "optimizer.fused=true", "model.channels_last=false"]
    assert problems(compose(good)) == []


def test_threads_and_deterministic_set_torch_process_settings(compose, tmp_path, monkeypatch):
    import os

    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    other = 2 if threads == 1 else 1
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    cfg = compose(
        ["model=linreg", "trainer.max_steps=2", "device=cpu", f"threads={other}", "deterministic=true"]
        + ["allowed_targets=[tests.]", "+callbacks.torch._target_=tests.targets.TorchSettings"]
    )
    try:
        r = fit(cfg, tmp_path)
        assert r.summary["torch_settings"] == {"threads": other, "deterministic": True}  # during the run
        # put back after it: a sweep's next trial (same process) starts from the settings before this one
        assert torch.get_num_threads() == threads and torch.are_deterministic_algorithms_enabled() == det
        assert not torch.backends.cudnn.deterministic and "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)
        torch.backends.cudnn.deterministic = False
    with pytest.raises(DgtrainError, match="threads=0: must be at least 1"):
        fit(compose(["model=linreg", "threads=0"]), tmp_path / "bad")


def test_test_at_end_needs_data_with_a_test_set(compose, tmp_path):
    with pytest.raises(DgtrainError, match="trainer.test_at_end=true: data digits has no held-out test set"):
        fit(
            compose(["model=convnet", "trainer.max_steps=1", "device=cpu", "trainer.test_at_end=true"]),
            tmp_path,
        )


def test_evaluating_the_test_split_of_data_without_one_says_so(compose):
    import contextlib

    from dgtrain.evaluate import evaluate_split
    from dgtrain.train import setup

    s = setup(compose(["model=linreg", "device=cpu"]))
    with pytest.raises(DgtrainError, match="--split test: this data has no held-out test set"):
        evaluate_split(s, contextlib.nullcontext, "test")
    assert set(evaluate_split(s, contextlib.nullcontext, "val")) == {"val/loss", "val/mse", "val/r2"}


@pytest.mark.parametrize("name", ["constant", "cosine"])
def test_schedules_step_exactly_like_torch_lambdalr(name):
    """dgtrain's schedules take a lean per-step path; the lrs, and the state a checkpoint keeps, must
    stay torch's LambdaLR's bit for bit (a run resumed from an older checkpoint continues the same)."""
    from dgtrain import optim

    def make():
        w, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(1))
        return torch.optim.SGD([{"params": [w], "lr": 0.3}, {"params": [b], "lr": 0.07}])

    schedule = getattr(optim, name)
    fast_opt, ref_opt = make(), make()
    fast = schedule(fast_opt, total_steps=40, warmup_steps=5)
    ref = torch.optim.lr_scheduler.LambdaLR(ref_opt, fast.lr_lambdas[0])
    for _ in range(45):
        fast_opt.step(), ref_opt.step()
        fast.step(), ref.step()
        assert [g["lr"] for g in fast_opt.param_groups] == [g["lr"] for g in ref_opt.param_groups]
        assert fast.get_last_lr() == ref.get_last_lr()
    assert fast.state_dict() == ref.state_dict()
    resumed_opt = make()
    resumed = schedule(resumed_opt, total_steps=40, warmup_steps=5)
    resumed.load_state_dict(ref.state_dict())
    resumed_opt.step(), resumed.step(), ref_opt.step(), ref.step()
    assert resumed.get_last_lr() == ref.get_last_lr()


def test_gradients_are_cleared_like_zero_grad_and_an_optimizer_of_its_own_keeps_its_zero_grad():
    """The loop clears gradients without torch's zero_grad wrapping; it must clear exactly the optimizer's
    parameters (groups added later and groups rebuilt by load_state_dict included), and an optimizer
    that defines its own zero_grad must still have it called."""
    from dgtrain.optim import grad_clearer

    w, b, frozen = (torch.nn.Parameter(torch.ones(2)) for _ in range(3))
    opt = torch.optim.Adam([w])
    clear = grad_clearer(opt)
    opt.add_param_group({"params": [b]})
    opt.load_state_dict(opt.state_dict())  # a resume rebuilds param_groups
    (w.sum() + b.sum() + frozen.sum()).backward()
    clear()
    assert w.grad is None and b.grad is None
    assert frozen.grad is not None, "not the optimizer's: zero_grad leaves it too"

    class Own(torch.optim.SGD):
        calls = []

        def zero_grad(self, set_to_none=True):
            self.calls.append(set_to_none)
            super().zero_grad(set_to_none)

    own = Own([w], lr=0.1)
    grad_clearer(own)()
    assert Own.calls == [True]


def test_the_lean_optimizer_step_still_runs_step_hooks_and_shows_in_the_profiler():
    """The loop steps the optimizer past torch's profiling wrapper only while that wrapper would do
    nothing: a step hook (the optimizer's own or a global one) or a running profiler gets torch's step."""
    import torch.optim.optimizer as torch_optim

    from dgtrain.optim import step_function

    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.Adam([w], lr=0.1)
    step = step_function(opt)
    ref_w = torch.nn.Parameter(torch.ones(2))
    ref = torch.optim.Adam([ref_w], lr=0.1)
    for _ in range(3):
        for p in (w, ref_w):
            p.grad = torch.tensor([0.5, -2.0])
        step(), ref.step()
    assert torch.equal(w, ref_w)
    assert all(torch.equal(opt.state[w][k], ref.state[ref_w][k]) for k in ("step", "exp_avg", "exp_avg_sq"))

    calls = []
    own = opt.register_step_post_hook(lambda o, a, k: calls.append("own"))
    glob = torch_optim.register_optimizer_step_pre_hook(lambda o, a, k: calls.append("global"))
    try:
        w.grad = torch.ones(2)
        step()
    finally:
        own.remove(), glob.remove()
    assert calls == ["global", "own"]
    w.grad = torch.ones(2)
    step()
    assert calls == ["global", "own"], "removed hooks are not called"

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        w.grad = torch.ones(2)
        step()
    assert "Optimizer.step#Adam.step" in {e.name for e in prof.events()}


def test_the_lean_optimizer_step_takes_off_a_schedules_wrapper_after_its_first_step():
    """Any torch schedule (scheduler=step is StepLR) wraps optimizer.step for its first-step check; the
    loop's step takes that wrapper off afterwards, with no warning and the same lrs and weights."""
    import warnings

    from dgtrain.optim import step_function

    def make():
        w = torch.nn.Parameter(torch.ones(2))
        opt = torch.optim.SGD([w], lr=0.5)
        return w, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)

    w, opt, sched = make()
    ref_w, ref, ref_sched = make()
    step = step_function(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither "called before optimizer.step()" nor "overridden"
        for _ in range(5):
            w.grad, ref_w.grad = torch.ones(2), torch.ones(2)
            step(), ref.step()
            sched.step(), ref_sched.step()
    assert "step" not in opt.__dict__, "the schedule's wrapper is off"
    assert torch.equal(w, ref_w) and sched.get_last_lr() == ref_sched.get_last_lr() == [0.125]


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=convnet"],
        ["model=transformer", "model.d_model=16", "model.n_layers=1", "trainer.grad_accum_steps=2"],
        ["model=transformer", "model.d_model=16", "model.n_layers=1", "trainer.nonfinite=skip"],
    ],
    ids=["convnet", "seq2seq-accum", "seq2seq-skip"],
)
def test_a_step_with_a_fused_optimizer_reads_nothing_back(compose, tmp_path, monkeypatch, overrides):
    """With an optimizer that takes the guard's flag (fused Adam: the CUDA default, and torch has one on
    CPU too), a training step queues its work and never waits for the device: no value comes back to
    the host (graph-sampled steps included) until a logging step reads the window."""
    from dgtrain.train import Loop, setup

    cfg = compose([*overrides, "optimizer.fused=true", "telemetry.graph_every=2", "device=cpu"])
    s = setup(cfg)
    loop = Loop(cfg, s, "fp32", tmp_path)
    assert loop.on_device
    s.model.train()
    loop.train_step()  # the first step: lazy optimizer state, the schedule's first-step check

    def no_read(*a, **k):
        raise AssertionError("a host read during a training step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, no_read)
    for _ in range(4):
        loop.train_step()
    monkeypatch.undo()
    metrics = loop.train_metrics()  # the logging step reads the window: five finite losses
    assert metrics["train/loss"] > 0 and loop.state.step == 5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize(
    "overrides",
    [
        ["model=convnet"],  # device-resident digits, fused Adam, channels_last
        ["model=transformer", "model.d_model=32", "model.n_layers=1", "precision=bf16"],  # seq2seq widths
        ["model=mlp", "data.device_resident=false"],  # pinned host batches, non-blocking copies
    ],
    ids=["convnet", "seq2seq-bf16", "mlp-host-data"],
)
def test_cuda_training_steps_never_synchronize(compose, tmp_path, overrides):
    """On CUDA with the defaults, a training step (graph-sampled and memory-probed ones included) makes
    no synchronizing CUDA call: torch's sync debug mode turns any into an error."""
    from dgtrain.train import Loop, setup

    cfg = compose([*overrides, "device=cuda", "telemetry.graph_every=2"])
    s = setup(cfg)
    loop = Loop(cfg, s, "bf16" if "precision=bf16" in overrides else "fp32", tmp_path)
    assert loop.on_device
    s.model.train()
    loop.train_step()  # the first step: lazy state, the schedule's first-step check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            loop.train_step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert math.isfinite(loop.train_metrics()["train/loss"])
