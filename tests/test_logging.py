"""Experiment logging: W&B read back with W&B's own reader (`wandb leet inspect`), TensorBoard read back
with EventAccumulator, SIGTERM durability in every sink, the end-of-run plots and `dgtrain plot`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dgtrain.errors import DgtrainError
from tests.conftest import cli_env, read_metrics, run_cli

TINY = ["model=linreg", "trainer.log_every=5"]


# ------------------------------------------------------------------------------------ read-back helpers


def wandb_records(run_dir: Path) -> list[dict]:
    """Every record of the run's .wandb log, as printed by W&B's own reader."""
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(files[0])],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def wandb_history(records: list[dict]) -> dict[int, dict]:
    return {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}


def tb_scalars(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0}).Reload()


def png_pixels(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("L"), dtype=float)


def coloured_pixels(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB"), dtype=int)
    return int(((rgb.max(-1) - rgb.min(-1)) > 60).sum())


# ------------------------------------------------------------------------------------------ unit tests


def test_mode_follows_config_then_env_then_credentials(monkeypatch, tmp_path):
    from dgtrain.loggers.wandb import has_credentials, resolve_mode

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not has_credentials() and resolve_mode(None) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert has_credentials() and resolve_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_mode(None) == "offline"
    assert resolve_mode("disabled") == "disabled"  # the config wins over the environment
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(DgtrainError, match=r"\$WANDB_MODE"):
        resolve_mode(None)


def test_missing_wandb_gives_install_hint(monkeypatch, tmp_path):
    from dgtrain.loggers.wandb import WandbLogger

    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.raises(DgtrainError, match=r"pip install 'dgtrain\[wandb\]'"):
        WandbLogger(tmp_path)


def test_missing_matplotlib_skips_plots_with_one_warning(monkeypatch, tmp_path, caplog):
    from dgtrain.loggers.plots import PlotLogger

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    PlotLogger(tmp_path).close({}, "completed")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "dgtrain[plots]" in warnings[0].getMessage()
    assert not (tmp_path / "plots").exists()


@pytest.mark.parametrize(
    "choice, sinks",
    [
        ("wandb", {"wandb"}),
        ("tensorboard", {"tensorboard"}),
        ("[console,wandb]", {"console", "wandb"}),
        ("[console,tensorboard,wandb]", {"console", "tensorboard", "wandb"}),
        ("all", {"console", "tensorboard", "wandb"}),
    ],
)
def test_logger_choices_compose(compose, choice, sinks):
    cfg = compose([f"logger={choice}"])
    assert set(cfg.logger) == sinks
    for name in sinks:
        assert cfg.logger[name]._target_.startswith("dgtrain.loggers.")


def test_sinks_with_files_get_the_run_dir(compose, tmp_path):
    from dgtrain.loggers.console import ConsoleLogger
    from dgtrain.loggers.plots import PlotLogger
    from dgtrain.loggers.tensorboard import TensorBoardLogger
    from dgtrain.train import build_loggers

    sinks = build_loggers(compose(["logger=[console,tensorboard]"]), tmp_path)
    tb = next(s for s in sinks if isinstance(s, TensorBoardLogger))
    assert tb.log_dir == tmp_path / "tensorboard"
    assert sum(isinstance(s, ConsoleLogger) for s in sinks) == 1
    assert isinstance(sinks[-1], PlotLogger)
    for s in sinks:
        s.close({}, "completed")


@pytest.mark.slow
def test_tensorboard_keeps_logged_steps_through_sigkill(tmp_path):
    """Each log step is flushed: a process killed with SIGKILL right after logging loses nothing."""
    code = (
        "import os, signal, sys\n"
        "from dgtrain.loggers.tensorboard import TensorBoardLogger\n"
        "tb = TensorBoardLogger(sys.argv[1])\n"
        "for step in (1, 2, 3):\n"
        "    tb.log_metrics({'train/loss': 1.0 / step, 'epoch': 0}, step)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=cli_env(), timeout=120)
    assert res.returncode == -signal.SIGKILL
    assert [e.step for e in tb_scalars(tmp_path).Scalars("train/loss")] == [1, 2, 3]


def test_wandb_finishes_an_early_stopped_run_as_a_success():
    """An early-stopped run finished its training: W&B gets exit code 0, as TensorBoard's HParams a
    success and MLflow FINISHED; it was shown as failed (exit code 1)."""
    from dgtrain.loggers.wandb import WandbLogger

    finished = []

    class FakeRun:
        summary: dict = {}

        def finish(self, exit_code):
            finished.append(exit_code)

    for status in ("completed", "early_stopped", "stopped", "failed"):
        sink = object.__new__(WandbLogger)
        sink.run, sink.mode = FakeRun(), "online"
        sink.close({"final": {}, "best": {}}, status)
    assert finished == [0, 0, 1, 1]


@pytest.mark.parametrize(
    "status, expected",
    [("completed", "STATUS_SUCCESS"), ("early_stopped", "STATUS_SUCCESS"), ("stopped", "STATUS_FAILURE")],
)
def test_tensorboard_hparams_session_status(tmp_path, status, expected):
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    from dgtrain.loggers.tensorboard import TensorBoardLogger

    tb = TensorBoardLogger(tmp_path)
    tb.log_config({"optimizer": {"lr": 0.1, "betas": [0.9, 0.99]}, "seed": 0, "trainer": {"max_steps": None}})
    tb.log_metrics({"train/loss": 0.5}, 1)
    tb.close({"final": {"train/loss": 0.5, "val/acc": float("nan")}}, status)
    content = tb_scalars(tmp_path).PluginTagToContent("hparams")
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == api_pb2.Status.Value(expected)
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hp = start.session_start_info.hparams
    assert hp["optimizer.lr"].number_value == 0.1 and hp["optimizer.betas"].string_value == "[0.9, 0.99]"
    assert hp["trainer.max_steps"].string_value == "None"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"train/loss"}  # NaN finals are left out


# ---------------------------------------------------------------------------------- end-to-end runs


@pytest.fixture(scope="module")
def all_run(tmp_path_factory) -> Path:
    """One tiny run with every sink (W&B offline, TensorBoard, console, jsonl, plots)."""
    tmp = tmp_path_factory.mktemp("all")
    run_dir = tmp / "run"
    out = run_cli(
        [*TINY, "trainer.max_steps=20", "logger=all", "optimizer.lr=0.03", f"hydra.run.dir={run_dir}"],
        cwd=tmp,
        env=cli_env(WANDB_MODE="offline", WANDB_DIR=""),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    run_dir.joinpath("stderr.txt").write_text(out.stdout + out.stderr)
    return run_dir


@pytest.mark.slow
def test_wandb_offline_run_reads_back_with_wandb_tooling(all_run):
    rows = read_metrics(all_run)
    records = wandb_records(all_run)
    history = wandb_history(records)
    assert sorted(history) == [r["step"] for r in rows]  # every logged step, no more
    for row in rows:
        for k, v in row.items():
            if k != "step":
                assert history[row["step"]][k] == pytest.approx(v), (row["step"], k)
    run = next(r["run"] for r in records if r["type"] == "run")
    config = json.loads(json.dumps(run["config"]["update"]))
    assert config["optimizer"]["lr"] == 0.03 and config["trainer"]["max_steps"] == 20
    assert config["model"]["_target_"] == "dgtrain.models.linreg.LinearRegression"
    assert run["project"] == "dgtrain" and run["display_name"] == "run"
    assert (all_run / "wandb_run_id.txt").read_text().strip() == run["run_id"]
    from dgtrain.loggers.wandb import read_run_id

    assert read_run_id(all_run) == run["run_id"] and read_run_id(all_run / "nowhere") is None
    summary = {}
    for r in records:
        if r["type"] == "summary":
            summary.update(r["summary"].get("update", {}))
    local = json.loads((all_run / "summary.json").read_text())
    assert summary["val/r2"] == pytest.approx(local["final"]["val/r2"])
    assert summary["best/val/r2"] == pytest.approx(local["best"]["val/r2"]["value"])
    assert summary["status"] == "completed" and summary["steps"] == 20
    assert next(r["exit"] for r in records if r["type"] == "exit").get("exit_code", 0) == 0
    sync_lines = [
        line for line in all_run.joinpath("stderr.txt").read_text().splitlines() if "wandb sync" in line
    ]
    assert len(sync_lines) == 1 and str(all_run / "wandb" / "offline-run-") in sync_lines[0]


@pytest.mark.slow
def test_tensorboard_holds_every_logged_step_and_hparams(all_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    rows = read_metrics(all_run)
    acc = tb_scalars(all_run)
    for key in ("train/loss", "train/lr", "val/r2", "mem/rss_mb", "perf/step_ms"):
        expected = [(r["step"], r[key]) for r in rows if key in r]
        got = [(e.step, e.value) for e in acc.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in expected], key
        assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-6), key
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["optimizer.lr"].number_value == pytest.approx(0.03)
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert "val/r2" in {m.name.tag for m in experiment.metric_infos}
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == 1  # STATUS_SUCCESS


@pytest.mark.slow
def test_run_plots_are_valid_and_not_blank(all_run):
    names = sorted(p.name for p in (all_run / "plots").glob("*.png"))
    assert names == ["loss.png", "lr.png", "memory.png", "val.png"]
    for name in names:
        pixels = png_pixels(all_run / "plots" / name)
        assert pixels.shape[0] > 100 and pixels.shape[1] > 100
        assert pixels.std() > 10, f"{name} looks blank"
        # Axes, grid and text are grey; only plotted data is coloured. An empty axes has 0 such pixels.
        assert coloured_pixels(all_run / "plots" / name) > 200, f"{name} has no plotted data"


@pytest.mark.slow
def test_run_plots_leave_the_callers_matplotlib_backend_and_pyplot_alone(all_run, tmp_path):
    # `fit` from a notebook: writing the run's plots must not switch the user's backend to Agg, nor open
    # figures in pyplot's list (nor import pyplot at all).
    code = (
        "import sys, matplotlib; matplotlib.use('svg'); "
        "from dgtrain.loggers.plots import write_run_plots; "
        f"files = write_run_plots({str(all_run)!r}); "
        "print(len(files), matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["4", "svg", "False"]


@pytest.mark.slow
def test_sigterm_keeps_every_logged_step_in_every_sink(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        # A few log rows a second (every 50 steps, evaluation every 500), so a stop lands mid-run.
        [sys.executable, "-m", "dgtrain", "model=linreg", "trainer.max_steps=200000", "trainer.log_every=50"]
        + ["trainer.eval_every=500", "logger=all"]
        + [f"hydra.run.dir={run_dir}"],
        cwd=tmp_path,
        env=cli_env(WANDB_MODE="offline", WANDB_DIR=""),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            jsonl = run_dir / "metrics.jsonl"
            if jsonl.exists() and len(jsonl.read_text().splitlines()) >= 4:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, output[-3000:]
    rows = read_metrics(run_dir)
    steps = [r["step"] for r in rows]
    assert len(steps) >= 4 and steps[-1] < 200000
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "stopped"
    acc = tb_scalars(run_dir)
    for key in {k for r in rows for k in r} - {"step"}:  # evaluation rows have no train/* keys, etc.
        assert [e.step for e in acc.Scalars(key)] == [r["step"] for r in rows if key in r], key
    assert steps[-1] == acc.Scalars("train/loss")[-1].step  # the stop step was logged everywhere
    records = wandb_records(run_dir)
    assert sorted(wandb_history(records)) == steps
    assert next(r["exit"] for r in records if r["type"] == "exit")["exit_code"] != 0
    assert (run_dir / "plots" / "loss.png").is_file()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    sweep_dir = tmp / "sweep"
    out = run_cli(
        ["-m", *TINY, "trainer.max_steps=10", "logger=wandb", "optimizer.lr=0.01,0.05"]
        + [f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp,
        env=cli_env(WANDB_MODE="offline", WANDB_DIR="", WANDB_RUN_GROUP=""),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return sweep_dir


@pytest.mark.slow
def test_sweep_jobs_are_separate_wandb_runs_in_one_group(sweep):
    runs = [next(r["run"] for r in wandb_records(sweep / job) if r["type"] == "run") for job in ("0", "1")]
    assert runs[0]["run_id"] != runs[1]["run_id"]
    assert runs[0]["run_group"] == runs[1]["run_group"] == str(sweep)
    assert runs[0]["display_name"].startswith("0: ") and "optimizer.lr=0.05" in runs[1]["display_name"]
    assert [r["config"]["update"]["optimizer"]["lr"] for r in runs] == [0.01, 0.05]


@pytest.mark.slow
def test_plot_command_overlays_runs_in_one_figure(sweep, tmp_path):
    from dgtrain.loggers.plots import figure, panels, read_history

    out_png = tmp_path / "cmp.png"
    res = run_cli(["plot", str(sweep / "0"), str(sweep / "1"), "-o", str(out_png)], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert list(tmp_path.glob("*.png")) == [out_png]
    assert png_pixels(out_png).std() > 10
    # The figure behind it: each panel holds a line of both runs.
    runs = [(job, read_history(sweep / job)) for job in ("0", "1")]
    fig = figure(runs, panels(runs[0][1] + runs[1][1]))
    for ax in fig.axes:
        labels = [line.get_label() for line in ax.get_lines()]
        assert any(lb.startswith("0 ") for lb in labels) and any(lb.startswith("1 ") for lb in labels)


@pytest.mark.slow
def test_plot_command_errors(tmp_path):
    res = run_cli(["plot", str(tmp_path)], cwd=tmp_path)
    assert res.returncode == 2 and "no metrics.jsonl" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_logger_wandb_without_wandb_installed_exits_with_hint(tmp_path):
    fake = tmp_path / "site"
    (fake / "wandb").mkdir(parents=True)
    (fake / "wandb" / "__init__.py").write_text("raise ImportError('No module named wandb')\n")
    env = cli_env()
    env["PYTHONPATH"] = str(fake) + ":" + env["PYTHONPATH"]
    res = run_cli(
        [*TINY, "trainer.max_steps=5", "logger=wandb", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path, env=env
    )
    assert res.returncode == 2
    errors = [line for line in (res.stdout + res.stderr).splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "pip install 'dgtrain[wandb]'" in errors[0]


def wandb_state(run_dir: Path) -> dict:
    """W&B's own summary of the run (`wandb leet inspect --summary --json`): state, exit code, summary."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "wandb",
            "leet",
            "inspect",
            "--summary",
            "--json",
            str(run_dir / "wandb" / "latest-run"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_joblib_sweep_finishes_each_wandb_run_with_its_outcome(tmp_path):
    """Jobs in worker processes (a multiprocessing launcher) do not hang; a job whose training fails
    leaves a W&B run marked failed, the other one finished."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    sweep_dir = tmp_path / "sweep"
    res = run_cli(
        ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "trainer.max_steps=10"]
        + ["logger=wandb", "optimizer=sgd", "optimizer.lr=0.01,1e6", f"hydra.sweep.dir={sweep_dir}"],
        cwd=tmp_path,
        timeout=180,
        env=cli_env(WANDB_MODE="offline", WANDB_DIR="", WANDB_RUN_GROUP=""),
    )
    assert res.returncode == 1, res.stderr[-3000:]  # lr=1e6 diverges: that job fails, the sweep says so
    assert "train/loss became inf" in res.stderr
    states = [wandb_state(sweep_dir / job) for job in ("0", "1")]
    assert [s["state"] for s in states] == ["finished", "failed"]
    assert states[0]["exit_code"] == 0 and states[1]["exit_code"] != 0
    assert states[1]["summary"]["status"] == "failed"
    assert states[0]["run_id"] != states[1]["run_id"]


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    """A resumed run (resume_step=3) rewrites steps 4.. instead of adding a second set of points."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dgtrain.loggers.tensorboard import TensorBoardLogger

    first = TensorBoardLogger(tmp_path)
    for step in range(1, 7):
        first.log_metrics({"train/loss": float(step)}, step)
    first.close({}, "stopped")
    resumed = TensorBoardLogger(tmp_path, resume_step=3)
    for step in range(4, 7):
        resumed.log_metrics({"train/loss": 10.0 * step}, step)
    resumed.close({}, "completed")
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0), (5, 50.0), (6, 60.0)]


