"""The CLI on user mistakes and on bugs (issue 10, section 4): exit 2 with one paragraph and no
traceback, no run dir left behind for a rejected config; an internal error is one console line with the
traceback in dgtrain.log; a sweep with a failed trial ends without a traceback."""

from __future__ import annotations

import sys

import pytest

from tests.conftest import cli_env, run_cli


def _out(p) -> str:
    return p.stdout + p.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["+trainer.max_stepz=5"],
            "trainer.max_stepz is not a setting dgtrain knows, so it would be ignored. "
            "Did you mean trainer.max_steps? Valid keys under trainer: max_steps,",
        ),
        (["optimizer.lr=inf"], "optimizer.lr=inf: must be a finite, non-negative number"),
        (["optimizer.lr=nan"], "optimizer.lr=nan: must be a finite, non-negative number"),
        (["data.val_fraction=1.5"], "data.val_fraction=1.5: must be a number in (0, 1)."),
        (["model=transformer", "model.n_heads=0"], "model.n_heads=0: must be a positive integer."),
    ],
)
def test_a_rejected_config_exits_2_and_leaves_no_run_dir(tmp_path, args, message):
    p = run_cli(["model=linreg", "trainer.max_steps=3", *args], tmp_path)
    assert p.returncode == 2, _out(p)
    assert message in _out(p) and "Traceback" not in _out(p)
    assert not (tmp_path / "outputs").exists(), "a rejected config leaves no outputs/DATE/TIME_model/"


