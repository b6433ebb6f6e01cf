"""Checkpoints, exact resume and fault tolerance (docs/checkpoints.md).

Unit tests call dgtrain.checkpoint directly; the end-to-end tests run the real CLI in subprocesses,
because what they test is a process that dies (an exception, SIGKILL, SIGTERM, SIGUSR1)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dgtrain import checkpoint as ckpt_io
from dgtrain.errors import DgtrainError
from tests.conftest import REPO, cli_env, read_metrics, run_cli

# A small transformer with dropout (so the RNG states matter) over 6 batches per epoch (so 16 steps
# cross two epoch boundaries), evaluated every 8 steps (so best/last-eval state matters), checkpointed
# every 5 steps (so the checkpoint falls inside a log window when log_every does not divide 5).
RUN = [
    "model=transformer",
    "model.d_model=32",
    "model.n_layers=1",
    "data.num_examples=200",
    "data.batch_size=32",
    "trainer.max_steps=16",
    "trainer.log_every=1",
    "trainer.eval_every=8",
    "checkpoint.every=5",
    "checkpoint.keep_last=3",
    "device=cpu",
]

# Runs dgtrain with the optimizer failing on its (k+1)-th step: a crash in the middle of training,
# injected from outside so dgtrain itself carries no test hook.
CRASH_AFTER = """
import sys, torch
k = int(sys.argv.pop(1))
orig, calls = torch.optim.Adam.step, [0]
def step(self, *a, **kw):
    calls[0] += 1
    if calls[0] > k:
        raise RuntimeError(f"injected crash in optimizer step {calls[0]}")
    return orig(self, *a, **kw)
torch.optim.Adam.step = step
sys.argv = ["dgtrain", *sys.argv[1:]]
from dgtrain.cli import main
main()
"""

# A regression model whose output is NaN on its n-th training forward pass (a forced non-finite loss).
NAN_MODEL = """
import math
import torch
from torch import nn

class NanAt(nn.Module):
    tasks = ("regression",)

    def __init__(self, in_features, out_features=1, nan_at=3):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.nan_at, self.calls = nan_at, 0

    @classmethod
    def from_data(cls, info, nan_at=3):
        return cls(math.prod(info.in_shape), info.out_dim, nan_at)

    def forward(self, x):
        y = self.linear(x.flatten(1))
        if self.training:
            self.calls += 1
            if self.calls == self.nan_at:
                y = y * float("nan")
        return y
"""


def _series(run_dir: Path) -> list[dict]:
    """The logged rows without wall-clock figures (speed, memory), which differ between any two runs, and
    without the sampled graph telemetry, which each process samples afresh (its first step, its own count
    of distinct shapes): observations of the process, not training state."""
    return [
        {k: v for k, v in row.items() if not k.startswith(("perf/", "mem/", "graph/"))}
        for row in read_metrics(run_dir)
    ]


def _out(p: subprocess.CompletedProcess) -> str:
    return p.stdout + p.stderr


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def _assert_same_run(a: Path, b: Path) -> None:
    sa, sb = _series(a), _series(b)
    assert [r["step"] for r in sb] == list(range(1, 17)), "every step logged once, in order"
    assert sb == sa, "the per-step loss series (and eval metrics) equal the uninterrupted run's"
    wa, wb = _weights(a / "model.safetensors"), _weights(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"parameter {k} differs"


def _crash_after_step_12(args: list[str], run: Path, cwd: Path) -> None:
    """Run dgtrain with an exception injected into optimizer step 13; it must fail saying so."""
    p = subprocess.run(
        [sys.executable, "-c", CRASH_AFTER, "12", *args, f"hydra.run.dir={run}"],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode != 0 and "injected crash in optimizer step 13" in _out(p)


def _wait_for(predicate, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> None:
    t0 = time.time()
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited early ({proc.returncode}): {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out waiting")
        time.sleep(0.05)


def _popen(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "dgtrain", *args],
        cwd=cwd,
        env=env or cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _tiny_state(step: int) -> dict:
    m = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    loop = {"step": step, "epoch": 0, "position": step, "completed_epochs": 0}
    return ckpt_io.make_state(
        model=m,
        optimizer=opt,
        scheduler=sched,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loop=loop,
        config={"model": {"_target_": "torch.nn.Linear"}},
        run_dir=Path("/nonexistent"),
    )


# ------------------------------------------------------------------------------------------ unit


def test_a_write_that_fails_halfway_leaves_the_previous_checkpoint_and_no_temp_file(tmp_path):
    path = tmp_path / "step_00000001.pt"
    ckpt_io.save(_tiny_state(1), path)

    def half_then_fail(f):
        f.write(b"PK\x03\x04 half a zip archive")
        raise OSError("disk full (simulated)")

    with pytest.raises(OSError, match="disk full"):
        ckpt_io.atomic_write(path, half_then_fail)
    assert ckpt_io.load(path)["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt"]


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 48960 vs 48912"),
    ],
)
def test_a_full_disk_is_named_with_the_path_not_an_internal_error(tmp_path, monkeypatch, error):
    # checkpoint.dir on a full disk: torch.save's zip writer failed with "unexpected pos 48960 vs 48912",
    # reported as an internal error ("a bug in dgtrain", exit 1)
    path = tmp_path / "step_00000001.pt"
    ckpt_io.save(_tiny_state(1), path)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(torch, "save", fail)
    with pytest.raises(DgtrainError, match=r"could not write .*step_00000002.pt.*disk .* full") as e:
        ckpt_io.save(_tiny_state(2), tmp_path / "step_00000002.pt")
    assert e.value.exit_code == 2 and "MB free" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001.pt"]


def test_a_full_disk_while_writing_the_final_weights_is_named(tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import SafetensorError

    def fail(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_model", fail)
    with pytest.raises(DgtrainError, match=r"could not write .*model.safetensors.*is full"):
        ckpt_io.save_weights(torch.nn.Linear(2, 2), tmp_path / "model.safetensors")
    assert list(tmp_path.iterdir()) == []


KILLED_MID_WRITE = """
import os, signal, sys
from dgtrain import checkpoint as c