# ------------------------------------------------------------------------------------------ console


def test_plain_lines_are_short_and_keep_what_the_live_bar_shows():
    from dgtrain.loggers.console import plain_line

    metrics = {
        "epoch": 1,
        "train/loss": 0.6341,
        "train/lr": 0.05,
        "perf/step_ms": 7.246,
        "perf/samples_per_s": 8833.0,
        "mem/rss_mb": 317.0,
        "mem/rss_peak_mb": 317.0,
        "graph/nodes": 6,
        "graph/saved_mb": 0.002441,
        "graph/distinct_shapes": 1,
        "val/acc": 0.9731,
    }
    line = plain_line(10, 20, metrics, eta=65)
    assert line == (
        "step 10/20 (50%) epoch 1 | loss 0.6341 | lr 5.00e-02 | 8,833 samples/s 7.25 ms/step | "
        "rss 317 MB graph 2.5 KB | val/acc 0.9731 | eta 0:01:05"
    )
    assert len(line) <= 150  # old lines listed every metric (250+ characters); all are in metrics.jsonl


def test_summary_table_never_cuts_the_run_dir(tmp_path):
    import io

    from rich.console import Console

    from dgtrain.loggers.console import ConsoleLogger

    run_dir = tmp_path / ("a_long_directory_name_" * 6) / "run"
    logger = ConsoleLogger(mode="plain")
    logger.console = Console(file=io.StringIO(), width=60)
    logger.close({"run_dir": str(run_dir), "final": {"test/acc": 0.5}, "best": {}}, "completed")
    out = logger.console.file.getvalue()
    assert f"run dir: {run_dir}\n" in out and "test/acc" in out


