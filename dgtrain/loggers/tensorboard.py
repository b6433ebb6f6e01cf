"""TensorBoard sink: a scalar for every metric, flushed at each log step, and the run's hyperparameters
with its final metrics (the HParams tab) when it ends. Event files go to `<run_dir>/tensorboard/`.

The writer is imported only when this sink is built. It is flushed after every log step because its
defaults (a 10-event queue, 120 s flush) would lose everything logged so far to a SIGKILL.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from dgtrain.errors import DgtrainError
from dgtrain.loggers import FINISHED


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optimizer": {"lr": 0.1}} -> {"optimizer.lr": 0.1}; values become bool/int/float/str."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:  # None, lists: shown as text
            out[key] = str(v)
    return out


class TensorBoardLogger:
    def __init__(self, run_dir: Path | str, subdir: str = "tensorboard", resume_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise DgtrainError(
                f"logger=tensorboard needs the tensorboard package, which is not installed ({e}): "
                "pip install 'dgtrain[tensorboard]' (or choose another logger, e.g. logger=console)."
            ) from e
        self.log_dir = Path(run_dir) / subdir
        # On resume, events logged after the checkpoint's step are dropped, as in metrics.jsonl.
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge)
        self._hparams: dict[str, Any] = {}

    def log_config(self, config: dict[str, Any]) -> None:
        self._hparams = flatten(config)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, bool | int | float):
                self.writer.add_scalar(k, v, global_step=step)
        self.writer.flush()

    def close(self, summary: dict[str, Any], status: str) -> None:
        if self.writer is None:
            return
        writer, self.writer = self.writer, None
        try:
            final = {
                k: float(v)
                for k, v in summary.get("final", {}).items()
                if isinstance(v, int | float) and math.isfinite(v)
            }
            if self._hparams:
                self._write_hparams(writer, final, status)
        finally:
            writer.close()

    def _write_hparams(self, writer, final: dict[str, float], status: str) -> None:
        """The HParams plugin's three records in this run's own event file. Its metric values are the
        last points of the scalar series of the same names, which `log_metrics` already wrote."""
        from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
        from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams

        experiment, session_start, _ = hparams(self._hparams, final)
        # torch's own end record always says "success"; this one tells a stopped or failed run apart.
        end = plugin_data_pb2.HParamsPluginData(
            session_end_info=plugin_data_pb2.SessionEndInfo(
                status=api_pb2.Status.Value("STATUS_SUCCESS" if status in FINISHED else "STATUS_FAILURE")
            ),
            version=metadata.PLUGIN_DATA_VERSION,
        )
        plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=end.SerializeToString())
        session_end = Summary(
            value=[
                Summary.Value(tag=metadata.SESSION_END_INFO_TAG, metadata=SummaryMetadata(plugin_data=plugin))
            ]
        )
        for record in (experiment, session_start, session_end):
            writer.file_writer.add_summary(record)
        writer.flush()
