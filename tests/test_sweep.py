"""Sweeps: the objective, failed trials, the results table/CSV/JSON, resume, Optuna studies, W&B configs."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from dgtrain.commands.sweep_summary import main as summary_main
from dgtrain.errors import DgtrainError
from dgtrain.sweep import collect, objective_from_history
from dgtrain.wandb_sweep import parameter_spec, wandb_sweep_config
from tests.conftest import run_cli

# Four short linear-regression jobs: two learning rates x two seeds.
GRID = ["model=linreg", "optimizer.lr=0.01,0.1", "seed=0,1", "trainer.max_steps=10", "trainer.log_every=5"]


def _summary(job_dir: Path) -> dict:
    return json.loads((job_dir / "summary.json").read_text())


def _csv_rows(sweep_dir: Path) -> list[dict]:
    with (sweep_dir / "sweep_summary.csv").open() as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ units


def test_objective_is_the_best_value_in_the_direction():
    history = [{"step": 5, "val/mse": 0.5}, {"step": 10, "val/mse": 0.2}, {"step": 15, "val/mse": 0.3}]
    assert objective_from_history(history, "val/mse", "minimize") == 0.2
    assert objective_from_history(history, "val/mse", "maximize") == 0.5
    history.append({"step": 20, "val/mse": float("nan")})
    assert objective_from_history(history, "val/mse", "minimize") == 0.2


def test_objective_of_a_metric_never_logged_names_the_logged_ones():
    with pytest.raises(DgtrainError, match=r"sweep.metric='val/acc'.*val/mse"):
        objective_from_history([{"step": 5, "val/mse": 0.5}], "val/acc", "maximize")


def _job(sweep_dir: Path, name: str, overrides: list[str], summary: dict | None) -> None:
    d = sweep_dir / name
    (d / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), d / ".hydra" / "overrides.yaml")
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))


def test_collect_ranks_completed_trials_and_lists_interrupted_and_missing_jobs(tmp_path):
    """An interrupted grid: ranked completed jobs, a failed one, one without summary, one never started."""
    grid = tmp_path / "sweep"
    grid.mkdir()
    OmegaConf.save(
        OmegaConf.create(
            {
                "hydra": {
                    "sweeper": {"_target_": "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"},
                    "overrides": {"task": ["optimizer.lr=0.1,0.2,0.3,0.4,0.5"]},
                },
                "sweep": {"metric": None, "direction": None},
            }
        ),
        grid / "multirun.yaml",
    )

    def done(value):
        return {
            "status": "completed",
            "wall_s": 1.0,
            "sweep": {"metric": "val/acc", "direction": "maximize", "objective": value},
        }

    _job(grid, "0", ["optimizer.lr=0.1"], done(0.7))
    _job(grid, "1", ["optimizer.lr=0.2"], done(0.9))
    _job(grid, "2", ["optimizer.lr=0.3"], {"status": "failed", "error": "NonFiniteLossError: boom"})
    _job(grid, "3", ["optimizer.lr=0.4"], None)  # killed: no summary
    result = collect(grid)
    status = [(r["job"], r["status"], r["rank"]) for r in result["trials"]]
    assert status == [
        ("1", "completed", 1),
        ("0", "completed", 2),
        ("2", "failed", None),
        ("3", "incomplete", None),
        (None, "missing", None),
    ]
    assert result["trials"][-1]["overrides"] == ["optimizer.lr=0.5"]
    assert result["best"]["params"] == {"optimizer.lr": "0.2"}
    assert result["trials"][2]["error"] == "NonFiniteLossError: boom"
    assert result["direction"] == "maximize" and result["swept"] == ["optimizer.lr"]


def test_sweep_summary_of_a_directory_that_is_no_sweep_fails_clearly(tmp_path):
    r = run_cli(["sweep-summary", str(tmp_path)], cwd=tmp_path)
    assert r.returncode == 2
    assert "holds no sweep jobs" in r.stderr


# ------------------------------------------------------------------------------------------- W&B


def test_wandb_parameters_from_hydra_sweep_expressions():
    assert parameter_spec("optimizer.lr", "tag(log, interval(1e-4, 1e-1))") == {
        "distribution": "log_uniform_values",
        "min": 1e-4,
        "max": 0.1,
    }
    assert parameter_spec("x", "interval(0.0, 0.5)") == {"distribution": "uniform", "min": 0.0, "max": 0.5}
    assert parameter_spec("n", "int(interval(1, 8))") == {"distribution": "int_uniform", "min": 1, "max": 8}
    assert parameter_spec("n", "tag(log, int(interval(8, 256)))")["distribution"] == "q_log_uniform_values"
    assert parameter_spec("model", "choice(mlp, convnet)") == {"values": ["mlp", "convnet"]}
    assert parameter_spec("data.batch_size", "range(16, 64, 16)") == {"values": [16, 32, 48]}
    assert parameter_spec("seed", "3") == {"value": 3}


def test_wandb_sweep_yaml_drives_hydra_groups_and_values(tmp_path, compose):
    out = tmp_path / "wandb.yaml"
    r = run_cli(
        ["wandb-sweep", "digits_optuna", "-o", str(out), "--logger", "console", "trainer.max_steps=7"],
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.startswith("# W&B sweep written by `dgtrain wandb-sweep digits_optuna`")
    import yaml

    sweep = yaml.safe_load(text)
    assert sweep["method"] == "bayes"
    assert sweep["metric"] == {"name": "best/val/acc", "goal": "maximize"}
    assert sweep["run_cap"] == 20
    assert sweep["parameters"]["model"] == {"values": ["mlp", "convnet"]}
    assert sweep["parameters"]["optimizer.lr"]["distribution"] == "log_uniform_values"
    cmd = sweep["command"]
    assert cmd[:4] == ["${env}", "${interpreter}", "-m", "dgtrain"] and cmd[-1] == "${args_no_hyphens}"
    # What the agent runs: the fixed part of the command plus `key=value` for each sampled parameter.
    fixed = cmd[4:-1]
    assert fixed == ["sweep=digits_optuna", "logger=console", "trainer.max_steps=7"]
    for model in ("mlp", "convnet"):
        sampled = {
            "model": model,
            "optimizer.lr": 0.003,
            "data.batch_size": 32,
            "optimizer.weight_decay": 1e-5,
        }
        cfg = compose(fixed + [f"{k}={v}" for k, v in sampled.items()])
        assert cfg.model._target_.endswith({"mlp": "MLP", "convnet": "ConvNet"}[model])
        assert cfg.optimizer.lr == 0.003 and cfg.data.batch_size == 32 and cfg.trainer.max_steps == 7
        assert cfg.sweep.metric == "val/acc"


def test_wandb_sweep_defaults_to_the_wandb_logger_and_refuses_grid_over_intervals(tmp_path):
    config = wandb_sweep_config("mlp_optuna")
    assert "logger=wandb" in config["command"]
    with pytest.raises(DgtrainError, match="--method grid needs discrete parameters"):
        wandb_sweep_config("mlp_optuna", method="grid")
    with pytest.raises(DgtrainError, match="Available presets: .*mlp_optuna"):
        wandb_sweep_config("nope")


def test_every_sweep_preset_composes(compose):
    from dgtrain.wandb_sweep import presets

    assert {"linreg_optuna", "mlp_optuna", "digits_optuna"} <= set(presets())
    for name in presets():
        cfg = compose([f"sweep={name}"])
        assert cfg.sweep.metric and cfg.sweep.direction is not None, name


# -------------------------------------------------------------------------------- end to end (CLI)


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """One finished 4-job grid sweep, shared by the tests below (copy it before changing it)."""
    tmp = tmp_path_factory.mktemp("grid")
    sweep_dir = tmp / "grid"
    r = run_cli(["-m", *GRID, f"hydra.sweep.dir={sweep_dir}"], cwd=tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return sweep_dir, r


@pytest.mark.slow
def test_grid_of_four_jobs_ranks_them_in_table_csv_and_json(grid, tmp_path):
    sweep_dir, r = grid
    objectives = {}
    for n in range(4):
        s = _summary(sweep_dir / str(n))
        assert s["status"] == "completed" and s["sweep"]["metric"] == "val/mse"
        assert s["sweep"]["objective"] == s["best"]["val/mse"]["value"]  # min of val/mse over the run
        objectives[str(n)] = s["sweep"]["objective"]
    rows = _csv_rows(sweep_dir)
    data = json.loads((sweep_dir / "sweep_summary.json").read_text())
    table = [line for line in r.stdout.splitlines() if "│" in line and "completed" in line]
    assert len(rows) == len(data["trials"]) == len(table) == 4
    best_job = min(objectives, key=objectives.get)
    assert rows[0]["job"] == data["best"]["job"] == best_job and rows[0]["rank"] == "1"
    assert math.isclose(float(rows[0]["objective"]), objectives[best_job], rel_tol=1e-9)
    assert [float(x["objective"]) for x in rows] == sorted(objectives.values())
    assert data["swept"] == ["optimizer.lr", "seed"] and data["direction"] == "minimize"
    assert (sweep_dir / "sweep_objective.png").stat().st_size > 1000
    # The subcommand rebuilds the same ranking from the job directories alone.
    for f in ("sweep_summary.csv", "sweep_summary.json", "sweep_objective.png"):
        (sweep_dir / f).unlink()
    r2 = run_cli(["sweep-summary", str(sweep_dir)], cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr
    assert _csv_rows(sweep_dir) == rows and (sweep_dir / "sweep_objective.png").exists()


@pytest.mark.slow
def test_failed_jobs_are_recorded_and_the_others_complete(tmp_path):
    sweep_dir = tmp_path / "bad"
    # lr=1e30 with SGD: the loss overflows (NonFiniteLossError); lr=-1: the optimizer refuses it.
    args = [
        "model=linreg",
        "optimizer=sgd",
        "optimizer.lr=0.05,1e30,-1",
        "trainer.max_steps=10",
        "trainer.log_every=5",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    r = run_cli(["-m", *args], cwd=tmp_path)
    assert r.returncode != 0
    assert _summary(sweep_dir / "0")["status"] == "completed"
    for n, error in [(1, "NonFiniteLossError: train/loss became"), (2, "DgtrainError: optimizer.lr=-1")]:
        s = _summary(sweep_dir / str(n))
        assert s["status"] == "failed" and s["error"].startswith(error), s
        assert s["sweep"]["objective"] is None and "Traceback" in s["traceback"]
    rows = {x["job"]: x for x in _csv_rows(sweep_dir)}
    assert rows["0"]["status"] == "completed" and rows["0"]["rank"] == "1"
    assert rows["1"]["status"] == "failed" and rows["1"]["error"].startswith("NonFiniteLossError")
    assert rows["2"]["status"] == "failed" and "optimizer.lr=-1" in rows["2"]["error"]
    assert "1 completed, 2 failed" in r.stdout


@pytest.mark.slow
def test_resumed_grid_runs_only_the_unfinished_jobs(grid, tmp_path):
    import shutil

    sweep_dir = tmp_path / "grid"
    shutil.copytree(grid[0], sweep_dir)
    args = ["-m", *GRID, f"hydra.sweep.dir={sweep_dir}"]
    # An interruption: job 2 never started, job 3 died before writing its summary.
    shutil.rmtree(sweep_dir / "2")
    (sweep_dir / "3" / "summary.json").unlink()
    kept = {n: (sweep_dir / n / "metrics.jsonl").stat().st_mtime_ns for n in ("0", "1")}
    assert summary_main([str(sweep_dir), "--no-plot"]) == 0  # the summary of the interrupted sweep
    assert [(x["job"], x["status"]) for x in _csv_rows(sweep_dir)][2:] == [
        ("3", "incomplete"),
        ("", "missing"),
    ]
    r = run_cli([*args, "sweep.resume=true"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    trained = [line for line in r.stdout.splitlines() if "] run dir " in line]
    skipped = [line for line in r.stdout.splitlines() if "sweep.resume:" in line]
    assert len(trained) == 2 and len(skipped) == 2
    assert all(f"{sweep_dir}/{n} " in "".join(trained) for n in ("2", "3"))
    assert {n: (sweep_dir / n / "metrics.jsonl").stat().st_mtime_ns for n in ("0", "1")} == kept
    assert [x["status"] for x in _csv_rows(sweep_dir)] == ["completed"] * 4


def test_a_rerun_job_with_resume_auto_continues_its_own_checkpoint(compose, tmp_path):
    # `dgtrain -m ... resume=auto` run again in the same sweep dir (a requeued SLURM job under submitit,
    # docs/distributed.md): the job moved its checkpoints to checkpoints.previous/ and started from step 0
    from types import SimpleNamespace

    from hydra.types import RunMode

    from dgtrain.sweep import run_trial

    job = tmp_path / "0"
    overrides = ["model=linreg", "checkpoint.every=2", "resume=auto"]
    hc = SimpleNamespace(
        runtime=SimpleNamespace(output_dir=str(job), choices={"model": "linreg"}),
        overrides=SimpleNamespace(task=overrides),
        mode=RunMode.MULTIRUN,
        job=SimpleNamespace(config_name="train"),
    )
    run_trial(compose([*overrides, "trainer.max_steps=4"]), hc)
    first = (job / "metrics.jsonl").read_text()
    run_trial(compose([*overrides, "trainer.max_steps=6"]), hc)
    assert _summary(job)["steps"] == 6
    assert (job / "metrics.jsonl").read_text().startswith(first)
    assert not (job / "checkpoints.previous").exists() and not (job / "metrics.previous.jsonl").exists()
    assert "step_00000006.pt" in [p.name for p in (job / "checkpoints").iterdir()]


@pytest.mark.slow
def test_optuna_study_continues_after_an_interruption(tmp_path):
    import optuna

    sweep_dir = tmp_path / "study"
    storage = f"sqlite:///{sweep_dir}/optuna.db"
    args = [
        "-m",
        "sweep=linreg_optuna",
        "trainer.max_steps=10",
        "trainer.log_every=5",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    r = run_cli([*args, "hydra.sweeper.n_trials=2"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="linreg_optuna", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    first = [t.params for t in study.trials]
    study.ask()  # a trial a killed sweep left "running"

    r = run_cli([*args, "hydra.sweeper.n_trials=4"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "Continuing study 'linreg_optuna': 2 of 4 trials done, 1 interrupted (now failed), 2 to go"
        in r.stdout
    )
    study = optuna.load_study(study_name="linreg_optuna", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert [t.params for t in study.trials[:2]] == first  # the stored trials, not a new study
    for trial in study.trials[3:]:  # the seeded sampler moved on: no stored trial proposed again
        assert trial.params not in first
    # New trials get new job dirs (3, 4), each holding the objective Optuna recorded.
    for trial in study.trials[3:]:
        s = _summary(sweep_dir / str(trial.number))
        assert s["status"] == "completed" and math.isclose(s["sweep"]["objective"], trial.value)
    data = json.loads((sweep_dir / "sweep_summary.json").read_text())
    assert data["counts"] == {"completed": 4}
    assert math.isclose(data["best"]["objective"], study.best_value)


@pytest.mark.slow
def test_optuna_records_failed_trials_and_samples_on(tmp_path):
    import optuna

    sweep_dir = tmp_path / "study"
    # A search space with an invalid learning rate: those trials fail, the study goes on.
    args = [
        "-m",
        "sweep=linreg_optuna",
        "hydra.sweeper.n_trials=4",
        "optimizer.lr=choice(0.05,-1)",
        "trainer.max_steps=10",
        "trainer.log_every=5",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    study = optuna.load_study(study_name="linreg_optuna", storage=f"sqlite:///{sweep_dir}/optuna.db")
    states = {t.number: (t.state.name, t.params["optimizer.lr"]) for t in study.trials}
    assert len(states) == 4
    assert {s for s, lr in states.values() if lr == -1} == {"FAIL"}
    assert {s for s, lr in states.values() if lr == 0.05} == {"COMPLETE"}
    rows = {x["job"]: x for x in _csv_rows(sweep_dir)}
    for n, (state, _) in states.items():
        if state == "FAIL":
            assert rows[str(n)]["status"] == "failed" and "optimizer.lr=-1" in rows[str(n)]["error"]
        else:
            assert rows[str(n)]["status"] == "completed"


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_out_of_memory_fails_one_trial_and_the_next_one_trains(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    sweep_dir = tmp_path / "oom"
    # The first conv's output alone takes 4096 channels x 256 x 256 x 4 bytes = 1 GiB per example, so a
    # batch sized from the free memory (plus a margin) cannot fit on any GPU, however big, and fails
    # before any compute; a batch of 2 needs about 4 GB. conv2 has one channel, so the classifier stays
    # small and the good trial is quick. The OOM job runs first, in the same process.
    free, _ = torch.cuda.mem_get_info()
    too_big = max(64, free // 2**30 + 16)
    args = [
        "-m",
        "model=convnet",
        "data=synthetic_images",
        f"data.num_examples={2 * too_big}",
        "data.image_size=256",
        "model.channels=[4096,1]",
        f"data.batch_size={too_big},2",
        "device=cuda",
        "trainer.max_steps=2",
        "trainer.eval_batches=1",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    r = run_cli(args, cwd=tmp_path)
    assert r.returncode != 0
    oom = _summary(sweep_dir / "0")
    assert oom["status"] == "failed" and "OutOfMemoryError" in oom["error"], oom.get("error")
    assert _summary(sweep_dir / "1")["status"] == "completed"
    rows = {x["job"]: x for x in _csv_rows(sweep_dir)}
    assert rows["1"]["rank"] == "1" and float(rows["1"]["peak_cuda_mb"]) > 0


def test_a_sweep_over_tasks_ranks_each_metric_on_its_own(tmp_path, capsys):
    """linreg (val/mse, lower is better) and convnet (val/acc, higher is better) in one grid: two rankings,
    never one scale; the plot's y axes name each metric; overrides print as typed (no rich markup)."""
    grid = tmp_path / "sweep"
    grid.mkdir()

    def done(metric, direction, value):
        return {
            "status": "completed",
            "wall_s": 1.0,
            "sweep": {"metric": metric, "direction": direction, "objective": value},
        }

    _job(grid, "0", ["model=linreg", "optimizer.lr=0.001"], done("val/mse", "minimize", 3.7e11))
    _job(grid, "1", ["model=linreg", "optimizer.lr=0.01"], done("val/mse", "minimize", 0.02))
    _job(
        grid,
        "2",
        ["model=convnet", "optimizer.lr=0.001", "logger=[console,wandb]"],
        done("val/acc", "maximize", 0.9),
    )
    _job(
        grid,
        "3",
        ["model=convnet", "optimizer.lr=0.01", "logger=[console,wandb]"],
        done("val/acc", "maximize", 0.97),
    )
    result = collect(grid)
    assert result["mixed"] and result["metric"] is None and result["best"] is None
    assert [(g["metric"], g["best"]["job"]) for g in result["groups"]] == [("val/mse", "1"), ("val/acc", "3")]
    assert [(r["job"], r["rank"]) for r in result["trials"]] == [("1", 1), ("0", 2), ("3", 1), ("2", 2)]

    summary_main([str(grid)])
    out = capsys.readouterr().out
    assert "trials monitor different metrics" in out and "val/mse (min)" in out and "val/acc (max)" in out
    assert "logger=[console,wandb]" in out
    rows = _csv_rows(grid)
    assert [(x["job"], x["metric"], x["rank"]) for x in rows][:3] == [
        ("1", "val/mse", "1"),
        ("0", "val/mse", "2"),
        ("3", "val/acc", "1"),
    ]
    pytest.importorskip("matplotlib")
    import matplotlib.image

    assert matplotlib.image.imread(grid / "sweep_objective.png").shape[0] > 500  # one row per metric


def test_plot_axis_names_the_metric_of_a_single_metric_sweep(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    grid = tmp_path / "sweep"
    grid.mkdir()
    for i, (lr, v) in enumerate([("0.1", 0.5), ("0.01", 0.7)]):
        _job(
            grid,
            str(i),
            [f"optimizer.lr={lr}"],
            {"status": "completed", "sweep": {"metric": "val/acc", "direction": "maximize", "objective": v}},
        )
    labels = []
    real = matplotlib.axes.Axes.set_ylabel
    monkeypatch.setattr(
        matplotlib.axes.Axes, "set_ylabel", lambda ax, t, *a, **k: (labels.append(t), real(ax, t, *a, **k))
    )
    result = summary_main([str(grid)])
    assert result == 0 and labels == ["val/acc (max)"]
    assert collect(grid)["best"]["params"] == {"optimizer.lr": "0.01"}