def half_then_die(f):
    f.write(b"PK half a zip archive")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

c.atomic_write(sys.argv[1], half_then_die)
"""


@pytest.mark.slow
def test_a_process_killed_mid_write_leaves_the_previous_checkpoint(compose, tmp_path):
    ckdir = tmp_path / "checkpoints"
    ckpt_io.save(_tiny_state(1), ckdir / "step_00000001.pt")
    target = ckdir / "step_00000001.pt"
    p = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(target)], env=cli_env(), timeout=120)
    assert p.returncode == -signal.SIGKILL
    assert ckpt_io.load(target)["step"] == 1, "the final name still holds the previous, complete file"
    assert len(list(ckdir.glob(".*.tmp"))) == 1 and ckpt_io.list_checkpoints(ckdir) == [target]
    state = _tiny_state(1)
    state["config"] = {"model": {"_target_": "dgtrain.models.linreg.LinearRegression"}}
    ckpt_io.save(state, target)
    cfg = compose(["model=linreg", "resume=auto"])
    assert ckpt_io.Checkpointer(cfg, tmp_path).load_for_resume(cfg, ("dgtrain.", "torch."))["step"] == 1
    assert not list(ckdir.glob(".*.tmp")), "resuming clears what the killed writer left"


def test_resuming_a_run_already_past_max_steps_says_there_is_nothing_to_train(compose, tmp_path, caplog):
    from dgtrain.train import fit

    fit(compose(["model=linreg", "trainer.max_steps=12", "checkpoint.every=6"]), tmp_path)
    with caplog.at_level("WARNING", logger="dgtrain"):
        result = fit(compose(["model=linreg", "trainer.max_steps=6", "resume=auto"]), tmp_path)
    assert result.summary["steps"] == 12 and result.summary["status"] == "completed"
    assert "the checkpoint is at step 12" in caplog.text and "raise trainer.max_steps" in caplog.text


def test_resuming_an_early_stopped_run_trains_nothing(compose, tmp_path, caplog):
    # resume=auto on a run that early stopping ended (a re-run script, a requeued job) kept training past
    # the stop and replaced its model.safetensors and summary with a longer run's
    from dgtrain.train import fit

    args = ["model=linreg", "trainer.max_steps=40", "trainer.eval_every=4", "callbacks=[early_stopping]"]
    args += ["callbacks.early_stopping.patience=2", "callbacks.early_stopping.min_delta=1e9"]
    first = fit(compose(args), tmp_path).summary
    assert first["status"] == "early_stopped" and first["steps"] == 12
    rows = (tmp_path / "metrics.jsonl").read_text()
    with caplog.at_level("WARNING", logger="dgtrain"):
        again = fit(compose([*args, "resume=auto"]), tmp_path).summary
    assert again["status"] == "early_stopped" and again["steps"] == 12
    assert again["final"] == first["final"] and again["early_stopping"] == first["early_stopping"]
    assert (tmp_path / "metrics.jsonl").read_text() == rows
    assert "nothing left to train" in caplog.text and "callbacks.early_stopping.patience" in caplog.text
    # a higher patience continues the run
    more = fit(
        compose(
            [
                *args[:-2],
                "callbacks.early_stopping.patience=3",
                "callbacks.early_stopping.min_delta=1e9",
                "resume=auto",
            ]
        ),
        tmp_path,
    ).summary
    assert more["status"] == "early_stopped" and more["steps"] == 16


def test_resuming_with_another_learning_rate_says_the_checkpoints_is_kept_not_applied(
    compose, tmp_path, caplog
):
    # optimizer.load_state_dict brings back the saved param groups (lr, weight_decay, ...) and the schedule
    # its base lr: the new optimizer.lr was listed as a config change and then silently not used
    from dgtrain.train import fit

    args = ["model=linreg", "trainer.max_steps=6", "trainer.log_every=1", "optimizer=sgd"]
    fit(compose([*args, "optimizer.lr=0.05"]), tmp_path)
    with caplog.at_level("WARNING", logger="dgtrain"):
        result = fit(
            compose(
                [
                    *args[1:],
                    "model=linreg",
                    "trainer.max_steps=8",
                    "optimizer.lr=0.2",
                    "optimizer.momentum=0.5",
                    "resume=auto",
                ]
            ),
            tmp_path,
        )
    assert [h["train/lr"] for h in result.history] == [0.05, 0.05]
    assert "not applied" in caplog.text and "kept from the checkpoint" in caplog.text
    assert "optimizer.lr=0.2 (the checkpoint's 0.05)" in caplog.text
    assert "optimizer.momentum=0.5 (the checkpoint's 0.9)" in caplog.text


def test_resume_auto_in_a_new_run_dir_does_not_take_over_another_runs_shared_checkpoint_dir(
    compose, tmp_path
):
    # checkpoint.dir shared by two run dirs: resume=auto in a new run dir silently continued the other run
    # (its id, its checkpoints) and rotated that run's checkpoints away
    from dgtrain.errors import DgtrainError
    from dgtrain.train import fit

    args = ["model=linreg", "trainer.max_steps=4", "checkpoint.every=2", f"checkpoint.dir={tmp_path / 'ck'}"]
    fit(compose(args), tmp_path / "a")
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    with pytest.raises(DgtrainError, match=r"checkpoint.dir=.*holds the checkpoints of run .*resume=") as e:
        fit(compose([*args[:1], "trainer.max_steps=8", *args[2:], "resume=auto"]), tmp_path / "b")
    assert "hydra.run.dir=" in str(e.value)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    newest = tmp_path / "ck" / before[-1]
    with pytest.raises(
        DgtrainError, match=r"checkpoint.dir=.*already holds checkpoints .*another checkpoint.dir"
    ):
        fit(compose([*args[:1], "trainer.max_steps=8", *args[2:], f"resume={newest}"]), tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    # its own run dir still continues it
    assert (
        fit(compose([*args[:1], "trainer.max_steps=6", *args[2:], "resume=auto"]), tmp_path / "a").summary[
            "steps"
        ]
        == 6
    )


def test_resuming_with_another_optimizer_is_refused_before_training(compose, tmp_path):
    # Adam's param groups loaded into SGD: an internal error (KeyError: 'momentum') at the first step
    from dgtrain.train import fit

    fit(compose(["model=linreg", "trainer.max_steps=2", "optimizer=adam"]), tmp_path)
    with pytest.raises(
        DgtrainError, match=r"saved with another optimizer \(torch.optim.Adam\).*momentum"
    ) as e:
        fit(compose(["model=linreg", "trainer.max_steps=4", "optimizer=sgd", "resume=auto"]), tmp_path)
    assert e.value.exit_code == 2 and "init_from=" in str(e.value)
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 2


def test_resume_from_a_run_dir_whose_checkpoints_are_in_its_checkpoint_dir(compose, tmp_path):
    # resume=RUN_DIR looked only in RUN_DIR/checkpoints: a run with checkpoint.dir=... elsewhere gave
    # "no checkpoint in RUN_DIR" (eval and init_from=RUN_DIR find them)
    from dgtrain.train import fit

    fit(compose(["model=linreg", "trainer.max_steps=4", f"checkpoint.dir={tmp_path / 'ck'}"]), tmp_path / "a")
    result = fit(compose(["model=linreg", "trainer.max_steps=6", f"resume={tmp_path / 'a'}"]), tmp_path / "b")
    assert result.summary["steps"] == 6 and [h["step"] for h in result.history][0] > 4


def test_resume_auto_without_the_finished_runs_checkpoints_does_not_start_over(compose, tmp_path):
    # resume=auto found no checkpoint (a relative checkpoint.dir read from another folder, or checkpoints
    # deleted) and silently trained a completed run again from step 0, dropping its metrics.jsonl rows
    from dgtrain.errors import DgtrainError
    from dgtrain.train import fit

    run = tmp_path / "run"
    fit(compose(["model=linreg", "trainer.max_steps=4", f"checkpoint.dir={tmp_path / 'ck'}"]), run)
    rows = (run / "metrics.jsonl").read_text()
    args = ["model=linreg", "trainer.max_steps=6", f"checkpoint.dir={tmp_path / 'elsewhere'}", "resume=auto"]
    with pytest.raises(DgtrainError, match=r"resume=auto: .* completed run .*no checkpoint of it") as e:
        fit(compose(args), run)
    assert e.value.exit_code == 2 and "checkpoint.dir" in str(e.value)
    assert (run / "metrics.jsonl").read_text() == rows
    assert json.loads((run / "summary.json").read_text())["steps"] == 4


def test_keep_last_2_after_5_saves_leaves_the_newest_2(compose, tmp_path):
    cfg = compose(["model=linreg", "checkpoint.keep_last=2"])
    c = ckpt_io.Checkpointer(cfg, tmp_path)
    for step in range(1, 6):
        c.save(step, _tiny_state(step), best=step == 2)
    assert [p.name for p in ckpt_io.list_checkpoints(c.dir)] == ["step_00000004.pt", "step_00000005.pt"]
    assert ckpt_io.load(c.dir / "best.pt")["step"] == 2, "best.pt is kept apart from the rotation"
    assert [ckpt_io.load(p)["step"] for p in ckpt_io.list_checkpoints(c.dir)] == [4, 5]


def test_a_pickle_that_would_run_a_command_is_refused_and_does_not_run(tmp_path):
    sentinel = tmp_path / "sentinel"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    bad = tmp_path / "step_00000009.pt"
    torch.save({"format": ckpt_io.FORMAT, "model": Evil()}, bad)
    with pytest.raises(ckpt_io.CheckpointError, match=r"refused.*weights_only=True") as e:
        ckpt_io.load(bad)
    assert str(bad) in str(e.value)
    assert not sentinel.exists()


def test_truncated_and_foreign_files_are_named_in_the_error(tmp_path):
    good = ckpt_io.save(_tiny_state(3), tmp_path / "step_00000003.pt")
    cut = tmp_path / "step_00000004.pt"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ckpt_io.CheckpointError, match="truncated or corrupt") as e:
        ckpt_io.load(cut)
    assert str(cut) in str(e.value)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ckpt_io.CheckpointError, match="not a dgtrain checkpoint"):
        ckpt_io.load(tmp_path / "other.pt")
    path, state = ckpt_io.newest_valid(tmp_path, "test")
    assert path == good and state["step"] == 3


def test_rng_states_round_trip_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), random.seed(2), np.random.seed(3)
    ckpt_io.save({"rng": ckpt_io.rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    ckpt_io.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_config_schema_defaults_and_validation(compose):
    from dgtrain.validation import problems

    cfg = compose(["model=linreg"])
    assert cfg.resume is None and cfg.checkpoint.every is None and cfg.checkpoint.keep_last == 2
    assert cfg.checkpoint.best is True and cfg.trainer.nonfinite == "fail"
    found = problems(compose(["model=linreg", "checkpoint.keep_last=0", "resume=/no/such/file.pt"]))
    assert any("checkpoint.keep_last=0" in p for p in found)
    assert any("resume=/no/such/file.pt" in p for p in found)
    with pytest.raises(Exception, match="nonfinite"):
        compose(["model=linreg", "trainer.nonfinite=ignore"])


def test_stored_configs_pass_the_allow_list_on_resume_and_eval(compose, tmp_path):
    """A checkpoint whose config names os.system is refused by resume and by `dgtrain eval`, naming the key,
    and a stored `allowed_targets` cannot widen the list."""
    from dgtrain.commands.eval import main as eval_main
    from dgtrain.train import fit

    state = _tiny_state(1)
    state["config"] = {"model": {"_target_": "os.system"}, "allowed_targets": ["os."]}
    bad = ckpt_io.save(state, tmp_path / "evil" / "step_00000001.pt")
    with pytest.raises(DgtrainError, match=r"model\._target_='os\.system' is not allowed") as e:
        eval_main([str(bad)])
    assert str(bad) in str(e.value)
    run = tmp_path / "run"
    run.mkdir()
    cfg = compose(["model=linreg", "trainer.max_steps=2", "device=cpu", f"resume={bad}"])
    with pytest.raises(DgtrainError, match=r"model\._target_='os\.system' is not allowed"):
        fit(cfg, run)
    assert not (run / "metrics.jsonl").exists(), "refused before anything ran"


# ---------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The uninterrupted run every resumed run must equal."""
    d = tmp_path_factory.mktemp("reference")
    p = run_cli([*RUN, f"hydra.run.dir={d / 'run'}"], d)
    assert p.returncode == 0, p.stderr
    return d / "run"


