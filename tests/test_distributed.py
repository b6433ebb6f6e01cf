"""Several processes on CPU (gloo, 2 ranks): the sharded sampler, DDP and FSDP equivalence with one process,
rank-0-only writing, FSDP checkpoints resumed on one process and read by `dgtrain eval`, and the faults
(a rank killed, SIGTERM to the launcher). docs/distributed.md describes what is checked here."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dgtrain.data import EpochBatchSampler
from dgtrain.errors import DgtrainError
from tests.conftest import cli_env, read_metrics, run_cli

TWO = ["trainer.devices=2", "device=cpu", "trainer.dist_timeout_s=30"]


def losses(rows: list[dict]) -> list[tuple[int, float]]:
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def single(compose, tmp_path: Path, overrides: list[str]):
    from dgtrain.train import fit

    return fit(compose(["device=cpu", *overrides]), tmp_path)


def weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


# ------------------------------------------------------------------------------------------ sampler


@pytest.mark.parametrize("n", [64 * 3, 64 * 3 + 5, 64 * 3 + 1])
def test_ranks_take_disjoint_slices_of_the_same_global_batch(n):
    one = list(EpochBatchSampler(n, 64, shuffle=True, seed=3))
    ranks = [list(EpochBatchSampler(n, 32, shuffle=True, seed=3, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(one)  # every rank runs the same number of steps
    for b, whole in enumerate(one):
        a, c = ranks[0][b], ranks[1][b]
        assert a and c  # no rank gets an empty batch, even from a last batch of one example
        if len(whole) >= 2:
            assert a + c == whole  # disjoint, and together exactly one process's global batch
        else:
            assert a == whole  # the missing index comes from the start of the permutation


def test_random_lm_windows_shard_the_same_way():
    """Datasets that bring their own sampler (random LM windows) shard one global draw too."""
    from dgtrain.data.sequences import RandomStartSampler

    one = list(RandomStartSampler(1000, 256, 64, seed=5))
    ranks = [list(RandomStartSampler(1000, 256, 32, seed=5, rank=r, world=2)) for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 4
    assert all(a + c == whole for a, c, whole in zip(ranks[0], ranks[1], one, strict=True))


def test_overfit_batches_and_validation_are_sharded_like_training(compose):
    """With 2 processes, overfit_batches=N takes the first N global batches, each rank its half of each,
    for training and validation alike; the full validation split is shared out the same way."""
    from dgtrain.train import debug_modes, setup

    cfg = compose(["model=mlp", "device=cpu", "data.batch_size=16", "trainer.overfit_batches=3"])
    seen = {}
    for rank in (0, 1):
        s = setup(cfg, torch.device("cpu"), rank=rank, world=2)
        full_val = [len(b[0]) for b in s.val_loader]
        debug_modes(cfg, s)
        train = [b[1] for b in s.train_loader]
        assert [len(y) for y in train] == [16, 16, 16]
        assert all(torch.equal(a, b) for a, b in zip(train, [b[1] for b in s.val_loader], strict=True))
        seen[rank] = (torch.cat(train), sum(full_val))
    y = s.data.train.y
    want = torch.cat([torch.cat([y[g * 32 : g * 32 + 16], y[g * 32 + 16 : g * 32 + 32]]) for g in range(3)])
    got = torch.cat(
        [torch.cat([seen[0][0][g * 16 : g * 16 + 16], seen[1][0][g * 16 : g * 16 + 16]]) for g in range(3)]
    )
    assert torch.equal(got, want)  # the first 3 global batches of 32, split 16 / 16
    assert seen[0][1] + seen[1][1] == len(s.data.val)  # every validation example on exactly one rank


def test_bad_devices_value_names_the_key(compose, tmp_path):
    from dgtrain.train import fit

    with pytest.raises(DgtrainError, match=r"trainer.devices='two'"):
        fit(compose(["model=linreg", "trainer.devices=two"]), tmp_path)
    with pytest.raises(DgtrainError, match="precision=bf16"):
        fit(compose(["model=linreg", "trainer.strategy=fsdp", "precision=fp16"]), tmp_path)


def test_a_failed_workers_own_error_reaches_the_launcher(compose, tmp_path, monkeypatch):
    # `dgtrain -m ... trainer.devices=2`: a trial whose workers failed (the loss became inf) recorded only
    # "a worker failed (exit code 3); see the log above" as its error; the failed run's summary.json
    # now names the error, and the launcher repeats it
    from dgtrain import distributed
    from dgtrain.train import fit

    run = tmp_path / "run"
    with pytest.raises(DgtrainError, match="became inf"):
        fit(compose(["model=linreg", "optimizer.lr=1e30", "trainer.max_steps=4"]), run)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith("NonFiniteLossError: train/loss became inf at step 2")
    monkeypatch.setattr(distributed, "launch", lambda nproc, argv, run_dir: 3)
    with pytest.raises(
        DgtrainError, match=r"a worker failed \(exit code 3\): NonFiniteLossError: train/loss"
    ):
        distributed._launched(2, [], run)


def test_a_signal_after_the_workers_completed_is_no_worker_failure(compose, tmp_path, monkeypatch):
    # SIGINT to `dgtrain trainer.devices=2` while its workers were exiting after a completed run: the
    # launcher said "a worker failed (exit code 130); see the log above" about a completed run
    from dgtrain import distributed
    from dgtrain.train import fit

    run = tmp_path / "run"
    fit(compose(["model=linreg", "trainer.max_steps=2"]), run)
    monkeypatch.setattr(distributed, "launch", lambda nproc, argv, run_dir: 130)
    result = distributed._launched(2, [], run)
    assert result.summary["status"] == "completed" and result.exit_code == 130


def test_a_config_error_with_trainer_devices_is_reported_once_before_any_worker_starts(tmp_path):
    r = run_cli(["model=linreg", *TWO, "optimizer.lr=-1", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert r.returncode == 2
    out = r.stdout + r.stderr
    assert out.count("optimizer.lr=-1: must be a finite, non-negative number") == 1  # was once per worker
    assert "starting 2 workers" not in out and "worker exit codes" not in out
    assert not (tmp_path / "run").exists()


def test_a_hydra_multirun_inside_torchrun_is_refused(compose, tmp_path, monkeypatch):
    """torchrun ... -m dgtrain -m ...: every rank would run its own sweep; say how to sweep instead."""
    from types import SimpleNamespace

    from hydra.types import RunMode

    from dgtrain.distributed import run

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("DGTRAIN_SUBMITIT_TASKS", raising=False)
    hc = SimpleNamespace(mode=RunMode.MULTIRUN)
    with pytest.raises(DgtrainError, match=r"multirun \(-m\) inside torchrun.*trainer.devices=N"):
        run(compose(["model=linreg"]), tmp_path, hc)


# -------------------------------------------------------------------------------------- equivalence


@pytest.mark.slow
def test_ddp_2x32_equals_1x64_linreg_and_only_rank0_writes(compose, tmp_path):
    """Same train/loss series and final weights; one metrics.jsonl row per log step, one W&B run, one
    TensorBoard run, even though two processes trained."""
    common = ["model=linreg", "trainer.max_steps=12", "trainer.log_every=3", "seed=1"]
    ref = single(compose, tmp_path / "one", [*common, "data.batch_size=64"])
    run = tmp_path / "two"
    p = run_cli([*common, *TWO, "data.batch_size=32", "logger=all", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "train/loss" in r] == [3, 6, 9, 12]  # rank 1 wrote nothing
    a, b = losses(ref.history), losses(rows)
    assert [s for s, _ in a] == [s for s, _ in b]
    torch.testing.assert_close([v for _, v in b], [v for _, v in a], rtol=1e-5, atol=0)
    # validation: each rank scores its half of the split; the summed sums give one process's metrics
    val = [(r["step"], r["val/mse"], r["val/r2"]) for r in rows if "val/mse" in r]
    want_val = [(r["step"], r["val/mse"], r["val/r2"]) for r in ref.history if "val/mse" in r]
    assert val and [v[0] for v in val] == [v[0] for v in want_val]
    torch.testing.assert_close([v[1:] for v in val], [v[1:] for v in want_val], rtol=1e-5, atol=1e-7)
    got, want = weights(run / "model.safetensors"), ref.model.state_dict()
    for k, v in want.items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-7)
    assert len(list((run / "wandb").glob("offline-run-*"))) == 1
    assert len(list((run / "tensorboard").rglob("events.out.tfevents.*"))) == 1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "strategy": "ddp", "backend": "gloo"}
    assert "mem/rss_mb_rank0" in rows[-1]  # memory: max over ranks, plus rank 0's own


@pytest.mark.slow
def test_ddp_2x32_equals_1x64_convnet_with_accumulation(compose, tmp_path):
    """Gradient accumulation under DDP (no_sync on the micro-batch before the last) changes nothing."""
    common = ["model=convnet", "trainer.max_steps=6", "trainer.log_every=2", "trainer.grad_accum_steps=2"]
    common += ["metrics=[confusion,top3]"]
    ref = single(compose, tmp_path / "one", [*common, "data.batch_size=64"])
    run = tmp_path / "two"
    p = run_cli([*common, *TWO, "data.batch_size=32", f"hydra.run.dir={run}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = read_metrics(run)
    a, b = losses(ref.history), losses(rows)
    torch.testing.assert_close([v for _, v in b], [v for _, v in a], rtol=1e-5, atol=0)
    # validation is sharded: every example scored once (the confusion matrix counts the split once)
    keys = ("val/loss", "val/acc", "val/acc_top3")
    val, want = ([[r[k] for k in keys] for r in h if "val/acc" in r] for h in (rows, ref.history))
    assert val and len(val) == len(want)
    torch.testing.assert_close(val, want, rtol=1e-5, atol=1e-7)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["confusion_matrix"] == ref.summary["confusion_matrix"]
    assert sum(map(sum, summary["confusion_matrix"])) == len(ref.setup.data.val)
    got = weights(run / "model.safetensors")
    for k, v in ref.model.state_dict().items():
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_resume_with_dropout_is_exact_on_every_rank(tmp_path):
    """Each rank draws its own dropout masks, and with batches of different widths (seq2seq) the ranks'
    random streams drift apart: a checkpoint keeps every rank's RNG state, so a resumed 2-process run
    ends with the weights of the uninterrupted one."""
    common = [
        *TWO,
        "model=transformer",
        "model.d_model=16",
        "model.n_heads=2",
        "model.n_layers=1",
        "model.dropout=0.3",
        "data.num_examples=600",
        "data.batch_size=8",
        "trainer.max_steps=8",
        "trainer.log_every=2",
        "trainer.eval_batches=1",
        "checkpoint.every=4",
    ]
    whole, part = tmp_path / "whole", tmp_path / "part"
    p = run_cli([*common, f"hydra.run.dir={whole}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    ckpt = whole / "checkpoints" / "step_00000004.pt"
    p = run_cli([*common, f"resume={ckpt}", f"hydra.run.dir={part}"], tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    got, want = weights(part / "model.safetensors"), weights(whole / "model.safetensors")
    for k, v in want.items():
        assert torch.equal(got[k], v), k


# FSDP reduce-scatters gradients in shards, a different summation order than DDP's all-reduce: the series
# agrees with one process to float32 rounding, accumulated over a few Adam steps.
FSDP_RTOL = 1e-4


@pytest.mark.slow
def test_fsdp_matches_one_process_resumes_on_one_and_eval_reads_it(compose, tmp_path):
    from dgtrain.evaluate import evaluate_source

    common = ["model=mlp", "trainer.log_every=2", "trainer.max_steps=8", "checkpoint.keep_last=null"]
    run = tmp_path / "fsdp"
    p = run_cli(
        [*common, *TWO, "trainer.strategy=fsdp", "data.batch_size=32", "checkpoint.every=4"]
        + [f"hydra.run.dir={run}"],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    fsdp = losses(read_metrics(run))
    ref = single(compose, tmp_path / "one", [*common, "data.batch_size=64"])
    torch.testing.assert_close(
        [v for _, v in fsdp], [v for _, v in losses(ref.history)], rtol=FSDP_RTOL, atol=0
    )

    ckpt = run / "checkpoints" / "step_00000004.dcp"
    assert (ckpt / ".metadata").is_file() and (run / "checkpoints" / "step_00000008.dcp").is_dir()
    assert not list((run / "checkpoints").glob(".*.tmp"))
    # 2 processes -> 1: the same global batch (1 x 64) continues at the exact data position
    resumed = single(compose, tmp_path / "resumed", [*common, "data.batch_size=64", f"resume={ckpt}"])
    assert losses(resumed.history) == [(s, v) for s, v in losses(resumed.history) if s > 4]
    torch.testing.assert_close(
        [v for _, v in losses(resumed.history)], [v for s, v in fsdp if s > 4], rtol=1e-5, atol=0
    )
    # dgtrain eval reads the sharded checkpoint and the gathered safetensors export, on one process
    last = read_metrics(run)[-1]["val/loss"]
    by_dir = evaluate_source(run / "checkpoints" / "step_00000008.dcp", device="cpu")
    by_weights = evaluate_source(run, device="cpu")  # model.safetensors, gathered by rank 0
    assert by_dir["metrics"]["val/loss"] == pytest.approx(last, rel=1e-5)
    assert by_weights["metrics"]["val/loss"] == pytest.approx(last, rel=1e-5)


# ------------------------------------------------------------------------------------------- faults


def _start_long_run(
    tmp_path: Path, extra: list[str], env: dict | None = None
) -> tuple[subprocess.Popen, Path]:
    run = tmp_path / "run"
    args = [
        "model=linreg",
        *TWO,
        "trainer.max_steps=1000000",
        "trainer.log_every=50",
        "trainer.eval_every=1000000",
    ]
    p = subprocess.Popen(
        [sys.executable, "-m", "dgtrain", *args, "checkpoint.every=100", *extra, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=env or cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.time() + 120
    while not list((run / "checkpoints").glob("step_*.pt")):
        assert p.poll() is None and time.time() < deadline, p.communicate()[0][-3000:] if p.poll() else "slow"
        time.sleep(0.2)
    return p, run


def _workers(launcher: int) -> dict[int, int]:
    """rank -> pid of the launcher's worker processes (their RANK environment variable)."""
    out = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (d / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        rank = [e for e in env if e.startswith(b"RANK=")]
        if ppid == launcher and rank:
            out[int(rank[0][5:])] = int(d.name)
    return out


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_a_killed_rank_ends_every_rank_and_the_checkpoint_loads(tmp_path):
    from dgtrain import checkpoint as ckpt_io

    p, run = _start_long_run(tmp_path, [])
    workers = _workers(p.pid)
    assert sorted(workers) == [0, 1]
    os.kill(workers[1], signal.SIGKILL)
    t0 = time.time()
    out, _ = p.communicate(timeout=60)  # the bound: torchrun's agent notices, stops the others
    assert p.returncode != 0, out[-2000:]
    assert not _alive(workers[0])
    assert time.time() - t0 < 60
    newest = ckpt_io.list_checkpoints(run / "checkpoints")[-1]
    assert ckpt_io.load(newest)["step"] % 100 == 0


@pytest.mark.slow
def test_sigterm_to_the_launcher_exits_143_with_a_resumable_checkpoint(tmp_path):
    from dgtrain import checkpoint as ckpt_io

    p, run = _start_long_run(tmp_path, [])
    os.kill(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 143, out[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped"
    newest = ckpt_io.list_checkpoints(run / "checkpoints")[-1]
    state = ckpt_io.load(newest)
    assert state["step"] == summary["steps"]  # both ranks stopped after the same step, saved once
    assert read_metrics(run)[-1]["step"] == summary["steps"]


@pytest.mark.slow
def test_the_two_process_recipe_passes_its_smoke_contract(tmp_path):
    report = tmp_path / "smoke.json"
    p = run_cli(
        ["smoke", "mlp_digits_ddp2", "device=cpu", "--out", str(tmp_path / "s"), "--json", str(report)],
        tmp_path,
    )
    outcome = json.loads(report.read_text())[0]
    assert outcome["status"] == "passed", p.stdout[-3000:]
    summary = json.loads(next((tmp_path / "s").rglob("summary.json")).read_text())
    assert summary["distributed"]["world_size"] == 2


@pytest.mark.slow
def test_submitit_multirun_of_two_two_process_jobs(tmp_path):
    """hydra/launcher=dgtrain_local: each job is two submitit tasks, each task one rank (as on SLURM)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs dgtrain[slurm]")
    sweep = tmp_path / "sweep"
    args = ["-m", "hydra/launcher=dgtrain_local", "device=cpu", "model=linreg", "trainer.max_steps=6"]
    p = run_cli([*args, "trainer.log_every=3", "seed=1,2", f"hydra.sweep.dir={sweep}"], tmp_path)
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    for job in ("0", "1"):
        summary = json.loads((sweep / job / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["distributed"]["world_size"] == 2
        assert [r["step"] for r in read_metrics(sweep / job)] == [3, 6]  # one row set: rank 0's
    trials = json.loads((sweep / "sweep_summary.json").read_text())["trials"]
    assert sorted(t["status"] for t in trials) == ["completed", "completed"]


@pytest.mark.slow
def test_sigusr1_to_one_rank_stops_every_rank_after_the_same_step(tmp_path):
    """SLURM's preemption notice reaches one rank: the ranks agree at a step boundary, stop after the same
    step, write one checkpoint, and rank 0 alone requeues the job."""
    from dgtrain import checkpoint as ckpt_io

    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {calls}\n')
    (bin_dir / "scontrol").chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    p, run = _start_long_run(tmp_path, [], env=cli_env(SLURM_JOB_ID="4242", PATH=path))
    os.kill(_workers(p.pid)[1], signal.SIGUSR1)
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 138, out[-3000:]
    assert calls.read_text().split() == ["requeue", "4242"]  # once: rank 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "stopped"
    assert ckpt_io.load(ckpt_io.list_checkpoints(run / "checkpoints")[-1])["step"] == summary["steps"]


@pytest.mark.slow
def test_torchrun_ranks_share_rank0s_run_dir(tmp_path):
    """`torchrun -m dgtrain`: each rank's Hydra picks its own ${now:...} run dir; all use rank 0's."""
    p = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "dgtrain"]
        + ["model=linreg", "device=cpu", "trainer.max_steps=4", "trainer.log_every=2", "data.batch_size=32"],
        cwd=tmp_path,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    runs = [d for d in (tmp_path / "outputs").glob("*/*") if d.is_dir()]
    assert len(runs) == 1, runs
    assert [r["step"] for r in read_metrics(runs[0])] == [2, 4]
