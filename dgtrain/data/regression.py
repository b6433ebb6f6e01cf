"""Regression data: `synthetic_linear` (known weights), scikit-learn's bundled `diabetes`, any `csv`.

Features and targets are standardised with statistics of the training split only.
"""

from __future__ import annotations

import csv as _csv
from pathlib import Path

import numpy as np
import torch

from dgtrain.data import DataBundle, DataInfo, TensorPairs, limit, split_indices
from dgtrain.errors import DgtrainError


def _standardise(x: torch.Tensor, train_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(standardised x, mean, std): the statistics are stored with the run (`dgtrain predict` reuses them)."""
    mean = x[train_idx].mean(0, keepdim=True)
    std = x[train_idx].std(0, keepdim=True).clamp_min(1e-8)
    return (x - mean) / std, mean[0], std[0]


def _bundle(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    seed: int,
    val_fraction: float,
    max_examples: int | None,
    standardise: bool,
    extra: dict | None = None,
    feature_names: list[str] | None = None,
    target_names: list[str] | None = None,
) -> DataBundle:
    n = limit(len(x), max_examples)
    x, y = x[:n], y[:n]
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    extra = dict(extra or {})
    extra["feature_names"] = feature_names or [f"x{i}" for i in range(x.shape[1])]
    extra["target_names"] = target_names or [f"y{i}" for i in range(y.shape[1])]
    if standardise:
        x, extra["x_mean"], extra["x_std"] = _standardise(x, train_idx)
        y, extra["y_mean"], extra["y_std"] = _standardise(y, train_idx)
    info = DataInfo(task="regression", in_shape=tuple(x.shape[1:]), out_dim=y.shape[1], extra=extra or {})
    return DataBundle(TensorPairs(x[train_idx], y[train_idx]), TensorPairs(x[val_idx], y[val_idx]), info)


def synthetic_linear(
    *,
    seed: int,
    num_examples: int = 1024,
    in_features: int = 8,
    out_features: int = 1,
    noise: float = 0.1,
    weights_seed: int = 1234,
    val_fraction: float = 0.2,
    max_examples: int | None = None,
) -> DataBundle:
    """y = x @ W.T + b + noise, with W and b drawn once from `weights_seed` (the "true" weights)."""
    g_w = torch.Generator().manual_seed(weights_seed)
    w = torch.randn(out_features, in_features, generator=g_w)
    b = torch.randn(out_features, generator=g_w)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(num_examples, in_features, generator=g)
    y = x @ w.T + b + noise * torch.randn(num_examples, out_features, generator=g)
    return _bundle(
        x,
        y,
        seed=seed,
        val_fraction=val_fraction,
        max_examples=max_examples,
        standardise=False,
        extra={"true_weight": w, "true_bias": b},
    )


def diabetes(*, seed: int, val_fraction: float = 0.2, max_examples: int | None = None) -> DataBundle:
    """scikit-learn's bundled diabetes data (442 patients, 10 features); target standardised."""
    from sklearn.datasets import load_diabetes

    d = load_diabetes()
    x = torch.tensor(d.data, dtype=torch.float32)
    y = torch.tensor(d.target, dtype=torch.float32).unsqueeze(1)
    return _bundle(
        x,
        y,
        seed=seed,
        val_fraction=val_fraction,
        max_examples=max_examples,
        standardise=True,
        feature_names=list(d.feature_names),
        target_names=["target"],
    )


def _field(v: str, width: int = 40) -> str:
    """A field of the user's file as an error may quote it: repr'd and cut short, never a whole line."""
    return repr(v if len(v) <= width else v[:width] + "...")


def _is_float(v: str) -> bool:
    try:
        float(v)
    except ValueError:
        return False
    return True


def _read_rows(p: Path, path: str) -> list[list[str]]:
    """The rows of a CSV file; `.gz` files are decompressed (as pandas reads them)."""
    import gzip

    gz = p.suffix == ".gz"
    try:
        with (
            gzip.open(p, "rt", newline="", encoding="utf-8") if gz else p.open(newline="", encoding="utf-8")
        ) as f:
            return list(_csv.reader(f))
    except (OSError, EOFError, UnicodeDecodeError, _csv.Error) as e:
        what = type(e).__name__ if isinstance(e, UnicodeDecodeError) else str(e).split(":")[0][:80]
        raise DgtrainError(
            f"data.path={path}: cannot be read as a {'gzipped ' if gz else ''}UTF-8 CSV file ({what}). "
            "Expected a text CSV file (optionally .csv.gz) with a header row and numeric columns."
        ) from None


def csv(
    *,
    seed: int,
    path: str | None,
    target: str | None,
    val_fraction: float = 0.2,
    max_examples: int | None = None,
) -> DataBundle:
    """A numeric CSV file (or .csv.gz) with a header row; `target` names the column to predict."""
    if not path:
        raise DgtrainError("data=csv needs a file: set data.path=/path/to/file.csv and data.target=COLUMN.")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DgtrainError(
            f"data.path={path}: file not found. Expected a CSV file with a header row "
            "and numeric columns, one of which is named by data.target."
        )
    rows = _read_rows(p, path)
    if len(rows) < 3:
        raise DgtrainError(
            f"data.path={p}: expected a header row and at least 2 data rows, found {len(rows)} rows."
        )
    header = [h.strip() for h in rows[0]]
    if target is None or target not in header:
        if len(header) < 2:  # one field: not a comma-separated table, and its line is not quoted back
            raise DgtrainError(
                f"data.path={p}: the first line holds a single field, so this does not look like a "
                "comma-separated file with a header row; data.target must name one of its columns."
            )
        names = [h if len(h) <= 30 else h[:30] + "..." for h in header[:20]]
        raise DgtrainError(
            f"data.target={target!r} is not a column of {p}. Columns: {', '.join(names)}"
            + (f", ... ({len(header)} in all)." if len(header) > 20 else ".")
        )
    if len(header) < 2:
        raise DgtrainError(
            f"data.path={p}: the only column is the target {target!r}, so there are no features to learn "
            "from. Add feature columns, or point data.path at the full table."
        )
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float32)
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DgtrainError(
                f"{p}, line {r}: {len(row)} fields, expected {len(header)} (as in the header)."
            )
        try:
            with np.errstate(over="ignore"):  # beyond float32's range becomes inf, reported below
                values[r - 2] = [float(v) for v in row]
        except ValueError:
            c = next(c for c, v in enumerate(row) if not _is_float(v))
            raise DgtrainError(
                f"{p}, line {r}, column {c + 1} ({_field(header[c], 30)}): the value {_field(row[c])} is not "
                "a number; every column must be numeric."
            ) from None
    bad = np.argwhere(~np.isfinite(values))  # nan, inf, or beyond float32's range
    if len(bad):
        i, c = (int(v) for v in bad[0])
        raise DgtrainError(
            f"{p}, line {i + 2}, column {c + 1} ({_field(header[c], 30)}): the value {_field(rows[i + 1][c])} "
            "is not a finite number (float32); it would make every loss NaN. Remove or fill the missing or "
            "infinite values before training."
        )
    t = header.index(target)
    data = torch.from_numpy(values)
    x = torch.cat([data[:, :t], data[:, t + 1 :]], dim=1)
    y = data[:, t : t + 1]
    return _bundle(
        x,
        y,
        seed=seed,
        val_fraction=val_fraction,
        max_examples=max_examples,
        standardise=True,
        feature_names=header[:t] + header[t + 1 :],
        target_names=[target],
    )
