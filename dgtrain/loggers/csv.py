"""CSV sink (`logger=csv`): `<run_dir>/metrics.csv`, one row per logged step, one column per metric,
as Lightning's CSVLogger writes it. Columns appear as metrics do (val/* at the first evaluation); the
file is then rewritten with the wider header, atomically, so it is always a valid CSV."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from dgtrain.checkpoint import atomic_write


class CsvLogger:
    def __init__(self, run_dir: Path | str, filename: str = "metrics.csv", resume_step: int | None = None):
        self.path = Path(run_dir) / filename
        self.columns: list[str] = ["step"]
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():  # a resumed run keeps the rows up to its step
            with self.path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                self.columns = list(reader.fieldnames or ["step"])
                self.rows = [r for r in reader if int(r["step"]) <= resume_step]
            self._rewrite()
        else:
            self._rewrite()

    def log_config(self, config: dict[str, Any]) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: v for k, v in metrics.items() if isinstance(v, int | float)}}
        self.rows.append(row)
        new = [k for k in row if k not in self.columns]
        if new:
            self.columns += new
            self._rewrite()
        else:
            with self.path.open("a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, self.columns).writerow(row)

    def _rewrite(self) -> None:
        buf = io.StringIO()
        w = csv.DictWriter(buf, self.columns, lineterminator="\n")
        w.writeheader()
        w.writerows(self.rows)
        data = buf.getvalue().encode()
        atomic_write(self.path, lambda f: f.write(data))

    def close(self, summary: dict[str, Any], status: str) -> None:
        pass