@pytest.mark.slow
def test_exception_at_step_12_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    run = tmp_path / "run"
    _crash_after_step_12(RUN, run, tmp_path)
    assert [r["step"] for r in read_metrics(run)] == list(range(1, 13))
    assert [c.name for c in ckpt_io.list_checkpoints(run / "checkpoints")] == [
        "step_00000005.pt",
        "step_00000010.pt",
    ]
    p = run_cli([*RUN, "resume=auto", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert "resuming from" in _out(p) and "step_00000010.pt" in _out(p)
    _assert_same_run(reference, run)


@pytest.mark.slow
def test_sigkill_then_resume_equals_the_uninterrupted_run(reference, tmp_path):
    run = tmp_path / "run"
    proc = _popen([*RUN, f"hydra.run.dir={run}"], tmp_path)
    _wait_for(lambda: (run / "checkpoints" / "step_00000010.pt").exists(), proc=proc)
    proc.kill()  # SIGKILL: no handler runs; a checkpoint being written may be left as a temp file
    proc.wait(timeout=30)
    p = run_cli([*RUN, "resume=auto", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr
    _assert_same_run(reference, run)
    assert not list((run / "checkpoints").glob(".*.tmp"))


@pytest.mark.slow
def test_truncated_newest_checkpoint(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    newest = ckpt_io.list_checkpoints(run / "checkpoints")[-1]
    assert newest.name == "step_00000016.pt"
    newest.write_bytes(newest.read_bytes()[:1000])

    p = run_cli([*RUN, f"resume={newest}", f"hydra.run.dir={tmp_path / 'explicit'}"], tmp_path)
    assert p.returncode != 0
    assert str(newest) in _out(p) and "truncated or corrupt" in _out(p)

    p = run_cli([*RUN, "resume=auto", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"{newest}" in _out(p) and "falling back to step_00000015.pt" in _out(p)
    assert "resuming from" in _out(p) and "step_00000015.pt (step 15)" in _out(p)
    _assert_same_run(reference, run)


@pytest.mark.slow
def test_resume_from_a_malicious_checkpoint_does_not_run_it(tmp_path):
    sentinel = tmp_path / "sentinel"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {sentinel}",))

    bad = tmp_path / "evil.pt"
    torch.save({"format": ckpt_io.FORMAT, "model": Evil()}, bad)
    p = run_cli(
        ["model=linreg", "device=cpu", f"resume={bad}", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path
    )
    assert p.returncode != 0 and str(bad) in _out(p) and "refused" in _out(p)
    assert not sentinel.exists()


@pytest.mark.slow
def test_sigterm_exits_143_with_a_checkpoint_at_the_last_completed_step(tmp_path):
    run = tmp_path / "run"
    args = ["model=linreg", "device=cpu", "trainer.max_steps=1000000", "trainer.log_every=1"]
    proc = _popen([*args, f"hydra.run.dir={run}"], tmp_path)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 20, proc=proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143
    steps = [r["step"] for r in read_metrics(run)]
    last = json.loads((run / "summary.json").read_text())["steps"]
    assert steps == list(range(1, last + 1)), "every completed step is logged"
    saved = ckpt_io.list_checkpoints(run / "checkpoints")
    assert saved[-1].name == f"step_{last:08d}.pt" and ckpt_io.load(saved[-1])["step"] == last


@pytest.mark.slow
def test_sigusr1_under_slurm_checkpoints_and_requeues(tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = cli_env(SLURM_JOB_ID="4242", PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = tmp_path / "run"
    args = ["model=linreg", "device=cpu", "trainer.max_steps=1000000", "trainer.log_every=1"]
    proc = _popen([*args, f"hydra.run.dir={run}"], tmp_path, env=env)
    _wait_for(lambda: (run / "metrics.jsonl").exists() and len(read_metrics(run)) >= 5, proc=proc)
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=60) == 138
    assert calls.read_text().split() == ["requeue", "4242"]
    last = json.loads((run / "summary.json").read_text())["steps"]
    assert ckpt_io.load(ckpt_io.list_checkpoints(run / "checkpoints")[-1])["step"] == last


def _nan_args(tmp_path: Path, mode: str, **over: str) -> list[str]:
    (tmp_path / "nanmodel.py").write_text(NAN_MODEL)
    args = {
        "model": "linreg",
        "model._target_": "nanmodel.NanAt",
        "+model.nan_at": "3",
        "allowed_targets": "[nanmodel.]",
        "device": "cpu",
        "trainer.max_steps": "5",
        "trainer.log_every": "1",
        "checkpoint.every": "1",
        "checkpoint.keep_last": "null",
        "trainer.nonfinite": mode,
        **over,
    }
    return [f"{k}={v}" for k, v in args.items()]


@pytest.mark.slow
def test_nonfinite_fail_stops_before_the_update_naming_the_step(tmp_path):
    env = cli_env(PYTHONPATH=f"{REPO}{os.pathsep}{tmp_path}")
    p = run_cli([*_nan_args(tmp_path, "fail"), f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env=env)
    assert p.returncode == 3
    assert "train/loss became nan at step 3 (last finite loss" in _out(p)
    assert "before that step's optimizer update" in _out(p)
    run = tmp_path / "run"
    assert [r["step"] for r in read_metrics(run)] == [1, 2]
    assert [c.name for c in ckpt_io.list_checkpoints(run / "checkpoints")] == [
        "step_00000001.pt",
        "step_00000002.pt",
    ]
    assert json.loads((run / "summary.json").read_text())["status"] == "failed"


@pytest.mark.parametrize("fused", ["false", "true"], ids=["host-read", "on-device"])
def test_nonfinite_skip_leaves_parameters_bit_identical_for_that_step(compose, tmp_path, monkeypatch, fused):
    """Either way of skipping: the host reads the flag (plain Adam), or fused Adam drops the update itself."""
    from dgtrain.train import fit

    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    run.mkdir()
    args = _nan_args(tmp_path, "skip", **{"optimizer.fused": fused})
    assert fit(compose(args), run).summary["status"] == "completed"
    s = [ckpt_io.load(run / "checkpoints" / f"step_{i:08d}.pt") for i in (2, 3, 4)]
    for k in s[1]["model"]:
        assert torch.equal(s[1]["model"][k], s[0]["model"][k]), "step 3 (skipped) changed nothing"
        assert not torch.equal(s[2]["model"][k], s[1]["model"][k]), "step 4 trained again"
    assert s[1]["optimizer"]["state"][0]["step"] == s[0]["optimizer"]["state"][0]["step"] == 2
    rows = {r["step"]: r for r in read_metrics(run)}
    assert [rows[i]["train/skipped_steps"] for i in (2, 3, 5)] == [0, 1, 1]


def _fit_keeping_setup(compose, args: list[str], run: Path, monkeypatch, kept: list) -> None:
    """fit(...) in this process, appending its Setup (model included) to `kept`, also when fit raises."""
    from dgtrain import train

    setup = train.setup
    monkeypatch.setattr(train, "setup", lambda *a, **k: kept.append(setup(*a, **k)) or kept[-1])
    run.mkdir()
    try:
        train.fit(compose(args), run)
    finally:
        monkeypatch.setattr(train, "setup", setup)


def test_nonfinite_fail_on_device_is_reported_at_the_next_read_naming_the_first_bad_step(
    compose, tmp_path, monkeypatch
):
    """Fused Adam skips on the device: NaN at step 3, found at step 4 (a log and checkpoint step) before
    anything is logged or saved for it, and no update applied from step 3 on."""
    from dgtrain.errors import NonFiniteLossError

    monkeypatch.syspath_prepend(str(tmp_path))
    run = tmp_path / "run"
    over = {
        "optimizer.fused": "true",
        "trainer.max_steps": "8",
        "trainer.log_every": "4",
        "checkpoint.every": "2",
    }
    kept: list = []
    with pytest.raises(
        NonFiniteLossError, match=r"loss became nan at step 3 \(last finite loss .* at step 2\)"
    ):
        _fit_keeping_setup(compose, _nan_args(tmp_path, "fail", **over), run, monkeypatch, kept)
    assert [r["step"] for r in read_metrics(run)] == [2], "steps 1-2 are logged, nothing from step 3 on"
    assert [c.name for c in ckpt_io.list_checkpoints(run / "checkpoints")] == ["step_00000002.pt"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 2
    saved = ckpt_io.load(run / "checkpoints" / "step_00000002.pt")["model"]
    for k, v in kept[0].model.state_dict().items():  # step 4's loss was finite: only the halt skipped it
        assert torch.equal(v, saved[k]), f"{k} changed after the bad step"


@pytest.mark.parametrize("fused", ["false", "true"], ids=["host-read", "on-device"])
def test_a_fused_optimizer_step_reads_nothing_from_the_device(compose, tmp_path, monkeypatch, fused):
    """Between logging steps the loop never reads a tensor on the host with a fused optimizer (the
    non-fused fallback reads the guard's flag once per step, which this test must see)."""
    from dgtrain import train

    reads, inside = [], [False]
    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **kw):
            if inside[0]:
                reads.append(_name)
            return _orig(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, spy)
    step = train.Loop.train_step

    def watched(self):
        inside[0] = True
        try:
            step(self)
        finally:
            inside[0] = False

    def batches(self, _next=train.BatchStream.__next__):  # index tensors of the data order live on the host
        inside[0] = False
        try:
            return _next(self)
        finally:
            inside[0] = True

    monkeypatch.setattr(train.Loop, "train_step", watched)
    monkeypatch.setattr(train.BatchStream, "__next__", batches)
    cfg = compose(["model=mlp", "device=cpu", "trainer.max_steps=6", f"optimizer.fused={fused}"])
    train.fit(cfg, tmp_path)
    if fused == "true":
        assert reads == []
    else:  # the guard's flag (and plain Adam's own step counter on the CPU)
        assert reads.count("item") >= 6


@pytest.mark.slow
@pytest.mark.parametrize("target", ["os.system", "builtins.exec"])
def test_a_target_outside_the_allow_list_is_refused_before_anything_runs(tmp_path, target):
    run = tmp_path / "run"
    p = run_cli(["model=linreg", f"model._target_={target}", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 2
    assert f"model._target_='{target}' is not allowed" in _out(p)
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


@pytest.mark.slow
def test_eval_scores_the_final_weights_like_the_last_evaluation(reference, tmp_path, capsys):
    p = run_cli(["eval", str(reference), "--json"], tmp_path)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    final = json.loads((reference / "summary.json").read_text())["final"]
    assert out["weights"].endswith("model.safetensors")
    assert out["metrics"]["val/acc"] == final["val/acc"] and out["metrics"]["val/loss"] == final["val/loss"]
    from dgtrain.commands.eval import main as eval_main

    assert eval_main([str(reference / "checkpoints" / "step_00000015.pt")]) == 0
    printed = capsys.readouterr().out
    assert "val/acc" in printed and "(step 15)" in printed
    with pytest.raises(DgtrainError, match="missing.pt"):
        eval_main([str(tmp_path / "missing.pt")])


def test_resume_from_a_path_into_a_new_run_dir_carries_the_wandb_run_id(compose, tmp_path):
    state = _tiny_state(4)
    state["config"] = {"model": {"_target_": "dgtrain.models.linreg.LinearRegression"}}
    state["wandb_run_id"] = "abc123"
    path = ckpt_io.save(state, tmp_path / "old" / "step_00000004.pt")
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "metrics.jsonl").write_text(
        '{"step": 3}\n{"step": 4}\n{"step": 5}\n{"step": 6, "trai'
    )
    cfg = compose(["model=linreg", f"resume={path}"])
    c = ckpt_io.Checkpointer(cfg, tmp_path / "new")
    got = c.load_for_resume(cfg, ("dgtrain.", "torch."))
    assert got["step"] == 4 and got["path"] == str(path)
    assert (tmp_path / "new" / ckpt_io.WANDB_ID_FILE).read_text().strip() == "abc123"
    assert [r["step"] for r in read_metrics(tmp_path / "new")] == [3, 4], "rows past the checkpoint dropped"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_rng_state_round_trips_and_a_cuda_run_resumes(compose, tmp_path):
    from dgtrain.train import fit

    torch.cuda.manual_seed_all(5)
    torch.zeros(1, device="cuda")
    ckpt_io.save({"rng": ckpt_io.rng_state()}, tmp_path / "rng.pt")
    expected = torch.rand(3, device="cuda")
    torch.cuda.manual_seed_all(9)
    ckpt_io.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3, device="cuda"), expected)

    common = ["model=mlp", "device=cuda", "trainer.max_steps=6", "trainer.log_every=1", "checkpoint.every=3"]
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    full = fit(compose(common), tmp_path / "a")
    first = tmp_path / "a" / "checkpoints" / "step_00000003.pt"
    resumed = fit(compose([*common, f"resume={first}"]), tmp_path / "b")
    assert resumed.summary["steps"] == 6
    for p, q in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.slow
def test_resume_with_accumulation_and_a_half_finished_log_window(tmp_path):
    """Checkpoint at step 10 falls inside a log window of 3 (9..12), with 2 micro-batches per step."""
    run_args = [*RUN, "trainer.log_every=3", "trainer.grad_accum_steps=2", "data.batch_size=16"]
    ref = tmp_path / "ref"
    p = run_cli([*run_args, f"hydra.run.dir={ref}"], tmp_path)
    assert p.returncode == 0, p.stderr
    run = tmp_path / "run"
    _crash_after_step_12(run_args, run, tmp_path)
    p = run_cli([*run_args, "resume=auto", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr
    assert _series(run) == _series(ref)
    assert [r["step"] for r in _series(ref) if "train/loss" in r] == [3, 6, 9, 12, 15, 16]
    wa, wb = _weights(ref / "model.safetensors"), _weights(run / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_resumed_run_with_augmentation_equals_the_uninterrupted_run(compose, tmp_path, monkeypatch):
    """Random crops and flips draw from torch's RNG, which checkpoints carry: resuming is still exact."""
    from dgtrain.data.augment import ImageAugment
    from dgtrain.train import fit
    from tests.test_data import _write_cifar

    _write_cifar(tmp_path / "cifar" / "cifar-10-batches-py", n=20)
    args = [
        "model=convnet",
        "data=cifar10",
        f"data.root={tmp_path / 'cifar'}",
        "data.batch_size=16",
        "device=cpu",
        "trainer.max_steps=14",
        "trainer.log_every=1",
        "checkpoint.every=5",
        "logger=[]",
    ]
    cfg = compose(args)
    full = fit(cfg, tmp_path / "full")
    assert full.setup.data.augment is not None
    real, calls = ImageAugment.__call__, []

    def crash_in_step_11(self, batch):
        calls.append(1)
        if len(calls) == 11:
            raise RuntimeError("injected crash")
        return real(self, batch)

    monkeypatch.setattr(ImageAugment, "__call__", crash_in_step_11)
    with pytest.raises(RuntimeError, match="injected crash"):
        fit(cfg, tmp_path / "resumed")
    monkeypatch.setattr(ImageAugment, "__call__", real)
    resumed = fit(compose([*args, "resume=auto"]), tmp_path / "resumed")
    losses = [
        [r["train/loss"] for r in x.history if r["step"] > 10 and "train/loss" in r] for x in (full, resumed)
    ]
    assert len(losses[0]) == 4 and losses[0] == losses[1]
    for (name, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
