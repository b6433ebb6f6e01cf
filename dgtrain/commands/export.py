"""`dgtrain export RUN_DIR --format pt2|onnx|torchscript [--out DIR]`: the trained model as a file that
runs without dgtrain.

- pt2: `torch.export` with a dynamic batch dimension (and a dynamic sequence dimension for the
  transformer); load with `torch.export.load(path).module()`.
- onnx: `torch.onnx.export(..., dynamo=True)`, same dynamic dimensions; needs `pip install 'dgtrain[export]'`
  (onnx, onnxscript; onnxruntime for the runtime check).
- torchscript: `torch.jit.trace`; load with `torch.jit.load(path)`.

Every export is checked before it is kept: the exported model runs on a validation batch (and on a
smaller one, with a shorter sequence for the transformer, to exercise the dynamic dimensions) against the
eager model; the largest absolute difference is printed, and one over `--atol` fails the export with
nothing written. ONNX files are also run through onnxruntime when it is installed. The export directory
holds the model file, `export.json` (inputs, shapes, dtypes, normalisation, vocabulary or class names,
the check's numbers) and `README.md` with loading code.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from dgtrain.commands import add_run_options
from dgtrain.errors import DgtrainError

FORMATS = {"pt2": "model.pt2", "onnx": "model.onnx", "torchscript": "model.ts"}
EXPORT_FILES = {*FORMATS.values(), "export.json", "README.md"}  # what a folder of an earlier export holds


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dgtrain export",
        description="Export a trained model (pt2, ONNX or TorchScript), checked against the eager model.",
    )
    p.add_argument("source", help="a run directory, a checkpoint (.pt) or a model.safetensors")
    p.add_argument("--format", required=True, choices=tuple(FORMATS), help="pt2 | onnx | torchscript")
    p.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="a new or empty folder, or an earlier export's, which is replaced (default: RUN_DIR/export/<format>)",
    )
    p.add_argument(
        "--atol", type=float, default=1e-4, help="largest allowed |export - eager| (default: 1e-4)"
    )
    add_run_options(p, device=False)
    return p


# ---------------------------------------------------------------------------------------- what to trace


def model_io(run) -> tuple[Any, tuple, list[str], list[dict[int, str]], tuple]:
    """(module to export, example inputs from a validation batch, input names, dynamic dims per input,
    a second, smaller input set that exercises the dynamic dimensions)."""
    import torch

    s = run.setup
    model = s.model.to("cpu").eval()
    batch = next(iter(s.val_loader))
    task = run.info["task"]
    if task == "seq2seq":

        class Seq2Seq(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, src, tgt_in):
                return self.m(src, tgt_in)

        src, tgt = batch
        args = (src, tgt[:, :-1])
        small = (src[: max(2, len(src) // 2), : max(2, src.shape[1] - 1)], tgt[: max(2, len(src) // 2), :2])
        dims = [{0: "batch", 1: "src_len"}, {0: "batch", 1: "tgt_len"}]
        return Seq2Seq(model), args, ["src", "tgt_in"], dims, small
    x = batch[0]
    if len(x) < 2:
        raise DgtrainError(
            "the validation batch holds one example; export needs two to trace a dynamic batch."
        )
    if task == "lm":
        return (
            model,
            (x,),
            ["tokens"],
            [{0: "batch", 1: "seq"}],
            (x[: len(x) // 2, : max(2, x.shape[1] // 2)],),
        )
    return model, (x,), ["input"], [{0: "batch"}], (x[: len(x) // 2],)


def _dynamic_shapes(run, dims: list[dict[int, str]]):
    import torch

    # sequences up to the trained context (data.seq_len for text): longer ones meet untrained positions
    max_pos = min(
        int(getattr(run.model, "max_positions", 0) or 0), int(run.info.get("max_len") or 0) or 10**9
    )
    made: dict[str, Any] = {}

    def dim(name: str):
        if name not in made:
            top = (
                max_pos - 1 if name == "tgt_len" else max_pos
            )  # the decoder input drops the target's last token
            made[name] = (
                torch.export.Dim(name, min=1, max=top)
                if name != "batch" and max_pos
                else torch.export.Dim(name)
            )
        return made[name]

    return tuple({axis: dim(name) for axis, name in d.items()} for d in dims)


# ------------------------------------------------------------------------------------------- exporters


def _export_pt2(module, args, names, dynamic, path: Path):
    import torch

    ep = torch.export.export(module, args, dynamic_shapes=dynamic)
    torch.export.save(ep, str(path))
    loaded = torch.export.load(str(path)).module()
    return lambda *a: loaded(*a)


def _export_torchscript(module, args, names, dynamic, path: Path):
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about python-level shape checks
        traced = torch.jit.trace(module, args, check_trace=False)
        traced.save(str(path))
        loaded = torch.jit.load(str(path))
    return lambda *a: loaded(*a)


def _export_onnx(module, args, names, dynamic, path: Path):
    missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
    if missing:
        raise DgtrainError(
            f"--format onnx needs {' and '.join(missing)}, not installed here: pip install 'dgtrain[export]' "
            "(or export --format pt2, which needs nothing more)."
        )
    import io
    import logging
    import warnings
    from contextlib import redirect_stdout

    import torch

    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" and the like
    try:
        with warnings.catch_warnings(), redirect_stdout(io.StringIO()):  # the exporter's progress lines
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                module,
                args,
                dynamo=True,
                input_names=names,
                output_names=["output"],
                dynamic_shapes=dynamic,
                external_data=False,
            )
            program.save(str(path))
    finally:
        onnx_log.setLevel(level)
    import onnx

    onnx.checker.check_model(str(path))
    if importlib.util.find_spec("onnxruntime") is None:
        return None  # nothing to run it with: the checker has passed
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(*a):
        feeds = {n: t.numpy() for n, t in zip(names, a, strict=True)}
        return torch.from_numpy(np.asarray(session.run(None, feeds)[0]))

    return run


EXPORTERS = {"pt2": _export_pt2, "onnx": _export_onnx, "torchscript": _export_torchscript}


def max_abs_diff(fn, module, inputs: tuple) -> float:
    import torch

    with torch.no_grad():
        want = module(*inputs).float()
        got = fn(*inputs)
        got = (got[0] if isinstance(got, tuple | list) else got).float()
    if got.shape != want.shape:
        return float("inf")
    return float((got - want).abs().max())


# ---------------------------------------------------------------------------------------------- sidecar


def sidecar(run, fmt: str, names, args, dims, checks: dict[str, Any]) -> dict[str, Any]:
    import torch

    extra, info = run.extra, run.info
    inputs = []
    for name, a, d in zip(names, args, dims, strict=True):
        shape = [d.get(i, int(n)) for i, n in enumerate(a.shape)]
        inputs.append({"name": name, "shape": shape, "dtype": str(a.dtype).removeprefix("torch.")})
    side: dict[str, Any] = {
        "format": fmt,
        "file": FORMATS[fmt],
        "task": info["task"],
        "inputs": inputs,
        "output": {"name": "output", "meaning": _meaning(info["task"])},
        "check": checks,
        "torch": str(torch.__version__),
        "source": run.weights_name,
    }
    if "normalise" in extra:
        side["normalisation"] = {
            "pixels": "x = (p / 255 - mean[c]) / std[c] for a pixel p in 0..255 of channel c",
            **extra["normalise"],
        }
    if "x_mean" in extra:
        side["normalisation"] = {
            "features": "x = (value - x_mean) / x_std, columns in the order of feature_names",
            **{k: extra[k] for k in ("feature_names", "x_mean", "x_std")},
        }
        if "y_mean" in extra:  # regression; a classifier's targets are classes (class_names)
            side["normalisation"]["targets"] = "y = output * y_std + y_mean"
            side["normalisation"].update({k: extra[k] for k in ("target_names", "y_mean", "y_std")})
    elif "feature_names" in extra:
        side["feature_names"] = extra["feature_names"]
    if "class_names" in extra:
        side["class_names"] = extra["class_names"]
    if info["task"] == "lm":
        if extra.get("level"):
            side["vocabulary"] = {"level": extra["level"], "chars": extra.get("vocab")}
        else:  # data=tokens: the ids of a tokenizer dgtrain does not keep
            side["vocabulary"] = {"level": "ids", "vocab_size": info.get("vocab_size")}
        side["context"] = info.get("max_len")
    if info["task"] == "seq2seq":
        side["tokens"] = {k: info[k] for k in ("pad_id", "bos_id", "eos_id", "vocab_size")}
        side["tokens"]["first_symbol"] = extra.get("first_symbol")
    return side


def _meaning(task: str) -> str:
    return {
        "classification": "class logits (softmax gives probabilities), shape (batch, classes)",
        "regression": "standardised predictions, shape (batch, targets)",
        "lm": "next-token logits, shape (batch, seq, vocab)",
        "seq2seq": "logits for each target position (teacher forcing), shape (batch, tgt_len, vocab)",
    }[task]


def readme(side: dict[str, Any]) -> str:
    fmt, f = side["format"], side["file"]
    shapes = ", ".join(f"{i['name']}: {i['shape']} {i['dtype']}" for i in side["inputs"])
    example = ", ".join(
        f"torch.zeros({', '.join(str(d if isinstance(d, int) else 2) for d in i['shape'])}, dtype=torch.{i['dtype']})"
        for i in side["inputs"]
    )
    if fmt == "pt2":
        load = f'import torch\n\nmodel = torch.export.load("{f}").module()\nout = model({example})'
    elif fmt == "torchscript":
        load = f'import torch\n\nmodel = torch.jit.load("{f}")\nout = model({example})'
    else:
        feeds = ", ".join(
            f'"{i["name"]}": np.zeros(({", ".join(str(d if isinstance(d, int) else 2) for d in i["shape"])},), '
            f"dtype=np.{i['dtype']})"
            for i in side["inputs"]
        )
        load = (
            f'import numpy as np\nimport onnxruntime as ort\n\nsession = ort.InferenceSession("{f}")\n'
            f"out = session.run(None, {{{feeds}}})[0]"
        )
    return (
        f"# {f} ({fmt}, exported by dgtrain)\n\n"
        f"Task: {side['task']}. Inputs: {shapes} (named dimensions are dynamic).\n"
        f"Output: {side['output']['meaning']}.\n"
        "Preprocessing, class names and vocabulary: see export.json (`normalisation`, `class_names`, "
        "`vocabulary`).\n\n"
        f"Load it without dgtrain:\n\n```python\n{load}\n```\n\n"
        f"Checked against the eager model: max |export - eager| = {side['check']['max_abs_diff']:.3g} "
        f"(tolerance {side['check']['atol']:g}).\n"
    )


# ------------------------------------------------------------------------------------------------ main


def check_out(out: Path) -> None:
    """`out` is replaced as a whole, so it must be new, empty, or an earlier export (only the files an
    export writes): never a file, never a folder holding anything else (`--out .` would delete it)."""
    if out.exists() and not out.is_dir():
        raise DgtrainError(
            f"--out={out} is a file; export writes a folder (the model file, export.json, README.md). "
            "Give the path of a new folder."
        )
    if out.is_dir():
        others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES)
        if others or (any(out.iterdir()) and not (out / "export.json").is_file()):
            listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise DgtrainError(
                f"--out={out} already holds files that are not an earlier export ({listed or 'no export.json'}); "
                "export replaces the whole folder it writes. Give a new folder, an empty one, or an earlier "
                "export's folder."
            )


def export_run(run, fmt: str, out: Path, atol: float, log=print) -> dict[str, Any]:
    """Export into a temporary folder next to `out`, check, then move it into place: a failed export
    leaves nothing behind (and an existing `out` untouched). `out` must be new, empty or an earlier
    export (`check_out`)."""
    check_out(out)
    module, args, names, dims, small = model_io(run)
    dynamic = _dynamic_shapes(run, dims)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    from dgtrain.checkpoint import _UMASK

    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes it 0700: the export is shared like the rest of the run
    try:
        try:
            fn = EXPORTERS[fmt](module, args, names, dynamic, tmp / FORMATS[fmt])
        except DgtrainError:
            raise
        except Exception as e:  # noqa: BLE001 - the exporters raise many kinds; the user needs the message
            msg = str(e).strip().splitlines()
            raise DgtrainError(
                f"--format {fmt}: the exporter failed on this model ({type(e).__name__}: "
                f"{(msg[0] if msg else '')[:300]}). Try another --format."
            ) from e
        checks: dict[str, Any] = {"atol": atol, "batches": []}
        if fn is None:
            checks["runtime"] = "onnx.checker only (onnxruntime is not installed)"
            worst = 0.0
            log("onnxruntime not installed: the file passed onnx.checker, but was not run")
        else:
            if fmt == "onnx":
                checks["runtime"] = "onnxruntime (CPUExecutionProvider)"
            worst = 0.0
            for inputs in (args, small):
                d = max_abs_diff(fn, module, inputs)
                shapes = [list(t.shape) for t in inputs]
                checks["batches"].append({"shapes": shapes, "max_abs_diff": d})
                log(f"check {fmt}: inputs {shapes}  max |export - eager| = {d:.3g}")
                worst = max(worst, d)
        checks["max_abs_diff"] = worst
        if not worst <= atol:
            raise DgtrainError(
                f"--format {fmt}: the exported model differs from the eager model by {worst:.3g} "
                f"(over --atol={atol:g}); nothing was kept. Raise --atol if that is acceptable."
            )
        side = sidecar(run, fmt, names, args, dims, checks)
        (tmp / "export.json").write_text(json.dumps(side, indent=2) + "\n")
        (tmp / "README.md").write_text(readme(side))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        return side
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not args.atol >= 0:
        raise DgtrainError(f"--atol={args.atol}: must be >= 0.")
    if args.out:
        check_out(Path(args.out))  # before the run is loaded and its data rebuilt
    from dgtrain.runs import load_run, out_dir

    run = load_run(Path(args.source), "cpu", tuple(args.allow_target))  # exports are traced on the CPU
    out = Path(args.out) if args.out else out_dir(run, "export") / args.format
    side = export_run(run, args.format, out, args.atol)
    print(f"exported {out / side['file']} (+ export.json, README.md)")
    print(f"max |export - eager| = {side['check']['max_abs_diff']:.3g} <= {args.atol:g}", file=sys.stderr)
    return 0
