"""Regression data: `synthetic_linear` (known weights), scikit-learn's bundled `diabetes`, any `csv`.

Features and targets are standardised with statistics of the training split only.
"""

from __future__ import annotations

import csv as _csv
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgtrain.data import DataBundle, DataInfo, TensorPairs, limit, split_indices
from dgtrain.errors import DgtrainError

log = logging.getLogger("dgtrain")


def _standardise(x: torch.Tensor, train_idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(standardised x, mean, std): the statistics are stored with the run (`dgtrain predict` reuses them)."""
    mean = x[train_idx].mean(0, keepdim=True)
    if len(train_idx) < 2:  # one training example has no spread (std is NaN): centre it only
        return x - mean, mean[0], torch.ones_like(mean[0])
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
    class_names: list[str] | None = None,
) -> DataBundle:
    """Regression (y: float, (N, out)), or classification when `class_names` is given (y: class indices,
    (N,)); `standardise`: features (and regression targets) to zero mean and unit variance, with the
    training split's statistics, which are stored for predict."""
    n = limit(len(x), max_examples)
    x, y = x[:n], y[:n]
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    extra = dict(extra or {})
    extra["feature_names"] = feature_names or [f"x{i}" for i in range(x.shape[1])]
    extra["target_names"] = target_names or [f"y{i}" for i in range(y.shape[1])]
    if standardise:
        x, extra["x_mean"], extra["x_std"] = _standardise(x, train_idx)
    if class_names is not None:
        extra["class_names"] = list(class_names)
        info = DataInfo(
            task="classification", in_shape=tuple(x.shape[1:]), num_classes=len(class_names), extra=extra
        )
    else:
        if standardise:
            y, extra["y_mean"], extra["y_std"] = _standardise(y, train_idx)
        info = DataInfo(task="regression", in_shape=tuple(x.shape[1:]), out_dim=y.shape[1], extra=extra)
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


def _columns(header: list[str]) -> str:
    """The header as an error lists it: names cut short, at most 20 of them."""
    names = [h if len(h) <= 30 else h[:30] + "..." for h in header[:20]]
    return ", ".join(names) + (f", ... ({len(header)} in all)" if len(header) > 20 else "")


def read_table(
    p: Path,
    path: str,
    delimiter: str | None,
    *,
    min_rows: int = 2,
    name: str = "data.path=",
    option: str = "data.delimiter",
) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, data rows and their line numbers in the file (blank lines skipped). `.gz` files are
    decompressed (as pandas reads them); a UTF-8 byte-order mark (what Excel writes) is dropped; the
    delimiter is `delimiter`, else sniffed from the start of the file among , ; tab and |.

    Training reads its data.path; `dgtrain predict` reads its input file through this same function, so
    the messages name the file with `name` + path (training: `data.path=...`) and the setting that picks
    the separator with `option` (training: data.delimiter, predict: --delimiter); `min_rows`: the
    fewest data rows accepted."""
    import gzip

    if delimiter is not None and len(str(delimiter)) != 1:
        unset = "null" if option.startswith("data.") else "leave it out"  # a config key, or a CLI option
        raise DgtrainError(
            f"{option}={delimiter!r}: must be one character (',', ';', '\\t', '|'), or {unset} to detect it."
        )
    gz = p.suffix == ".gz"
    try:
        with (
            gzip.open(p, "rt", newline="", encoding="utf-8-sig")
            if gz
            else p.open(newline="", encoding="utf-8-sig")
        ) as f:
            if delimiter is None:
                sample = f.read(65536)
                f.seek(0)
                try:
                    delimiter = _csv.Sniffer().sniff(sample, delimiters=",;\t|").delimiter
                except _csv.Error:
                    delimiter = ","
            reader = _csv.reader(f, delimiter=str(delimiter))
            numbered = [(reader.line_num, row) for row in reader if row]
    except (OSError, EOFError, UnicodeDecodeError, _csv.Error) as e:
        what = type(e).__name__ if isinstance(e, UnicodeDecodeError) else str(e).split(":")[0][:80]
        raise DgtrainError(
            f"{name}{path}: cannot be read as a {'gzipped ' if gz else ''}UTF-8 CSV file ({what}). "
            "Expected a text CSV file (optionally .csv.gz) with a header row."
        ) from None
    if len(numbered) < 1 + min_rows:
        want = f"{min_rows} data row{'s' if min_rows != 1 else ''}"
        found = "an empty file" if not numbered else f"{len(numbered) - 1} data row(s) below the header"
        raise DgtrainError(f"{name}{p}: expected a header row and at least {want}, found {found}.")
    header = [h.strip() for h in numbered[0][1]]
    for r, row in numbered[1:]:
        if len(row) != len(header):
            raise DgtrainError(
                f"{p}, line {r}: {len(row)} fields, expected {len(header)} (as in the header; delimiter "
                f"{delimiter!r}, set {option} if that is wrong)."
            )
    rows = [row for _, row in numbered[1:]]
    # A delimiter at the end of every line (as some exports write) adds a column with neither a name nor
    # values: it is dropped. A column of values without a name cannot be chosen by name: it is an error.
    unnamed = [i for i, h in enumerate(header) if not h]
    filled = [i for i in unnamed if any(row[i].strip() for row in rows)]
    if filled:
        raise DgtrainError(
            f"{name}{p}: column {filled[0] + 1} holds values but has no name in the header row; columns are "
            "matched by name (data.target, data.drop, predict's input), so give it one."
        )
    if unnamed:
        header = [h for h in header if h]
        rows = [[v for i, v in enumerate(row) if i not in unnamed] for row in rows]
    # columns are found by name (data.target, data.drop, predict's input): a name given twice is ambiguous
    twice = sorted({h for h in header if header.count(h) > 1})
    if twice:
        raise DgtrainError(
            f"{name}{p}: the header names column(s) {', '.join(_field(h, 30) for h in twice)} more than once; "
            "columns are matched by name, so each needs its own. Rename the duplicates in the header row."
        )
    return header, rows, [r for r, _ in numbered[1:]]


def encode_columns(
    p: Path,
    header: list[str],
    rows: list[list[str]],
    lines: list[int],
    target: str | None,
    drop: list[str],
    categorical: str | list[str] | None,
    labels: bool = False,
) -> tuple[np.ndarray, Any, list[str]]:
    """(features, target, feature names); the target is (N, 1) numbers, or with `labels` the column's
    text values (classification). Numeric columns as they are; the text columns chosen by
    `categorical` one-hot encoded (`col=value` per category, sorted): "auto" every column holding a
    non-number, a list those columns, "none" (or null) no column, so any text value is an error."""
    if target is None or target not in header:
        if len(header) < 2:  # one field: not a table (or another separator), and its line is not quoted back
            raise DgtrainError(
                f"data.path={p}: the first line holds a single field, so this does not look like a table with a "
                "header row. Set data.delimiter to the file's separator (null detects , ; tab |); "
                "data.target must name one of its columns."
            )
        raise DgtrainError(f"data.target={target!r} is not a column of {p}. Columns: {_columns(header)}.")
    if len(header) < 2:
        raise DgtrainError(
            f"data.path={p}: the only column is the target {target!r}, so there are no features to learn "
            "from. Add feature columns, or point data.path at the full table."
        )
    unknown = [str(c) for c in drop if c not in header]
    if unknown:
        raise DgtrainError(
            f"data.drop: {', '.join(unknown)} not column(s) of {p}. Columns: {_columns(header)}."
        )
    if target in drop:
        raise DgtrainError(f"data.drop lists the target column {target!r}; drop features only.")
    if categorical in (None, "none", False):
        text_cols: set[str] = set()
    elif categorical == "auto":
        text_cols = {h for i, h in enumerate(header) if any(not _is_float(row[i]) for row in rows)}
        text_cols -= {target}  # a text target is reported below, with its line
    elif isinstance(categorical, str):
        raise DgtrainError(
            f"data.categorical={categorical!r}: expected none, auto or a list of column names (e.g. [city])."
        )
    else:
        text_cols = {str(c) for c in categorical}
        unknown = sorted(text_cols - set(header))
        if unknown:
            raise DgtrainError(
                f"data.categorical: {', '.join(unknown)} not column(s) of {p}. Columns: {_columns(header)}."
            )
    names: list[str] = []
    blocks: list[np.ndarray] = []
    for i, h in enumerate(header):
        if h in drop or h == target:
            continue
        if h in text_cols:
            values = [row[i].strip() for row in rows]
            cats = sorted(set(values))
            index = {c: k for k, c in enumerate(cats)}
            block = np.zeros((len(rows), len(cats)), dtype=np.float32)
            block[np.arange(len(rows)), [index[v] for v in values]] = 1.0
            blocks.append(block)
            names.extend(f"{h}={c}" for c in cats)
        else:
            blocks.append(_numeric_column(p, rows, lines, i, h, "feature")[:, None])
            names.append(h)
    if not blocks:
        raise DgtrainError(f"{p}: no feature columns left besides data.target={target!r} (data.drop={drop}).")
    t = header.index(target)
    y = (
        [row[t].strip() for row in rows]
        if labels
        else _numeric_column(p, rows, lines, t, target, "target")[:, None]
    )
    return np.concatenate(blocks, axis=1), y, names


def class_indices(p: Path, values: list[str], lines: list[int], target: str) -> tuple[list[str], list[int]]:
    """The classes of a label column (sorted; numerically when every label is a number) and each row's
    class index. An empty label, or a single class, is an error naming the line or the column."""
    empty = next((r for r, v in enumerate(values) if not v), None)
    if empty is not None:
        raise DgtrainError(
            f"{p}, line {lines[empty]}: the target column {target!r} is empty; every row needs a class label. "
            "Remove or fill the rows without one."
        )
    classes = sorted(set(values))
    if all(_is_float(v) for v in classes):
        classes.sort(key=float)
    if len(classes) < 2:
        raise DgtrainError(
            f"{p}: the target column {target!r} holds one class only ({classes[0]!r}); a classifier needs "
            "at least two. Check data.target, or use data.task=regression for a numeric target."
        )
    if len(classes) > max(20, len(values) // 2) and all(_is_float(v) for v in classes):
        log.warning(
            f"{p}: data.task=classification, but the target column {target!r} holds {len(classes):,} "
            f"distinct numbers in {len(values):,} rows, so most classes have a single example: it looks "
            "like a continuous target. For a numeric target, use data.task=regression."
        )
    index = {c: k for k, c in enumerate(classes)}
    return classes, [index[v] for v in values]


def _numeric_column(
    p: Path, rows: list[list[str]], lines: list[int], i: int, name: str, role: str
) -> np.ndarray:
    """Column i as float32; a text, NaN or infinite value (or one beyond float32's range) is an error
    naming its line and column."""
    out = np.empty(len(rows), dtype=np.float32)
    where = f"column {i + 1} ({_field(name, 30)})"
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, reported below
        for r, row in enumerate(rows):
            try:
                out[r] = float(row[i])
            except ValueError:
                hint = (
                    "the target of a regression must be numeric"
                    if role == "target"
                    else f"one-hot encode it with data.categorical=auto (or [{name}]), or data.drop=[{name}]"
                )
                raise DgtrainError(
                    f"{p}, line {lines[r]}, {where}: the value {_field(row[i])} is not a number; {hint}."
                ) from None
    bad = np.flatnonzero(~np.isfinite(out))  # nan, inf, or beyond float32's range
    if len(bad):
        r = int(bad[0])
        raise DgtrainError(
            f"{p}, line {lines[r]}, {where}: the value {_field(rows[r][i])} is not a finite number (float32); "
            "it would make every loss NaN. Remove or fill the missing or infinite values before training."
        )
    return out


def csv(
    *,
    seed: int,
    path: str | None,
    target: str | None,
    val_fraction: float = 0.2,
    max_examples: int | None = None,
    delimiter: str | None = None,
    drop: list[str] | None = None,
    categorical: str | list[str] | None = "none",
    task: str = "regression",
) -> DataBundle:
    """A CSV file (or .csv.gz) with a header row; `target` names the column to predict, every other
    column not in `drop` is a feature. Text columns are one-hot encoded when `categorical` says so.
    `task` (data.task): regression (a numeric target), or classification: the target's values (text or
    numbers) are the classes, in sorted order (numerically when every value is a number)."""
    if task not in ("regression", "classification"):
        raise DgtrainError(
            f"data.task={task!r}: data=csv learns regression (a numeric data.target) or classification "
            "(data.target holds class labels). Set data.task=regression or data.task=classification."
        )
    if not path:
        raise DgtrainError("data=csv needs a file: set data.path=/path/to/file.csv and data.target=COLUMN.")
    p = Path(path).expanduser()
    if not p.is_file():
        raise DgtrainError(
            f"data.path={path}: file not found. Expected a CSV file with a header row "
            "and numeric columns, one of which is named by data.target."
        )
    header, rows, lines = read_table(p, path, delimiter)
    labels = task == "classification"
    drop = [drop] if isinstance(drop, str) else list(drop or [])  # data.drop=id: one column, not i and d
    x, y, features = encode_columns(p, header, rows, lines, target, drop, categorical, labels)
    classes = None
    if labels:
        classes, y = class_indices(p, y, lines, target)
    return _bundle(
        torch.from_numpy(x),
        torch.tensor(y) if labels else torch.from_numpy(y),
        seed=seed,
        val_fraction=val_fraction,
        max_examples=max_examples,
        standardise=True,
        feature_names=features,
        target_names=[target],
        class_names=classes,
    )


csv.tasks = ("regression", "classification")  # data.task picks one (dgtrain/validation.py checks it)