def test_metrics_jsonl_lines_are_strict_json_with_nonfinite_values_as_strings(tmp_path):
    """NaN and inf (a skipped step's loss, an empty average) have no JSON literal: every line must still
    parse with a strict reader (jq, pandas), the values spelled as strings."""
    from dgtrain.loggers import JsonlLogger

    sink = JsonlLogger(tmp_path)
    sink.log_metrics({"train/loss": 0.25, "epoch": 1}, 10)
    sink.log_metrics({"train/loss": float("nan"), "perf/x": float("-inf"), "sample/text": "NaN here"}, 20)
    sink.close({}, "completed")

    def strict(token):
        raise ValueError(f"non-standard JSON token {token}")

    rows = [json.loads(line, parse_constant=strict) for line in (tmp_path / "metrics.jsonl").open()]
    assert rows == [
        {"step": 10, "train/loss": 0.25, "epoch": 1},
        {"step": 20, "train/loss": "nan", "perf/x": "-inf", "sample/text": "NaN here"},
    ]


def test_plain_console_prints_at_most_one_progress_line_per_interval(caplog):
    """A small model logs every few milliseconds: CI logs get a line per interval, plus every evaluation
    and the last step; with plain_interval_s=0, every logging step."""
    import logging

    from dgtrain.loggers.console import ConsoleLogger

    def lines(interval: float) -> list[str]:
        console = ConsoleLogger(mode="plain", plain_interval_s=interval)
        console.start(50)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="dgtrain"):
            for step in range(10, 51, 10):
                metrics = {"train/loss": 1.0 / step}
                if step == 30:
                    metrics["val/acc"] = 0.5
                console.log_metrics(metrics, step)
        return [r.getMessage().split(" |")[0] for r in caplog.records]

    assert lines(60.0) == ["step 10/50 (20%)", "step 30/50 (60%)", "step 50/50 (100%)"]
    assert lines(0.0) == [f"step {s}/50 ({2 * s}%)" for s in range(10, 51, 10)]
