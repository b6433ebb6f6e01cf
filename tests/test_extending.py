"""docs/extending.md's example project (examples/my_project), copied outside the repository and run
through the real CLI: its own configs via --config-dir, its own package via allowed_targets."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, cli_env, read_metrics, run_cli

pytestmark = pytest.mark.slow


@pytest.fixture
def project(tmp_path: Path) -> Path:
    dest = tmp_path / "my_project"
    shutil.copytree(REPO / "examples" / "my_project", dest)
    return dest


def _env(project: Path) -> dict[str, str]:
    env = cli_env()
    env["PYTHONPATH"] = f"{env['PYTHONPATH']}:{project}"
    return env


def test_example_project_trains_resumes_and_sweeps(project: Path, tmp_path: Path):
    env = _env(project)
    base = ["--config-dir", "configs", "model=my_classifier", "device=cpu", "trainer.log_every=5"]
    run = tmp_path / "run"
    p = run_cli(
        [*base, "trainer.max_steps=10", "checkpoint.every=5", f"hydra.run.dir={run}"], project, env=env
    )
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["monitor"]["metric"] == "val/acc"
    assert summary["parameters"] == 16 * 32 + 32 + 32 * 4 + 4  # Backbone(16->32) + head sized from the data

    # resume the same run to 20 steps: it continues from step 10, the log has each step once
    p = run_cli([*base, "trainer.max_steps=20", "resume=auto", f"hydra.run.dir={run}"], project, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resuming from" in p.stderr + p.stdout
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert steps == [5, 10, 15, 20]
    assert json.loads((run / "summary.json").read_text())["steps"] == 20

    # a 2-job sweep over both models: the plain nn.Module (sizes from the config) and the nested one
    sweep = tmp_path / "sweep"
    p = run_cli(
        [
            "--config-dir",
            "configs",
            "-m",
            "model=my_mlp,my_classifier",
            "device=cpu",
            "trainer.max_steps=10",
            f"hydra.sweep.dir={sweep}",
        ],
        project,
        env=env,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    for job, cls in (("0", "MLP"), ("1", "Classifier")):
        s = json.loads((sweep / job / "summary.json").read_text())
        assert s["status"] == "completed", s
        assert f"_target_: my_project.models.{cls}\n" in (sweep / job / "config.yaml").read_text()


def test_example_without_allowed_targets_is_refused(project: Path, tmp_path: Path):
    p = run_cli(
        ["--config-dir", "configs", "model=my_mlp", "allowed_targets=[]", f"hydra.run.dir={tmp_path / 'r'}"],
        project,
        env=_env(project),
    )
    assert p.returncode == 2
    assert "model._target_='my_project.models.MLP' is not allowed" in p.stderr + p.stdout


def test_example_callback_stops_the_run(project: Path, tmp_path: Path):
    run = tmp_path / "cb"
    p = run_cli(
        [
            "--config-dir",
            "configs",
            "model=my_mlp",
            "device=cpu",
            "callbacks=[stop_at_accuracy]",
            "trainer.max_steps=300",
            "trainer.eval_every=5",
            f"hydra.run.dir={run}",
        ],
        project,
        env=_env(project),
    )
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "early_stopped" and summary["steps"] < 300
    assert summary["final"]["val/acc"] >= 0.9
