"""MLflow sink (`logger=mlflow`, pip install 'dgtrain[mlflow]'): parameters from the resolved config,
every metric at its step, the run's end status. mlflow is imported only when this sink is built.

The MLflow run id is kept in `<run_dir>/mlflow_run_id.txt`, so a resumed dgtrain run continues the same
MLflow run; steps after the checkpoint are logged again (MLflow keeps every value it is sent)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from dgtrain.errors import DgtrainError
from dgtrain.loggers.tensorboard import flatten

RUN_ID_FILE = "mlflow_run_id.txt"
STATUS = {"completed": "FINISHED", "early_stopped": "FINISHED", "stopped": "KILLED", "failed": "FAILED"}


class MlflowLogger:
    def __init__(
        self,
        run_dir: Path | str,
        tracking_uri: str | None = None,
        experiment: str = "dgtrain",
        run_name: str | None = None,
        resume_step: int | None = None,
    ):
        try:
            import mlflow
        except ImportError as e:
            raise DgtrainError(
                f"logger=mlflow needs the mlflow package, which is not installed ({e}): "
                "pip install 'dgtrain[mlflow]' (or choose another logger, e.g. logger=csv)."
            ) from e
        self.mlflow = mlflow
        run_dir = Path(run_dir)
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_experiment(experiment)
        id_file = run_dir / RUN_ID_FILE
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else None
        self.run = mlflow.start_run(run_id=run_id, run_name=None if run_id else (run_name or run_dir.name))
        id_file.write_text(self.run.info.run_id + "\n")
        self._resumed = run_id is not None

    def log_config(self, config: dict[str, Any]) -> None:
        if self._resumed:  # MLflow parameters are write-once; the first process logged them
            return
        params = {k: str(v)[:500] for k, v in flatten(config).items()}
        items = list(params.items())
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            self.mlflow.log_params(dict(items[i : i + 100]))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float)}
        self.mlflow.log_metrics(numeric, step=step)

    def close(self, summary: dict[str, Any], status: str) -> None:
        if self.run is not None:
            self.mlflow.end_run(status=STATUS.get(status, "FINISHED"))
            self.run = None