@pytest.mark.slow
def test_a_rejected_config_keeps_a_run_dir_that_holds_other_files(tmp_path):
    run = tmp_path / "mine"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    p = run_cli(["model=linreg", "optimizer.lr=nan", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 2
    assert (run / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("value", ["~/data.csv", "/tmp/a&b.csv", "/tmp/é.csv", "/tmp/my data(1).csv"])
def test_an_unparsable_override_gets_a_quoting_hint(tmp_path, value):
    p = run_cli(["model=linreg", "data=csv", f"data.path={value}"], tmp_path)
    assert p.returncode == 2, _out(p)
    assert f"cannot parse the override 'data.path={value}'" in p.stderr
    assert f"""'data.path="{value}"' (the outer single quotes are for the shell)""" in p.stderr
    assert "Traceback" not in _out(p)


@pytest.mark.parametrize(
    "override, fix",
    [
        ("callbacks=null", "use callbacks=[] (or '~callbacks') for none."),
        ("logger=null", "use logger=[] (or '~logger') for none: the console is always there."),
        ("recipe=null", "leave recipe=... out (none is the default)"),
        ("model=null", "pick one with model=NAME (dgtrain ls lists the options)."),
    ],
)
def test_a_config_group_set_to_null_says_what_to_write(override, fix):
    """`callbacks=null` (train.yaml: 'null: none') was a bare Hydra ValueError traceback, exit 1."""
    from dgtrain.cli import check_overrides

    group = override.split("=")[0]
    assert check_overrides([override]) == (
        f"{group}=null: a config group takes an option's name, not null; {fix}"
        + ("" if fix.endswith(".") else f", or remove one a config sets with '~{group}'.")
    )
    assert check_overrides(["callbacks=[]", "~logger", "data.max_examples=null"]) is None


def test_a_null_config_group_exits_2_without_a_traceback(tmp_path):
    p = run_cli(["model=linreg", "callbacks=null"], tmp_path)
    assert p.returncode == 2, _out(p)
    assert "callbacks=null: a config group takes an option's name, not null" in p.stderr
    assert "Traceback" not in _out(p) and not (tmp_path / "outputs").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "args, message",
    [
        (["logger.console.mode=foo"], "logger.console.mode='foo': expected auto, rich or plain."),
        (["logger.console.plain_interval_s=-1"], "logger.console.plain_interval_s=-1: expected a number of"),
        (["logger=[console,csv,wandb]", "logger.wandb.mode=foo"], "logger.wandb.mode='foo': expected one of"),
    ],
)
def test_a_logger_that_fails_to_open_leaves_no_run_dir(tmp_path, args, message):
    """The sinks open last, after config.yaml, data_info.json and metrics.jsonl (and, here, metrics.csv)
    are written: a bad console mode was an internal error (exit 1), and any sink's error left those
    files in a run dir of a run that never started."""
    run = tmp_path / "run"
    p = run_cli(["model=linreg", "trainer.max_steps=3", *args, f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 2, _out(p)
    assert message in _out(p) and "internal error" not in _out(p)
    assert not run.exists(), sorted(x.name for x in run.iterdir())


def test_hydra_run_dir_under_a_file_is_named(tmp_path):
    (tmp_path / "afile").write_text("x")
    p = run_cli(["model=linreg", "hydra.run.dir=afile/run"], tmp_path)
    assert p.returncode == 2, _out(p)
    assert "hydra.run.dir=afile/run: afile is a file, so no directory can be made there" in p.stderr
    assert "Traceback" not in _out(p)


@pytest.mark.parametrize("name, flags", [("outputs", []), ("multirun", ["-m"])])
def test_a_file_where_the_default_run_dir_goes_is_named(tmp_path, name, flags):
    """A file named `outputs` (or `multirun`) in the working directory blocks Hydra's default run dir:
    a one-line error naming it and the way out, not Hydra's traceback; `--cfg job` still prints."""
    (tmp_path / name).write_text("x")
    p = run_cli([*flags, "model=linreg", "trainer.max_steps=1"], tmp_path)
    key = "hydra.sweep.dir" if flags else "hydra.run.dir"
    assert p.returncode == 2, _out(p)
    assert f"the default {key} ({name}/" in p.stderr and f"{name} is a file" in p.stderr
    assert f"choose another directory ({key}=...)" in p.stderr and "Traceback" not in _out(p)
    assert run_cli(["--cfg", "job", "model=linreg"], tmp_path).returncode == 0


# Runs dgtrain with the optimizer step raising (from this script: code outside dgtrain).
CRASH = """
import sys, torch
def step(self, *a, **kw):
    raise RuntimeError("injected failure in the optimizer")
torch.optim.Adam.step = step
sys.argv = ["dgtrain", *sys.argv[1:]]
from dgtrain.cli import main
main()
"""


@pytest.mark.slow
def test_an_internal_error_is_one_console_line_and_a_traceback_in_the_log(tmp_path):
    import subprocess

    script = tmp_path / "crash.py"
    script.write_text(CRASH)
    run = tmp_path / "run"
    p = subprocess.run(
        [
            sys.executable,
            str(script),
            "model=linreg",
            "optimizer=adam",
            "trainer.max_steps=3",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 1
    assert "Traceback" not in _out(p)
    lines = [line for line in _out(p).splitlines() if "injected failure" in line]
    assert len(lines) == 1 and "internal error: RuntimeError: injected failure in the optimizer" in lines[0]
    assert f"the full traceback is in {run / 'dgtrain.log'}" in lines[0]
    log = (run / "dgtrain.log").read_text()
    assert "Traceback (most recent call last)" in log and 'raise RuntimeError("injected failure' in log


def test_an_error_in_a_users_own_code_names_that_code_not_dgtrain(tmp_path):
    """A user's callback (or model, data, loss) that raises: the one console line names the file and line
    it came from as the user's code; it said 'this is a bug in dgtrain or a library it uses'."""
    run = tmp_path / "run"
    args = ["model=linreg", "trainer.max_steps=3", "allowed_targets=[tests.]", f"hydra.run.dir={run}"]
    p = run_cli([*args, "+callbacks.crash._target_=tests.targets.CrashingCallback"], tmp_path)
    assert p.returncode == 1 and "Traceback" not in _out(p)
    line = next(x for x in _out(p).splitlines() if "a bug in the user's callback" in x)
    assert "tests/targets.py:" in line and "in on_train_step: code of yours, not dgtrain's" in line, line
    assert "bug in dgtrain" not in line and f"the full traceback is in {run / 'dgtrain.log'}" in line


@pytest.mark.slow
def test_a_sweep_with_a_failed_trial_ends_without_a_traceback(tmp_path):
    sweep = tmp_path / "sweep"
    p = run_cli(
        ["-m", "model=linreg", "optimizer.lr=0.05,-1", "trainer.max_steps=2", f"hydra.sweep.dir={sweep}"],
        tmp_path,
    )
    assert p.returncode == 1
    assert "Traceback" not in _out(p)
    assert "optimizer.lr=-1: must be a finite, non-negative number" in p.stderr  # the failed trial, once more
    assert "1 completed, 1 failed" in p.stdout


def test_the_run_dir_of_another_live_run_is_never_removed(tmp_path, monkeypatch):
    import json
    import os

    from dgtrain.cli import remove_untouched_run_dir

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "outputs" / "day" / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text("{}")
    (run / "dgtrain.log").write_text("")
    (run / ".dgtrain.lock").write_text(json.dumps({"pid": os.getpid() + 1, "host": "h"}))
    assert not remove_untouched_run_dir(run) and (run / ".dgtrain.lock").exists()
    (run / ".dgtrain.lock").write_text(json.dumps({"pid": os.getpid(), "host": "h"}))  # this process's own
    assert remove_untouched_run_dir(run)
    assert not (tmp_path / "outputs").exists()  # the empty parents Hydra made go too, not the cwd
    assert tmp_path.is_dir()


def test_a_sweep_hydra_refuses_leaves_its_error_last_and_no_sweep_dir(tmp_path):
    """`-m model=linreg,mpl`: Hydra composes the jobs first and refuses the typo before any job runs; the
    sweep summary then printed a table of two 'missing' trials under the error and left
    multirun/DATE/TIME/ holding only multirun.yaml and the summary files."""
    p = run_cli(["-m", "model=linreg,mpl", "trainer.max_steps=2"], tmp_path)
    assert p.returncode == 1, _out(p)
    assert "Could not find 'model/mpl'" in _out(p)
    assert "missing" not in _out(p) and "sweep summary" not in _out(p)
    assert not (tmp_path / "multirun").exists()


def test_a_sweep_preset_without_m_warns_that_it_trains_once(tmp_path):
    args = ["sweep=linreg_optuna", "trainer.max_steps=2"]
    r = run_cli(args + [f"hydra.run.dir={tmp_path / 'a'}"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "sweep=linreg_optuna is a sweep preset, but this is one run (no -m)" in r.stderr + r.stdout
    # under the W&B agent (its trials are such runs) there is nothing to warn about
    r = run_cli(args + [f"hydra.run.dir={tmp_path / 'b'}"], tmp_path, env=cli_env(WANDB_SWEEP_ID="abc123"))
    assert r.returncode == 0, r.stderr
    assert "sweep preset" not in r.stderr + r.stdout
