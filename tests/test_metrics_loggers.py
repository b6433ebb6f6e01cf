"""metrics=[...] (torchmetrics on the device), the confusion-matrix PNG, logger=csv and logger=mlflow."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from dgtrain.errors import DgtrainError
from dgtrain.loggers.csv import CsvLogger
from dgtrain.tasks import Classification
from tests.conftest import cli_env, run_cli


def test_topk_f1_and_confusion_match_a_hand_count():
    pytest.importorskip("torchmetrics")
    task = Classification()
    task.configure_metrics(["top2", "f1", "confusion"], num_classes=3)
    logits = torch.tensor([[3.0, 2.0, 0.0], [0.0, 1.0, 3.0], [2.0, 0.0, 1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([1, 2, 2, 1])
    model = torch.nn.Identity()
    batches = [(logits[:2], y[:2]), (logits[2:], y[2:])]
    out = task.evaluate(model, batches, torch.nn.CrossEntropyLoss())
    assert out["val/acc"] == 0.5  # rows 1 and 3 right
    assert out["val/acc_top2"] == 1.0  # every true class is in its row's top 2
    # per class F1: class 0: p=0 (2 predicted, 0 right) -> 0; class 1: p=1, r=1/2 -> 2/3; class 2: p=1, r=1/2 -> 2/3
    assert out["val/f1_macro"] == pytest.approx((0 + 2 / 3 + 2 / 3) / 3)
    assert task.summary()["confusion_matrix"] == [[0, 0, 0], [1, 1, 0], [1, 0, 1]]


def test_regression_r2_matches_scikit_learn_also_for_targets_that_do_not_vary():
    from sklearn.metrics import r2_score

    from dgtrain.tasks import make_task

    task, model, mse = make_task("regression"), torch.nn.Identity(), torch.nn.MSELoss()
    g = torch.Generator().manual_seed(0)
    y = torch.randn(40, 2, generator=g)
    pred = y + 0.3 * torch.randn(40, 2, generator=g)
    out = task.evaluate(model, [(pred[:25], y[:25]), (pred[25:], y[25:])], mse)
    assert out["val/r2"] == pytest.approx(r2_score(y.numpy(), pred.numpy(), multioutput="variance_weighted"))
    # a constant target (predict on a one-row file): r2 is undefined; it was -4e10 here
    same, near = torch.full((3, 1), 0.7), torch.tensor([[0.5], [0.7], [0.9]])
    assert task.evaluate(model, [(near, same)], mse)["val/r2"] == r2_score(same, near) == 0.0
    assert task.evaluate(model, [(same, same)], mse)["val/r2"] == r2_score(same, same) == 1.0
    assert task.evaluate(model, [(near[:1], same[:1])], mse)["val/r2"] == 0.0


def test_unknown_metric_and_too_large_k_are_refused():
    with pytest.raises(DgtrainError, match="unknown metric 'auroc'"):
        Classification().configure_metrics(["auroc"], 10)
    with pytest.raises(DgtrainError, match="top12 needs 2 <= k <= the number of classes"):
        Classification().configure_metrics(["top12"], 10)


def test_csv_logger_widens_its_header_and_resumes(tmp_path):
    log = CsvLogger(tmp_path)
    log.log_metrics({"train/loss": 1.0, "epoch": 0}, 5)
    log.log_metrics({"train/loss": 0.5, "val/acc": 0.7, "epoch": 0}, 10)
    log.log_metrics({"train/loss": 0.25, "epoch": 1}, 15)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [r["step"] for r in rows] == ["5", "10", "15"]
    assert rows[0]["val/acc"] == "" and rows[1]["val/acc"] == "0.7" and rows[2]["train/loss"] == "0.25"
    CsvLogger(tmp_path, resume_step=10).log_metrics({"train/loss": 0.3}, 15)  # resumed after step 10
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert [(r["step"], r["train/loss"]) for r in rows] == [("5", "1.0"), ("10", "0.5"), ("15", "0.3")]


def test_csv_logger_writes_nan_apart_from_a_metric_not_logged(tmp_path):
    """A window of updates that nonfinite=skip all dropped logs train/loss NaN: the cell says nan (as
    metrics.jsonl and Lightning's CSVLogger do), not empty, which means 'not logged at this step'."""
    log = CsvLogger(tmp_path)
    log.log_metrics({"train/loss": 1.0, "val/loss": 2.0}, 5)
    log.log_metrics({"train/loss": float("nan")}, 10)
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert rows[1]["train/loss"] == "nan" and rows[1]["val/loss"] == ""


@pytest.mark.slow
def test_metrics_and_csv_logger_in_a_run(tmp_path):
    pytest.importorskip("torchmetrics")
    run = tmp_path / "run"
    p = run_cli(
        [
            "model=mlp",
            "device=cpu",
            "trainer.max_steps=20",
            "trainer.eval_every=10",
            "metrics=[top3,f1,confusion]",
            "logger=[console,csv]",
            f"hydra.run.dir={run}",
        ],
        tmp_path,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert [r["step"] for r in rows if r["val/acc_top3"]] == ["10", "20"]
    assert float(rows[-1]["val/acc_top3"]) >= float(rows[-1]["val/acc"])
    summary = json.loads((run / "summary.json").read_text())
    matrix = summary["confusion_matrix"]
    assert len(matrix) == 10 and sum(map(sum, matrix)) == 359  # every digits validation image once
    assert (run / "plots" / "confusion_matrix.png").stat().st_size > 1000


def test_mlflow_logger(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="logger=mlflow needs the optional mlflow extra")
    from dgtrain.loggers.mlflow import MlflowLogger

    uri = f"file:{tmp_path / 'mlruns'}"
    log = MlflowLogger(tmp_path, tracking_uri=uri, experiment="t")
    log.log_config({"optimizer": {"lr": 0.1}})
    log.log_metrics({"train/loss": 1.5, "epoch": 0}, 10)
    log.close({}, "completed")
    run = mlflow.tracking.MlflowClient(uri).get_run((tmp_path / "mlflow_run_id.txt").read_text().strip())
    assert run.data.params["optimizer.lr"] == "0.1" and run.data.metrics["train/loss"] == 1.5
    assert run.info.status == "FINISHED"


def test_mlflow_absent_says_how_to_install(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow raises ImportError
    from dgtrain.loggers.mlflow import MlflowLogger

    with pytest.raises(DgtrainError, match=r"pip install 'dgtrain\[mlflow\]'"):
        MlflowLogger(tmp_path)


def test_a_missing_logger_package_leaves_no_run_dir(tmp_path):
    """logger=mlflow without mlflow: exit 2 before anything is written. The loggers open after
    config.yaml, data_info.json and metrics.jsonl, so the import error used to leave those behind in a
    run dir of a run that never started (README: a run dir made for a rejected config is removed)."""
    import subprocess
    import sys

    run_dir = tmp_path / "run"
    code = (
        "import sys; sys.modules['mlflow'] = None; from dgtrain.cli import main; "  # import mlflow fails
        f"sys.argv = ['dgtrain', 'model=linreg', 'logger=mlflow', 'trainer.max_steps=2', 'hydra.run.dir={run_dir}']; "
        "main()"
    )
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=cli_env(), capture_output=True, text=True, timeout=300
    )
    assert p.returncode == 2, p.stderr[-2000:]
    assert "logger=mlflow needs the mlflow package" in p.stdout + p.stderr
    assert "pip install 'dgtrain[mlflow]'" in p.stdout + p.stderr
    assert not run_dir.exists(), sorted(x.name for x in run_dir.iterdir())
