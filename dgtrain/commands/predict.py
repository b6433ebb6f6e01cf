"""`dgtrain predict RUN_DIR INPUT [--out FILE]`: score new data with a trained regression or classification
model, batch by batch, on any device.

INPUT is a CSV file (tabular models: read as training reads data.path, with its reader; the features are
standardised with the training statistics stored in the run's data_info.json, never recomputed on the new
file), a folder of PNG/JPEG images (converted to the training channels, resized to the training size,
normalised as in training), an MNIST idx image file or a CIFAR-10 python batch. When the input carries
the targets (the target column of a CSV, the labels of a CIFAR batch, `--labels` for an idx file), the
metrics are printed too: computed exactly as `dgtrain eval` computes them.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dgtrain.commands import add_run_options
from dgtrain.errors import DgtrainError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _separator(value: str) -> str:
    """--delimiter: what a shell passes for a tab when typed as '\\t' or tab, else the value as given."""
    return "\t" if value in ("\\t", "tab") else value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgtrain predict",
        description="Score new data (CSV, a folder of images, idx or CIFAR files) with a trained model.",
    )
    p.add_argument("source", help="a run directory, a checkpoint (.pt) or a model.safetensors")
    p.add_argument(
        "input", help="a CSV file, a folder of PNG/JPEG images, an idx image file or a CIFAR batch"
    )
    p.add_argument(
        "--out", default=None, metavar="FILE", help="output file (.csv or .jsonl; default: stdout)"
    )
    p.add_argument("--format", choices=("csv", "jsonl"), default=None, help="default: from --out, else csv")
    p.add_argument(
        "--top-k", type=int, default=3, help="classification: the k likeliest classes (default: 3)"
    )
    p.add_argument("--labels", default=None, metavar="FILE", help="idx input: its labels file (for metrics)")
    p.add_argument("--id-column", default=None, help="CSV input: a column copied to the output as the id")
    p.add_argument(
        "--delimiter",
        default=None,
        type=_separator,
        metavar="CHAR",
        help="CSV input: the separator, one character (tab: '\\t' or tab; default: the run's data.delimiter "
        "when set, else detected among , ; tab | as training does)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's data.batch_size")
    add_run_options(p)
    return p


@dataclass
class Inputs:
    ids: list[str]
    x: Any  # (N, ...) float tensor, as the model saw its training inputs
    y: Any = None  # targets as training used them (standardised / class indices), when the input has them
    skipped: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- readers


def read_csv(
    path: Path,
    extra: dict[str, Any],
    n_features: int,
    id_column: str | None,
    delimiter: str | None = None,
) -> Inputs:
    """The table is read by training's own reader (dgtrain.data.regression.read_table): `.csv.gz`, a
    UTF-8 byte-order mark, blank lines, and the separator `delimiter`, else sniffed among , ; tab and |."""
    import torch

    from dgtrain.data.regression import read_table

    names = extra.get("feature_names") or [f"x{i}" for i in range(n_features)]
    targets = extra.get("target_names") or []
    header, rows, lines = read_table(path, str(path), delimiter, min_rows=1, name="", option="--delimiter")
    # a feature one-hot encoded in training (data.categorical) is named `column=value`: re-encoded from the
    # raw text column (a value training never saw gives zeros in that column's block)
    onehot = {
        n: n.split("=", 1) for n in names if n not in header and "=" in n and n.split("=", 1)[0] in header
    }
    # the columns of the training file (a one-hot block `city=...` comes from one text column `city`)
    raw = list(dict.fromkeys(n if n in header or "=" not in n else n.split("=", 1)[0] for n in names))
    missing = [c for c in raw if c not in header]
    if missing:
        hint = " The header is a single field: give the file's separator with --delimiter."
        raise DgtrainError(
            f"{path}: missing column(s) {', '.join(missing)}. The model was trained on the columns "
            f"{', '.join(raw)} (in any order; other columns are ignored).{hint if len(header) < 2 else ''}"
        )
    if id_column is not None and id_column not in header:
        raise DgtrainError(f"{path}: --id-column={id_column!r} is not a column ({', '.join(header)}).")
    has_y = bool(targets) and all(t in header for t in targets)
    # per feature: (column index, None) for a number, (column index, value) for a one-hot indicator
    cols = [
        (header.index(onehot[n][0]), onehot[n][1]) if n in onehot else (header.index(n), None) for n in names
    ]
    classes = {c: k for k, c in enumerate(extra.get("class_names") or [])}  # classification: label -> index
    label_col = header.index(targets[0]) if has_y and classes else None
    if has_y and label_col is None:  # regression: the targets are numbers like the features
        cols += [(header.index(t), None) for t in targets]
    values, labels = [], []  # labels: the target's class indices (classification)
    for r, row in zip(lines, rows, strict=True):  # r: the line in the file (read_table checked the widths)
        if label_col is not None:
            label = row[label_col].strip()
            if label not in classes:
                raise DgtrainError(
                    f"{path}, line {r}: the target {label!r} is not one of the classes the model was trained "
                    f"on ({', '.join(list(classes)[:20])}). Fix the label, or leave the column out to predict only."
                )
            labels.append(classes[label])
        try:
            values.append([float(row[c]) if v is None else float(row[c].strip() == v) for c, v in cols])
        except ValueError as e:
            raise DgtrainError(
                f"{path}, line {r}: a non-numeric value ({e}); feature columns must be numeric."
            ) from e
    data = torch.tensor(values, dtype=torch.float32)
    x, y = data[:, : len(names)], (data[:, len(names) :] if has_y else None)
    if label_col is not None:
        y = torch.tensor(labels, dtype=torch.long)
    if "x_mean" in extra:  # the training split's statistics, stored with the run
        x = (x - torch.tensor(extra["x_mean"])) / torch.tensor(extra["x_std"])
        if y is not None and "y_mean" in extra:
            y = (y - torch.tensor(extra["y_mean"])) / torch.tensor(extra["y_std"])
    ids = [row[header.index(id_column)] for row in rows] if id_column else None
    return Inputs(ids or [str(i) for i in range(len(values))], x, y)


def normalise(pixels, extra: dict[str, Any]):
    """uint8 pixels (N, C, H, W) -> the model's inputs: p / 255, then (x - mean) / std per channel, the
    same arithmetic the training data used (so the validation files score exactly as in training)."""
    import torch

    norm = extra.get("normalise") or {}
    mean, std = norm.get("mean") or [0.0], norm.get("std") or [1.0]
    x = pixels.float() / 255.0
    if len(mean) == 1:
        return (x - mean[0]) / std[0]
    c = len(mean)
    return (x - torch.tensor(mean).view(1, c, 1, 1)) / torch.tensor(std).view(1, c, 1, 1)


def _check_shape(path: Path, shape: tuple[int, ...], want: tuple[int, ...]) -> None:
    if tuple(shape) != tuple(want):
        raise DgtrainError(
            f"{path}: images of shape {tuple(shape)} (channels, height, width), but the model was trained on "
            f"{tuple(want)}. Give images of the training size and channels, or a folder of PNG/JPEG files "
            "(those are converted and resized)."
        )


def read_image_folder(path: Path, extra: dict[str, Any], in_shape: tuple[int, ...]) -> Inputs:
    import numpy as np
    import torch

    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise DgtrainError(
            f"{path}: reading image files needs Pillow, which is not installed: pip install 'dgtrain[images]'."
        ) from e
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DgtrainError(f"{path}: no .png, .jpg or .jpeg files in this folder.")
    c, h, w = in_shape
    mode = "L" if c == 1 else "RGB"
    if c not in (1, 3):
        raise DgtrainError(f"{path}: the model takes {c}-channel inputs; image files give 1 or 3 channels.")
    ids, arrays, skipped = [], [], []
    for f in files:
        try:
            with Image.open(f) as im:
                im = im.convert(mode)
                if im.size != (w, h):
                    im = im.resize((w, h), Image.Resampling.BILINEAR)
                a = np.asarray(im, dtype=np.uint8)
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
            skipped.append(f"{f}: {e}")
            continue
        arrays.append(a[None] if c == 1 else a.transpose(2, 0, 1))
        ids.append(f.name)
    if not arrays:
        raise DgtrainError(
            f"{path}: none of the {len(files)} image files could be read; see the messages above."
        )
    pixels = torch.from_numpy(np.stack(arrays))
    return Inputs(ids, normalise(pixels, extra), None, skipped)


def read_idx(path: Path, labels: Path | None, extra: dict[str, Any], in_shape: tuple[int, ...]) -> Inputs:
    import torch

    from dgtrain.data.images import _read_idx

    images = _read_idx(path, 3)
    _check_shape(path, (1, *images.shape[1:]), in_shape)
    x = normalise(torch.from_numpy(images.copy()).unsqueeze(1), extra)
    y = None
    if labels is not None:
        lab = _read_idx(labels, 1)
        if len(lab) != len(images):
            raise DgtrainError(f"{labels}: {len(lab)} labels for {len(images)} images in {path}.")
        y = torch.from_numpy(lab.astype("int64"))
    return Inputs([str(i) for i in range(len(x))], x, y)


def read_cifar(path: Path, extra: dict[str, Any], in_shape: tuple[int, ...]) -> Inputs:
    import torch

    from dgtrain.data.images import _read_cifar_batch

    data, labels = _read_cifar_batch(path)
    _check_shape(path, data.shape[1:], in_shape)
    x = normalise(torch.from_numpy(data.copy()), extra)
    return Inputs([str(i) for i in range(len(x))], x, torch.from_numpy(labels))


def read_inputs(path: Path, run, args) -> Inputs:
    image_model = len(run.info.get("in_shape") or ()) == 3
    if args.labels and not (image_model and path.is_file() and _is_idx(path)):  # else ignored, silently
        raise DgtrainError(
            f"--labels={args.labels}: labels go with an idx image file; {path} carries its own targets (the "
            "target column of a CSV, a CIFAR batch's labels) or none (a folder of images)."
        )
    return _read_inputs(path, run, args)


def _is_idx(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    return head[:3] == b"\x00\x00\x08" or path.suffix == ".gz"


def _read_inputs(path: Path, run, args) -> Inputs:
    extra, in_shape = run.extra, tuple(run.info.get("in_shape") or ())
    if not path.exists():
        raise DgtrainError(f"{path}: no such file or folder.")
    if path.is_dir():
        if len(in_shape) != 3:
            raise DgtrainError(f"{path}: a folder of images, but this model takes inputs shaped {in_shape}.")
        return read_image_folder(path, extra, in_shape)
    if len(in_shape) == 1:  # a tabular model: any file is a table, read as training read data.path
        delimiter = args.delimiter
        if delimiter is None:  # the separator training was told (data=csv), else detected as training does
            delimiter = run.cfg.data.get("delimiter")
        return read_csv(path, extra, in_shape[0], args.id_column, delimiter)
    if path.suffix.lower() == ".csv" or path.name.lower().endswith(".csv.gz"):
        raise DgtrainError(
            f"{path}: a CSV file, but this model takes images shaped {in_shape}; give a folder of images, "
            "an idx file or a CIFAR batch."
        )
    if len(in_shape) != 3:
        raise DgtrainError(
            f"{path}: this model takes inputs shaped {in_shape}; predict reads tables and images."
        )
    if _is_idx(path):
        return read_idx(path, Path(args.labels) if args.labels else None, extra, in_shape)
    with path.open("rb") as f:
        head = f.read(1)
    if head == b"\x80":  # a pickle: a CIFAR-10 python batch
        return read_cifar(path, extra, in_shape)
    raise DgtrainError(
        f"{path}: not a CSV, idx or CIFAR-10 batch file (and not a folder of images). "
        "Give one of those; image files go in a folder."
    )


# -------------------------------------------------------------------------------------------- scoring


def predict(
    run, inputs: Inputs, batch_size: int, top_k: int
) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """One output row per input; metrics (as `dgtrain eval` computes them) when the targets are known."""
    import torch

    from dgtrain.train import autocast_for, precision_of

    s, extra = run.setup, run.extra
    autocast = autocast_for(s.device, precision_of(run.cfg))
    n = len(inputs.x)
    batches = [(inputs.x[i : i + batch_size],) for i in range(0, n, batch_size)]
    outs = []
    with torch.no_grad():
        for (xb,) in batches:
            with autocast():
                outs.append(s.model(xb.to(s.device)).float().cpu())
    out = torch.cat(outs)
    rows: list[dict[str, Any]] = []
    if run.info["task"] == "classification":
        names = extra.get("class_names") or [str(i) for i in range(out.shape[1])]
        probs = out.softmax(-1)
        k = min(top_k, probs.shape[1])
        top = probs.topk(k, dim=-1)
        for i in range(n):
            p = probs[i].tolist()
            row: dict[str, Any] = {"id": inputs.ids[i], "pred": names[int(top.indices[i, 0])]}
            row["probs"] = {name: p[j] for j, name in enumerate(names)}
            row["top_k"] = [
                [names[int(j)], float(v)] for v, j in zip(top.values[i], top.indices[i], strict=True)
            ]
            rows.append(row)
    else:
        targets = extra.get("target_names") or [f"y{j}" for j in range(out.shape[1])]
        if "y_mean" in extra:  # back to the units of the training file
            out = out * torch.tensor(extra["y_std"]) + torch.tensor(extra["y_mean"])
        for i in range(n):
            rows.append(
                {"id": inputs.ids[i], **{f"{t}_pred": float(v) for t, v in zip(targets, out[i], strict=True)}}
            )
    metrics: dict[str, float] = {}
    if inputs.y is not None and n:
        from dgtrain.train import to_device

        ys = [inputs.y[i : i + batch_size] for i in range(0, n, batch_size)]
        pairs = [(b[0], y) for b, y in zip(batches, ys, strict=True)]
        metrics = s.task.evaluate(s.model, to_device(pairs, s.device), s.loss_fn, autocast)
    return rows, metrics


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    flat = []
    for r in rows:
        f = {k: v for k, v in r.items() if k not in ("probs", "top_k")}
        for name, p in r.get("probs", {}).items():
            f[f"p_{name}"] = p
        for j, (name, p) in enumerate(r.get("top_k", []), start=1):
            f[f"top{j}"], f[f"top{j}_p"] = name, p
        flat.append(f)
    w = csv.DictWriter(buf, fieldnames=list(flat[0]) if flat else ["id"], lineterminator="\n")
    w.writeheader()
    w.writerows(flat)
    return buf.getvalue()


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.top_k < 1:
        raise DgtrainError(f"--top-k={args.top_k}: must be at least 1.")
    if args.batch_size is not None and args.batch_size < 1:
        raise DgtrainError(f"--batch-size={args.batch_size}: must be at least 1.")
    fmt = args.format or ("jsonl" if args.out and Path(args.out).suffix in (".jsonl", ".json") else "csv")
    out = Path(args.out) if args.out else None
    if out is not None:  # checked before anything is scored
        if out.is_dir():
            raise DgtrainError(f"--out={out} is a folder; give a file name (pred.csv, pred.jsonl).")
        if not out.parent.is_dir():
            raise DgtrainError(f"--out={out}: the folder {out.parent} does not exist.")
    from dgtrain.runs import load_run

    run = load_run(Path(args.source), args.device, tuple(args.allow_target), data=False)
    task = run.info["task"]
    if task not in ("regression", "classification"):
        hint = "dgtrain sample" if task in ("lm", "seq2seq") else "dgtrain eval"
        raise DgtrainError(
            f"{args.source}: a {task} model; dgtrain predict scores regression and "
            f"classification models. Use {hint}."
        )
    inputs = read_inputs(Path(args.input), run, args)
    for msg in inputs.skipped:
        print(f"dgtrain predict: skipped {msg}", file=sys.stderr)
    batch_size = args.batch_size or int(run.cfg.data.batch_size)
    rows, metrics = predict(run, inputs, batch_size, args.top_k)
    text = "".join(json.dumps(r) + "\n" for r in rows) if fmt == "jsonl" else _csv_text(rows)
    if out is not None:
        from dgtrain.checkpoint import write_output

        write_output(out, lambda f: f.write(text.encode()))  # a file: all or nothing; a link or pipe: through
        print(f"{len(rows)} predictions -> {out}", file=sys.stderr)
    else:
        sys.stdout.write(text)
    if inputs.skipped:
        print(f"{len(inputs.skipped)} file(s) skipped (see above)", file=sys.stderr)
    for k, v in metrics.items():  # the task's validation metrics, here of the input's rows
        name = k.removeprefix("val/")
        print(f"{name:<8} {v:.6g}" if math.isfinite(v) else f"{name:<8} {v}", file=sys.stderr)
    return 0
