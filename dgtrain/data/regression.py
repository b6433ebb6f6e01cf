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


def csv(
    *,
    seed: int,
    path: str | None,
    target: str | None,
    val_fraction: float = 0.2,
    max_examples: int | None = None,
) -> DataBundle:
    """A numeric CSV file with a header row; `target` names the column to predict."""
    if not path:
        raise DgtrainError("data=csv needs a file: set data.path=/path/to/file.csv and data.target=COLUMN.")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DgtrainError(
            f"data.path={path}: file not found. Expected a CSV file with a header row "
            "and numeric columns, one of which is named by data.target."
        )
    with p.open(newline="") as f:
        rows = list(_csv.reader(f))
    if len(rows) < 3:
        raise DgtrainError(
            f"data.path={p}: expected a header row and at least 2 data rows, found {len(rows)} rows."
        )
    header = [h.strip() for h in rows[0]]
    if target is None or target not in header:
        raise DgtrainError(f"data.target={target!r} is not a column of {p}. Columns: {', '.join(header)}.")
    values = np.empty((len(rows) - 1, len(header)), dtype=np.float32)
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DgtrainError(
                f"{p}, line {r}: {len(row)} fields, expected {len(header)} (as in the header)."
            )
        try:
            values[r - 2] = [float(v) for v in row]
        except ValueError as e:
            raise DgtrainError(
                f"{p}, line {r}: a non-numeric value ({e}); every column must be numeric."
            ) from e
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
