"""One run dir, one run (issue 10, section 2): locks, run ids, no fresh run over another's files,
resume=auto continues only its own run, rotation keeps the newest loadable checkpoint, writability
checked before training; and trainer.max_skipped (section 3)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import subprocess

import pytest
from omegaconf import OmegaConf

from dgtrain import checkpoint as ckpt_io
from dgtrain.errors import DgtrainError, NonFiniteLossError
from dgtrain.train import fit

BASE = ["model=linreg", "device=cpu", "trainer.log_every=2"]


def _run(compose, run_dir, *extra):
    return fit(compose([*BASE, "trainer.max_steps=4", *extra]), run_dir)


def _snapshot(run_dir):
    return {p.relative_to(run_dir).as_posix(): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


# Another process holding a directory's lock the way a live dgtrain run does (flock + pid/host), without
# importing torch; it prints "ready" once it holds the lock and exits when its stdin closes.
HOLDER = """
import fcntl, json, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": "abc"}).encode())
print("ready", flush=True)
sys.stdin.read()
"""


@contextlib.contextmanager
def held(directory):
    import sys

    directory.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(directory / ckpt_io.LOCK_FILE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert p.stdout.readline().strip() == "ready"
        yield p.pid
    finally:
        p.stdin.close()
        p.wait(timeout=30)


def test_a_second_run_in_a_locked_run_dir_fails_naming_pid_and_host(compose, tmp_path):
    run = tmp_path / "run"
    with held(run) as pid:
        with pytest.raises(DgtrainError) as e:
            _run(compose, run)
        assert e.value.exit_code == 2
        assert f"is in use by another dgtrain run (pid {pid} on host {socket.gethostname()}" in str(e.value)
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    assert _run(compose, run).summary["status"] == "completed"  # the holder exited: usable again
    assert not (run / ckpt_io.LOCK_FILE).exists()


def test_a_run_that_failed_in_this_process_does_not_block_the_next(compose, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(DgtrainError) as e:  # fails after taking the lock; the exception keeps fit's frame
        _run(compose, run, "data=csv", f"data.path={tmp_path / 'missing.csv'}", "data.target=y")
    assert not (run / ckpt_io.LOCK_FILE).exists()  # released as the failure left the set-up
    assert _run(compose, run).summary["status"] == "completed"
    del e


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(compose, tmp_path, caplog):
    dead = subprocess.Popen(["true"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / ckpt_io.LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    with caplog.at_level(logging.WARNING, logger="dgtrain"):
        assert _run(compose, run).summary["status"] == "completed"
    assert f"taking over the stale lock of pid {dead.pid}" in caplog.text
    assert "no longer running" in caplog.text


def test_a_shared_checkpoint_dir_is_locked_and_not_overwritten(compose, tmp_path):
    shared = tmp_path / "ckpts"
    first = _run(compose, tmp_path / "a", f"checkpoint.dir={shared}", "checkpoint.every=1")
    before = _snapshot(shared)
    with pytest.raises(DgtrainError, match=r"already holds a run \(\d checkpoint\(s\) in .*ckpts\)"):
        _run(compose, tmp_path / "b", f"checkpoint.dir={shared}")
    assert _snapshot(shared) == before  # A's best.pt and step files untouched
    busy = pytest.raises(DgtrainError, match=r"checkpoint\.dir .*ckpts is in use by another dgtrain run")
    with held(shared), busy:
        _run(compose, tmp_path / "c", f"checkpoint.dir={shared}", "resume=auto")
    assert first.summary["run_id"]


def test_a_fresh_run_into_a_used_dir_refuses_and_keeps_its_files(compose, tmp_path):
    run = tmp_path / "run"
    _run(compose, run)
    before = _snapshot(run)
    with pytest.raises(DgtrainError) as e:
        _run(compose, run, "trainer.max_steps=6")
    msg = str(e.value)
    assert e.value.exit_code == 2 and "already holds a run (summary.json, " in msg
    assert "Continue that run with resume=auto, or choose a new directory (hydra.run.dir=...)" in msg
    assert _snapshot(run) == before


def test_each_run_has_an_id_in_its_files_and_a_resume_keeps_it(compose, tmp_path):
    run = tmp_path / "run"
    first = _run(compose, run, "checkpoint.every=2")
    run_id = first.summary["run_id"]
    assert len(run_id) == 12
    assert json.loads((run / "run.json").read_text())["run_id"] == run_id
    assert json.loads((run / "summary.json").read_text())["run_id"] == run_id
    for p in ckpt_io.list_checkpoints(run / "checkpoints") + [run / "checkpoints" / "best.pt"]:
        assert ckpt_io.load(p)["run_id"] == run_id
    second = _run(compose, run, "trainer.max_steps=6", "checkpoint.every=2", "resume=auto")
    assert second.summary["run_id"] == run_id and second.summary["steps"] == 6
    other = _run(compose, tmp_path / "other")
    assert other.summary["run_id"] != run_id


def test_resume_auto_continues_only_the_run_the_dir_belongs_to(compose, tmp_path, caplog):
    run, foreign = tmp_path / "run", tmp_path / "foreign"
    mine = _run(compose, run, "checkpoint.every=2").summary["run_id"]
    _run(compose, foreign, "trainer.max_steps=8", "checkpoint.every=8")
    # another run's newer checkpoint lands in this run's checkpoint dir
    (run / "checkpoints" / "step_00000008.pt").write_bytes(
        (foreign / "checkpoints" / "step_00000008.pt").read_bytes()
    )
    with caplog.at_level(logging.WARNING, logger="dgtrain"):
        result = _run(compose, run, "trainer.max_steps=6", "checkpoint.every=2", "resume=auto")
    assert "step_00000008.pt belongs to run" in caplog.text
    assert result.summary["run_id"] == mine
    steps = [row["step"] for row in result.history if "train/loss" in row]
    assert steps == [6], "resumed at this run's step 4, not the foreign step 8"


def test_rotation_keeps_the_newest_loadable_checkpoint_and_drops_unloadable_ones(compose, tmp_path):
    run = tmp_path / "run"
    _run(compose, run, "checkpoint.every=2", "checkpoint.keep_last=null")
    step4 = run / "checkpoints" / "step_00000004.pt"
    step4.write_bytes(step4.read_bytes()[:100])  # a kill mid-write on a filesystem without atomic rename
    _run(compose, run, "trainer.max_steps=3", "checkpoint.every=1", "checkpoint.keep_last=1", "resume=auto")
    left = ckpt_io.list_checkpoints(run / "checkpoints")
    assert [p.name for p in left] == ["step_00000003.pt"]
    assert ckpt_io.load(left[0])["step"] == 3


def test_rotation_never_deletes_the_checkpoint_it_just_saved(tmp_path):
    d = tmp_path / "ckpts"
    d.mkdir()
    ckpt_io.save({"step": 10}, d / "step_00000010.pt")  # a later step, not this run's timeline
    cp = ckpt_io.Checkpointer(OmegaConf.create({"checkpoint": {"dir": str(d), "keep_last": 1}}), tmp_path)
    cp.save(3, {"step": 3})
    cp.save(4, {"step": 4})
    assert [p.name for p in ckpt_io.list_checkpoints(d)] == ["step_00000004.pt", "step_00000010.pt"]


def test_unwritable_directories_fail_before_training(compose, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(
        DgtrainError, match=r"checkpoint\.dir=.*a_file is a file, so no directory can be made"
    ):
        _run(compose, tmp_path / "run", f"checkpoint.dir={blocker}")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    with pytest.raises(DgtrainError, match=r"hydra\.run\.dir=.*a_file is a file"):
        _run(compose, blocker / "run")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o555)
        with pytest.raises(DgtrainError, match="is not writable by this user"):
            _run(compose, tmp_path / "run2", f"checkpoint.dir={ro / 'ck'}")


def test_every_file_of_a_run_gets_the_same_permissions(compose, tmp_path):
    run = tmp_path / "run"
    _run(compose, run)
    umask = os.umask(0)
    os.umask(umask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert "model.safetensors" in modes and "summary.json" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ------------------------------------------------------------------------------- trainer.max_skipped

DIVERGING = ["optimizer=sgd", "optimizer.lr=1e6", "trainer.nonfinite=skip", "trainer.max_steps=20"]


def test_a_run_that_keeps_skipping_updates_fails_with_exit_3(compose, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as e:
        fit(compose([*BASE, *DIVERGING]), run)
    assert e.value.exit_code == 3
    assert "trainer.nonfinite=skip dropped 3 of the first" in str(e.value)
    assert "more than trainer.max_skipped=2: the model is not training" in str(e.value)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["skipped_steps"] == 3


def test_the_skipped_count_is_in_the_summary_and_on_the_console(compose, tmp_path, capsys):
    r = fit(compose([*BASE, *DIVERGING, "trainer.max_skipped=20", "logger.console.mode=plain"]), tmp_path)
    assert r.summary["status"] == "completed" and r.summary["skipped_steps"] > 10
    out = capsys.readouterr().out
    assert any(
        line.split("│")[1:3] and "skipped updates" in line and str(r.summary["skipped_steps"]) in line
        for line in out.splitlines()
    ), out
    clean = fit(compose([*BASE, "trainer.max_steps=4"]), tmp_path / "clean")
    assert clean.summary["skipped_steps"] == 0


def test_resume_from_another_runs_checkpoint_into_a_used_dir_is_refused(compose, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _run(compose, a)
    _run(compose, b)
    before = _snapshot(a)
    theirs = ckpt_io.list_checkpoints(b / "checkpoints")[-1]
    with pytest.raises(DgtrainError, match=r"belongs to run \w+, but .*/a holds run \w+ \(summary\.json"):
        _run(compose, a, "trainer.max_steps=6", f"resume={theirs}")
    after = _snapshot(a)
    assert {k for k in before if before[k] != after.get(k)} | (set(after) - set(before)) == set()
    assert _run(compose, tmp_path / "c", "trainer.max_steps=6", f"resume={theirs}").summary["steps"] == 6


def test_resume_auto_removes_only_damaged_checkpoints(compose, tmp_path):
    run = tmp_path / "run"
    _run(compose, run, "checkpoint.every=2")
    newer = ckpt_io.load(ckpt_io.list_checkpoints(run / "checkpoints")[-1])
    newer["version"] = ckpt_io.VERSION + 1  # written by a newer dgtrain: passed over, kept
    ckpt_io.save(newer, run / "checkpoints" / "step_00000009.pt")
    (run / "checkpoints" / "step_00000008.pt").write_bytes(b"PK\x03\x04 truncated")  # damaged: removed
    _run(compose, run, "trainer.max_steps=6", "checkpoint.every=2", "resume=auto")
    names = [p.name for p in ckpt_io.list_checkpoints(run / "checkpoints")]
    assert "step_00000008.pt" not in names and "step_00000009.pt" in names
    assert "step_00000006.pt" in names
