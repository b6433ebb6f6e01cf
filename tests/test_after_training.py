"""The after-training commands on real (tiny) trained runs: `dgtrain sample`, `predict`, `export`, `explain`.

The runs are trained once per module, in-process; each command runs in-process through its `main`
(the CLI wiring is covered by one subprocess test at the end)."""

from __future__ import annotations

import csv
import importlib.util
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from dgtrain.errors import DgtrainError
from tests.conftest import run_cli

FAST = [
    "device=cpu",
    "trainer.log_every=5",
    "logger=console",
    "logger.console.mode=plain",
    "telemetry.enabled=false",
]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """train(name, overrides) -> run dir; each (name) trains once per module."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from dgtrain.config import register_schema
    from dgtrain.paths import config_dir
    from dgtrain.recipes import register_recipes
    from dgtrain.train import fit

    register_schema()
    register_recipes()
    root = tmp_path_factory.mktemp("runs")
    done: dict[str, Path] = {}

    def train(name: str, overrides: list[str]) -> Path:
        if name not in done:
            GlobalHydra.instance().clear()
            with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
                cfg = compose(config_name="train", overrides=FAST + overrides)
            GlobalHydra.instance().clear()
            fit(cfg, root / name)
            done[name] = root / name
        return done[name]

    return train


def lm_run(trained, tmp_path_factory=None) -> Path:
    return trained(
        "lm",
        [
            "model=transformer",
            "data=text",
            "data.max_chars=20000",
            "data.seq_len=32",
            "model.d_model=32",
            "model.n_layers=2",
            "trainer.max_steps=30",
            "trainer.eval_batches=2",
            "trainer.sample_every=15",
        ],
    )


def s2s_run(trained) -> Path:
    return trained(
        "s2s", ["model=transformer", "data.num_examples=400", "model.d_model=32", "trainer.max_steps=20"]
    )


def tab_csv(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3)) * [1.0, 5.0, 0.1] + [0.0, 10.0, 3.0]
    y = x @ [1.5, -0.4, 8.0] + rng.normal(size=200) * 0.2
    path = folder / "train.csv"
    with path.open("w") as f:
        f.write("a,b,c,y\n")
        for r, t in zip(x, y, strict=True):
            f.write(",".join(f"{v:.5f}" for v in [*r, t]) + "\n")
    return path


def tab_run(trained, tmp_path_factory, model="mlp") -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tab")
    data = tab_csv(folder)
    run = trained(
        f"tab_{model}",
        [f"model={model}", "data=csv", f"data.path={data}", "data.target=y", "trainer.max_steps=40"],
    )
    return run, data


def _idx(array: np.ndarray) -> bytes:
    return (
        struct.pack(">I", 0x0800 + array.ndim)
        + struct.pack(f">{array.ndim}I", *array.shape)
        + array.tobytes()
    )


def mnist_run(trained, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mnist")
    rng = np.random.default_rng(1)
    for name, shape in (("train", 120), ("t10k", 70)):
        (root / f"{name}-images-idx3-ubyte").write_bytes(
            _idx(rng.integers(0, 256, (shape, 12, 12), dtype=np.uint8))
        )
        (root / f"{name}-labels-idx1-ubyte").write_bytes(_idx(rng.integers(0, 10, (shape,), dtype=np.uint8)))
    run = trained(
        "mnist",
        ["model=convnet", "data=mnist", f"data.root={root}", "data.batch_size=32", "trainer.max_steps=8"],
    )
    return run, root


def digits_run(trained) -> Path:
    return trained("digits", ["model=convnet", "trainer.max_steps=30"])


def run_main(module: str, argv: list[str], capsys) -> tuple[int, str, str]:
    import importlib

    capsys.readouterr()  # drop what came before (a training run's console output)
    code = importlib.import_module(f"dgtrain.commands.{module}").main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------------ sample


def test_sample_same_seed_same_text_and_prompt_is_continued(trained, capsys):
    run = lm_run(trained)
    argv = [str(run), "--prompt", "The ", "--max-new-tokens", "40", "--device", "cpu"]
    _, a, _ = run_main("sample", argv + ["--seed", "7"], capsys)
    _, b, _ = run_main("sample", argv + ["--seed", "7"], capsys)
    _, c, _ = run_main("sample", argv + ["--seed", "8"], capsys)
    assert a == b and a != c
    assert a.startswith("The ") and len(a.rstrip("\n")) == 4 + 40  # char level: one token, one character
    _, nocache, _ = run_main("sample", argv + ["--seed", "7", "--no-cache"], capsys)
    assert nocache == a


def test_kv_cache_generates_what_full_recompute_generates(trained):
    from dgtrain.generation import generate_lm
    from dgtrain.runs import load_run

    model = load_run(lm_run(trained), "cpu", data=False).model
    prompt = torch.tensor([[1, 2, 3], [4, 5, 6]])
    for kw in ({"temperature": 0}, {"temperature": 1.0, "top_k": 8}, {"temperature": 0.9, "top_p": 0.8}):
        # block=16 with 60 new tokens: the context window restarts several times along the way
        outs = [
            generate_lm(
                model, prompt, 60, block=16, use_cache=c, generator=torch.Generator().manual_seed(3), **kw
            )
            for c in (True, False)
        ]
        assert torch.equal(outs[0], outs[1]), kw
    # and the cached logits match a full forward pass
    cache: list = []
    model.decode(prompt, cache=cache)
    step = model.decode(torch.tensor([[7], [8]]), cache=cache)[:, -1]
    full = model.decode(torch.cat([prompt, torch.tensor([[7], [8]])], dim=1))[:, -1]
    torch.testing.assert_close(step, full, atol=1e-5, rtol=1e-5)


def test_temperature_zero_is_greedy(trained):
    from dgtrain.generation import generate_lm
    from dgtrain.runs import load_run

    model = load_run(lm_run(trained), "cpu", data=False).model
    prompt = torch.tensor([[5, 6, 7]])
    greedy = prompt
    with torch.no_grad():
        for _ in range(20):  # argmax of a full forward pass, by hand
            greedy = torch.cat([greedy, model(greedy)[:, -1].argmax(-1, keepdim=True)], dim=1)
    out = generate_lm(model, prompt, 20, temperature=0, block=32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, greedy)
    top1 = generate_lm(
        model, prompt, 20, temperature=1.3, top_k=1, block=32, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(top1, greedy)


def test_sample_every_logs_text_and_vocab_is_stored(trained):
    run = lm_run(trained)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    texts = [r["sample/text"] for r in rows if "sample/text" in r]
    assert [r["step"] for r in rows if "sample/text" in r] == [15, 30]
    assert all(isinstance(t, str) and len(t) == 200 for t in texts)
    info = json.loads((run / "data_info.json").read_text())
    assert info["extra"]["level"] == "char" and set("".join(texts)) <= set(info["extra"]["vocab"])


def test_byte_vocabulary_streams_split_utf8_characters_whole():
    from dgtrain.generation import Vocab

    v = Vocab.from_extra({"level": "byte"})
    ids = v.encode("caf\u00e9 \u2603")
    assert len(v) == 256 and len(ids) == 9 and v.decode(ids) == "caf\u00e9 \u2603"
    stream = v.decoder()
    pieces = [stream([i]) for i in ids]  # one token at a time, as `dgtrain sample` prints them
    assert "".join(pieces) == "caf\u00e9 \u2603" and "\ufffd" not in "".join(pieces)
    assert pieces[3] == "" and pieces[4] == "\u00e9"  # the first byte of \u00e9 waits for the second


def test_sample_bad_input_exits_2(trained, capsys):
    run = str(lm_run(trained))
    with pytest.raises(DgtrainError, match="does not contain"):
        run_main("sample", [run, "--prompt", "caf\u00e9 \u2603"], capsys)
    with pytest.raises(DgtrainError, match="--top-p"):
        run_main("sample", [run, "--top-p", "1.5"], capsys)
    with pytest.raises(DgtrainError, match="seq2seq"):
        run_main("sample", [run, "--input", "1 2 3"], capsys)


def test_sample_seq2seq_greedy_and_beam(trained, capsys):
    from dgtrain.generation import beam_search
    from dgtrain.runs import load_run

    run = s2s_run(trained)
    code, out, _ = run_main(
        "sample", [str(run), "--input", "3 1 4 1 5", "--beam", "3", "--device", "cpu"], capsys
    )
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("input   3 1 4 1 5")
    assert lines[1].startswith("greedy ") and [x.split()[0] for x in lines[2:]] == ["beam"] * 3
    model = load_run(run, "cpu", data=False).model
    src = torch.tensor([[6, 4, 7, 4, 8, 2]])
    assert (
        beam_search(model, src, 1, 10)[0][0]
        == [t for t in model.generate(src, 10)[0].tolist()][: len(beam_search(model, src, 1, 10)[0][0])]
    )
    with pytest.raises(DgtrainError, match="0..9"):
        run_main("sample", [str(run), "--input", "3 99"], capsys)


# ----------------------------------------------------------------------------------------------- predict


def test_predict_csv_scores_the_validation_split_exactly_as_eval(trained, tmp_path_factory, tmp_path, capsys):
    from dgtrain.commands.predict import predict, read_csv
    from dgtrain.data import split_indices
    from dgtrain.evaluate import evaluate_source
    from dgtrain.runs import load_run

    run_dir, data = tab_run(trained, tmp_path_factory)
    lines = data.read_text().splitlines()
    _, val_idx = split_indices(len(lines) - 1, 0.2, 0)
    val_csv = tmp_path / "val.csv"
    val_csv.write_text("\n".join([lines[0]] + [lines[1 + i] for i in val_idx.tolist()]) + "\n")

    run = load_run(run_dir, "cpu", data=False)
    inputs = read_csv(val_csv, run.extra, 3, None)
    _, metrics = predict(run, inputs, int(run.cfg.data.batch_size), 3)
    assert metrics == evaluate_source(run_dir, "cpu")["metrics"]  # exactly, not approximately

    out = tmp_path / "pred.csv"
    assert (
        run_main("predict", [str(run_dir), str(val_csv), "--out", str(out), "--device", "cpu"], capsys)[0]
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == len(val_idx) and set(rows[0]) == {"id", "y_pred"}
    # predictions are in the training file's units (standardisation undone): close to the true y
    true_y = np.array([float(lines[1 + i].split(",")[3]) for i in val_idx.tolist()])
    pred_y = np.array([float(r["y_pred"]) for r in rows])
    assert np.corrcoef(true_y, pred_y)[0, 1] > 0.9


def test_predict_csv_uses_the_stored_standardisation_and_needs_no_training_file(
    trained, tmp_path_factory, tmp_path, capsys
):
    run_dir, data = tab_run(trained, tmp_path_factory, model="linreg")
    one = tmp_path / "one.csv"
    one.write_text("c,a,b,extra\n3.0,0.5,10.0,x\n")  # any column order; unused columns ignored
    moved = data.with_suffix(".moved")
    data.rename(moved)  # the training CSV is gone: nothing is recomputed from it
    try:
        code, out, _ = run_main(
            "predict", [str(run_dir), str(one), "--format", "jsonl", "--device", "cpu"], capsys
        )
    finally:
        moved.rename(data)
    info = json.loads((run_dir / "data_info.json").read_text())["extra"]
    from safetensors.torch import load_file

    w = load_file(str(run_dir / "model.safetensors"))
    x = (np.array([0.5, 10.0, 3.0]) - info["x_mean"]) / info["x_std"]
    want = (x @ w["linear.weight"].numpy()[0] + w["linear.bias"].numpy()[0]) * info["y_std"][0] + info[
        "y_mean"
    ][0]
    assert code == 0 and json.loads(out)["y_pred"] == pytest.approx(want, rel=1e-5)


def test_predict_csv_re_encodes_the_text_columns_training_one_hot_encoded(
    trained, tmp_path_factory, tmp_path, capsys
):
    """data.categorical=auto one-hot encodes a text column in training; predict reads the raw column
    (`city`, not `city=Oslo`, ...) and encodes it the same way: the validation rows score exactly as
    `dgtrain eval`, and a city training never saw gives zeros in that block instead of an error."""
    from dgtrain.commands.predict import predict, read_csv
    from dgtrain.data import split_indices
    from dgtrain.evaluate import evaluate_source
    from dgtrain.runs import load_run

    rng = np.random.default_rng(3)
    cities = ["Oslo", "Lima", "Pune"]
    data = tmp_path_factory.mktemp("cat") / "train.csv"
    lines = ["a,city,y"]
    for _ in range(150):
        a, c = rng.normal(), int(rng.integers(3))
        lines.append(f"{a:.4f},{cities[c]},{2 * a + 3 * c + rng.normal() * 0.1:.4f}")
    data.write_text("\n".join(lines) + "\n")
    run_dir = trained(
        "tab_categorical",
        ["model=mlp", "data=csv", f"data.path={data}", "data.target=y", "data.categorical=auto"]
        + ["trainer.max_steps=30"],
    )
    _, val_idx = split_indices(len(lines) - 1, 0.2, 0)
    val_csv = tmp_path / "val.csv"  # another column order than training's
    rows = [lines[1 + i].split(",") for i in val_idx.tolist()]
    val_csv.write_text("y,city,a\n" + "".join(f"{y},{c},{a}\n" for a, c, y in rows))
    run = load_run(run_dir, "cpu", data=False)
    inputs = read_csv(val_csv, run.extra, len(run.extra["feature_names"]), None)
    _, metrics = predict(run, inputs, int(run.cfg.data.batch_size), 3)
    assert metrics == evaluate_source(run_dir, "cpu")["metrics"]

    new = tmp_path / "new.csv"
    new.write_text("a,city\n0.5,Oslo\n0.5,Quito\n")
    x = read_csv(new, run.extra, len(run.extra["feature_names"]), None).x
    names = run.extra["feature_names"]
    assert names == ["a", "city=Lima", "city=Oslo", "city=Pune"]
    raw = x * torch.tensor(run.extra["x_std"]) + torch.tensor(run.extra["x_mean"])  # the encoding itself
    torch.testing.assert_close(raw, torch.tensor([[0.5, 0.0, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]]))
    bad = tmp_path / "bad.csv"
    bad.write_text("a\n0.5\n")
    with pytest.raises(DgtrainError, match=r"bad\.csv: missing column\(s\) city\. .* the columns a, city \("):
        read_csv(bad, run.extra, len(names), None)


def test_csv_classification_trains_and_predict_scores_labelled_rows_as_eval(
    trained, tmp_path_factory, tmp_path, capsys
):
    """data=csv with data.task=classification: the MLP learns text labels; predict writes labels and,
    given the label column, scores the validation rows exactly as `dgtrain eval`."""
    from dgtrain.commands.predict import predict, read_csv
    from dgtrain.data import split_indices
    from dgtrain.evaluate import evaluate_source
    from dgtrain.runs import load_run

    rng = np.random.default_rng(5)
    names = ["cat", "dog", "fish"]
    data = tmp_path_factory.mktemp("cls") / "animals.csv"
    lines = ["a,b,c,kind"]
    for _ in range(240):
        x = rng.normal(size=3)
        lines.append(",".join(f"{v:.4f}" for v in x) + f",{names[int(np.argmax(x))]}")
    data.write_text("\n".join(lines) + "\n")
    run_dir = trained(
        "tab_classes",
        ["model=mlp", "data=csv", f"data.path={data}", "data.target=kind", "data.task=classification"]
        + ["trainer.max_steps=60", "optimizer.lr=0.02"],
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final"]["val/acc"] > 0.8  # chance is 1/3
    _, val_idx = split_indices(len(lines) - 1, 0.2, 0)
    val_csv = tmp_path / "val.csv"
    val_csv.write_text("\n".join([lines[0]] + [lines[1 + i] for i in val_idx.tolist()]) + "\n")
    run = load_run(run_dir, "cpu", data=False)
    inputs = read_csv(val_csv, run.extra, 3, None)
    assert inputs.y.dtype == torch.long
    rows, metrics = predict(run, inputs, int(run.cfg.data.batch_size), 2)
    assert metrics == evaluate_source(run_dir, "cpu")["metrics"]
    assert {r["pred"] for r in rows} <= set(names) and set(rows[0]["probs"]) == set(names)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b,c,kind\n0.1,0.2,0.3,bird\n")
    with pytest.raises(DgtrainError, match=r"bad\.csv, line 2: the target 'bird' is not one of the classes"):
        read_csv(bad, run.extra, 3, None)


def test_predict_csv_bad_input_names_the_file(trained, tmp_path_factory, tmp_path, capsys):
    run_dir, _ = tab_run(trained, tmp_path_factory)
    bad = tmp_path / "bad.csv"
    bad.write_text("a,c\n1,2\n")
    with pytest.raises(DgtrainError, match=r"bad\.csv: missing column\(s\) b"):
        run_main("predict", [str(run_dir), str(bad)], capsys)
    bad.write_text("a,b,c\n1,x,2\n")
    with pytest.raises(DgtrainError, match=r"bad\.csv, line 2: a non-numeric"):
        run_main("predict", [str(run_dir), str(bad)], capsys)
    out = tmp_path / "never.csv"
    with pytest.raises(DgtrainError):
        run_main("predict", [str(run_dir), str(tmp_path / "absent.csv"), "--out", str(out)], capsys)
    assert not out.exists()


def _val_rows(data: Path) -> list[str]:
    """The header and the validation split's rows of a training CSV (as its lines)."""
    from dgtrain.data import split_indices

    lines = [line for line in data.read_text(encoding="utf-8-sig").splitlines() if line]  # as read_table
    _, val_idx = split_indices(len(lines) - 1, 0.2, 0)
    return [lines[0]] + [lines[1 + i] for i in val_idx.tolist()]


def _excel(path: Path, lines: list[str], sep: str) -> Path:
    """What Excel in a European locale writes: a byte-order mark, `sep` between fields, CRLF, a blank
    line before the last row."""
    lines = [line.replace(",", sep) for line in lines]
    path.write_bytes(("\r\n".join(lines[:-1] + ["", lines[-1]]) + "\r\n").encode("utf-8-sig"))
    return path


def test_predict_reads_a_csv_as_training_does_bom_separator_gzip(trained, tmp_path_factory, tmp_path, capsys):
    """predict reads its input through training's reader: the validation rows written as Excel does
    (BOM, ';', CRLF, a blank line) or gzipped give exactly the comma file's predictions and eval's metrics;
    the separator is detected as in training, or given by --delimiter (one character, else exit 2)."""
    import gzip

    from dgtrain.commands.predict import predict, read_csv
    from dgtrain.evaluate import evaluate_source
    from dgtrain.runs import load_run

    run_dir, data = tab_run(trained, tmp_path_factory)  # trained on a comma file, data.delimiter unset
    lines = _val_rows(data)
    plain = tmp_path / "val.csv"
    plain.write_text("\n".join(lines) + "\n")
    semi = _excel(tmp_path / "val_semi.csv", lines, ";")
    run = load_run(run_dir, "cpu", data=False)
    inputs = read_csv(semi, run.extra, 3, None)
    _, metrics = predict(run, inputs, int(run.cfg.data.batch_size), 3)
    assert metrics == evaluate_source(run_dir, "cpu")["metrics"]

    def cli(path: Path, *more: str) -> str:
        out = tmp_path / "pred.jsonl"
        code, _, err = run_main(
            "predict", [str(run_dir), str(path), "--out", str(out), "--device", "cpu", *more], capsys
        )
        assert code == 0 and "loss" in err
        return out.read_text()

    want = cli(plain)
    assert len(want.splitlines()) == len(lines) - 1
    assert cli(semi) == want
    gz = tmp_path / "val_semi.csv.gz"
    gz.write_bytes(gzip.compress(semi.read_bytes()))
    assert cli(gz) == want
    tabs = _excel(tmp_path / "val.tsv", lines, "\t")  # any name: a tabular model reads a table
    assert cli(tabs, "--delimiter", "\\t") == cli(tabs) == want
    assert cli(semi, "--delimiter", ";") == want
    ids = [json.loads(r)["id"] for r in cli(semi, "--id-column", "b").splitlines()]
    assert ids == [line.split(",")[1] for line in lines[1:]]  # the text as written, row by row

    with pytest.raises(
        DgtrainError, match=r"val_semi\.csv: missing column\(s\) a, b, c\. .* single field: .*--delimiter"
    ):
        run_main("predict", [str(run_dir), str(semi), "--delimiter", ","], capsys)
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("a;b;c\n1;2;3\n\n1;2\n")
    with pytest.raises(DgtrainError, match=r"ragged\.csv, line 4: 2 fields, expected 3 .*set --delimiter if"):
        run_main("predict", [str(run_dir), str(ragged), "--delimiter", ";"], capsys)
    p = run_cli(["predict", str(run_dir), str(semi), "--delimiter", ";;", "--out", "never.csv"], tmp_path)
    assert p.returncode == 2 and "--delimiter=';;': must be one character" in p.stderr
    assert "Traceback" not in p.stderr and not (tmp_path / "never.csv").exists()


def test_predict_reads_the_input_with_the_runs_data_delimiter(trained, tmp_path_factory, tmp_path, capsys):
    """A run trained with data.delimiter=';' on an Excel file (BOM, ';'): predict on its validation rows,
    in the same format, gives eval's metrics; a comma file needs --delimiter=, (the run's ';' is the
    default), and the error says so."""
    data = _excel(
        tmp_path_factory.mktemp("semi") / "sales.csv", tab_csv(tmp_path).read_text().splitlines(), ";"
    )
    run_dir = trained(
        "tab_semicolon",
        ["model=linreg", "data=csv", f"data.path={data}", "data.target=y", "data.delimiter=';'"]
        + ["trainer.max_steps=20"],
    )
    from dgtrain.evaluate import evaluate_source

    assert json.loads((run_dir / "data_info.json").read_text())["extra"]["feature_names"] == ["a", "b", "c"]
    lines = [line.replace(";", ",") for line in _val_rows(data)]
    val = _excel(tmp_path / "val.csv", lines, ";")
    code, out, err = run_main("predict", [str(run_dir), str(val), "--device", "cpu"], capsys)
    metrics = evaluate_source(run_dir, "cpu")["metrics"]  # as predict prints them
    assert code == 0 and err == "".join(f"{k.removeprefix('val/'):<8} {v:.6g}\n" for k, v in metrics.items())
    assert len(out.splitlines()) == len(lines)  # a header and one row per input row
    comma = tmp_path / "val_comma.csv"
    comma.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        DgtrainError, match=r"val_comma\.csv: missing column\(s\).* single field: .*--delimiter"
    ):
        run_main("predict", [str(run_dir), str(comma)], capsys)
    again = run_main("predict", [str(run_dir), str(comma), "--delimiter", ",", "--device", "cpu"], capsys)
    assert again == (0, out, err)


def test_predict_idx_images_score_exactly_as_eval(trained, tmp_path_factory, tmp_path, capsys):
    from dgtrain.commands.predict import predict, read_idx
    from dgtrain.evaluate import evaluate_source
    from dgtrain.runs import load_run

    run_dir, root = mnist_run(trained, tmp_path_factory)
    run = load_run(run_dir, "cpu", data=False)
    inputs = read_idx(
        root / "t10k-images-idx3-ubyte", root / "t10k-labels-idx1-ubyte", run.extra, (1, 12, 12)
    )
    _, metrics = predict(run, inputs, 32, 3)
    # the t10k files are MNIST's test set: `dgtrain eval --split test` scores the same images
    test = evaluate_source(run_dir, "cpu", split="test")["metrics"]
    assert metrics == {k.replace("test/", "val/", 1): v for k, v in test.items()}

    out = tmp_path / "p.jsonl"
    argv = [
        str(run_dir),
        str(root / "t10k-images-idx3-ubyte"),
        "--out",
        str(out),
        "--top-k",
        "2",
        "--device",
        "cpu",
    ]
    assert run_main("predict", argv, capsys)[0] == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 70 and len(rows[0]["top_k"]) == 2
    assert sum(rows[0]["probs"].values()) == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["pred"] == rows[0]["top_k"][0][0]
    wrong = tmp_path / "wrong-idx3-ubyte"
    wrong.write_bytes(_idx(np.zeros((3, 28, 28), np.uint8)))
    with pytest.raises(DgtrainError, match=r"wrong-idx3-ubyte: images of shape \(1, 28, 28\)"):
        run_main("predict", [str(run_dir), str(wrong)], capsys)


def test_predict_image_folder_skips_a_corrupt_file(trained, tmp_path, capsys):
    from PIL import Image

    from dgtrain.data.images import digits

    run_dir = digits_run(trained)
    val = digits(seed=0).val
    for i in range(5):
        a = (val.x[i, 0].numpy() * 255).round().astype(np.uint8)
        Image.fromarray(a, mode="L").resize((16, 16)).save(tmp_path / f"img{i}.png")  # resized back to 8x8
    Image.fromarray(np.zeros((8, 8, 3), np.uint8), mode="RGB").save(tmp_path / "colour.jpg")  # made grey
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "p.csv"
    code, _, err = run_main(
        "predict", [str(run_dir), str(tmp_path), "--out", str(out), "--device", "cpu"], capsys
    )
    assert code == 0 and "broken.png" in err and "1 file(s) skipped" in err
    rows = list(csv.DictReader(out.open()))
    assert sorted(r["id"] for r in rows) == ["colour.jpg"] + [f"img{i}.png" for i in range(5)]
    assert {"pred", "p_0", "p_9", "top1", "top1_p", "top3"} <= set(rows[0])
    hits = sum(r["pred"] == str(int(val.y[int(r["id"][3])])) for r in rows if r["id"].startswith("img"))
    assert hits >= 3  # the digits survive the PNG round trip


# ------------------------------------------------------------------------------------------------ export


def _export(run_dir: Path, fmt: str, out: Path):
    from dgtrain.commands.export import export_run
    from dgtrain.runs import load_run

    return export_run(load_run(run_dir, "cpu"), fmt, out, 1e-4, log=lambda *_: None)


def test_export_pt2_round_trip_with_dynamic_dims(trained, tmp_path):
    run_dir = digits_run(trained)
    side = _export(run_dir, "pt2", tmp_path / "cnn")
    assert side["check"]["max_abs_diff"] <= 1e-4 and side["inputs"][0]["shape"] == ["batch", 1, 8, 8]
    assert side["normalisation"]["mean"] == [0.0] and side["class_names"][3] == "3"
    from dgtrain.runs import load_run

    model = load_run(run_dir, "cpu", data=False).model
    loaded = torch.export.load(str(tmp_path / "cnn" / "model.pt2")).module()
    x = torch.randn(5, 1, 8, 8)  # a batch size never traced
    torch.testing.assert_close(loaded(x), model(x), atol=1e-5, rtol=1e-5)
    assert "torch.export.load" in (tmp_path / "cnn" / "README.md").read_text()

    lm = lm_run(trained)
    side = _export(lm, "pt2", tmp_path / "lm")
    assert side["inputs"][0]["shape"] == ["batch", "seq"] and side["vocabulary"]["level"] == "char"
    lm_model = load_run(lm, "cpu", data=False).model
    loaded = torch.export.load(str(tmp_path / "lm" / "model.pt2")).module()
    tokens = torch.randint(0, 20, (3, 11))  # another batch and sequence length
    torch.testing.assert_close(loaded(tokens), lm_model(tokens), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(
    importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxscript") is None,
    reason="ONNX export needs the `export` extra (onnx, onnxscript): pip install 'dgtrain[export]'",
)
def test_export_onnx_round_trip(trained, tmp_path):
    run_dir = s2s_run(trained)
    side = _export(run_dir, "onnx", tmp_path / "onnx")
    assert [i["name"] for i in side["inputs"]] == ["src", "tgt_in"]
    assert (tmp_path / "onnx" / "model.onnx").is_file()
    if importlib.util.find_spec("onnxruntime") is None:
        pytest.skip("onnxruntime is not installed: the file passed onnx.checker only")
    import onnxruntime as ort

    from dgtrain.runs import load_run

    assert side["check"]["runtime"].startswith("onnxruntime") and side["check"]["max_abs_diff"] <= 1e-4
    model = load_run(run_dir, "cpu", data=False).model
    src, tgt = torch.randint(3, 13, (3, 7)), torch.randint(3, 13, (3, 5))
    sess = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"))
    got = sess.run(None, {"src": src.numpy(), "tgt_in": tgt.numpy()})[0]
    np.testing.assert_allclose(got, model(src, tgt).detach().numpy(), atol=1e-4)


def test_export_over_tolerance_keeps_nothing(trained, tmp_path, monkeypatch):
    import dgtrain.commands.export as export

    run_dir = digits_run(trained)
    monkeypatch.setattr(export, "max_abs_diff", lambda fn, module, inputs: 0.5)
    with pytest.raises(DgtrainError, match="differs from the eager model by 0.5"):
        _export(run_dir, "torchscript", tmp_path / "ts")
    assert list(tmp_path.iterdir()) == []  # no model file, no temporary folder


def test_export_torchscript_tabular_sidecar_has_the_standardisation(trained, tmp_path_factory, tmp_path):
    run_dir, _ = tab_run(trained, tmp_path_factory)
    side = _export(run_dir, "torchscript", tmp_path / "ts")
    norm = side["normalisation"]
    assert (
        norm["feature_names"] == ["a", "b", "c"]
        and len(norm["x_mean"]) == 3
        and norm["target_names"] == ["y"]
    )
    loaded = torch.jit.load(str(tmp_path / "ts" / "model.ts"))
    assert loaded(torch.zeros(7, 3)).shape == (7, 1)


# ----------------------------------------------------------------------------------------------- explain


def test_explain_convnet_saliency_has_the_image_shape(trained, capsys):
    from PIL import Image

    run_dir = digits_run(trained)
    code, out, _ = run_main("explain", [str(run_dir), "--num", "3", "--device", "cpu"], capsys)
    folder = run_dir / "explain"
    assert code == 0 and f"in {folder}" in out
    for i in range(3):
        for name in ("saliency", "ig"):
            with Image.open(folder / f"{name}_{i}.png") as im:
                assert im.size == (8, 8)
            assert str(folder / f"{name}_{i}.png") in out
    assert (folder / "images.png").stat().st_size > 0
    info = json.loads((folder / "explain.json").read_text())
    assert info["ig_completeness_max_error"] < 0.05  # attributions add up to f(x) - f(baseline)


def test_integrated_gradients_of_a_linear_model_are_exact():
    from dgtrain.commands.explain import integrated_gradients, saliency

    model = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    target = torch.tensor([0, 1, 1])
    ig = integrated_gradients(model, x, target, steps=4)
    torch.testing.assert_close(ig, x * model.weight[target].detach())
    image_model = torch.nn.Sequential(torch.nn.Flatten(), model)  # (N, 1, 2, 2) images
    assert saliency(image_model, x.view(3, 1, 2, 2), target).shape == (3, 2, 2)


def test_explain_transformer_attention_per_layer_and_head(trained, capsys):
    from dgtrain.runs import load_run

    run_dir = s2s_run(trained)
    assert run_main("explain", [str(run_dir), "--device", "cpu"], capsys)[0] == 0
    files = sorted(p.name for p in (run_dir / "explain").glob("attention_*.png"))
    assert len(files) == 2 * 2 * 4  # encoder and decoder, 2 layers, 4 heads
    model = load_run(run_dir, "cpu", data=False).model
    src, tgt = torch.tensor([[5, 6, 7, 2]]), torch.tensor([[1, 7, 6]])
    maps = model.attention_maps(src, tgt)
    dec = maps["decoder"][0][0]
    torch.testing.assert_close(dec.sum(-1), torch.ones_like(dec.sum(-1)))
    assert torch.all(dec.triu(1) == 0)  # causal: no query attends to a later token
    # the explicit attention path computes what the fused training path computes
    memory, mask = model.encode(src)
    torch.testing.assert_close(model.decode(tgt, memory, mask, weights=[]), model.decode(tgt, memory, mask))


def test_explain_linreg_weights_against_feature_names(trained, tmp_path_factory, capsys):
    run_dir, _ = tab_run(trained, tmp_path_factory, model="linreg")
    assert run_main("explain", [str(run_dir), "--device", "cpu"], capsys)[0] == 0
    info = json.loads((run_dir / "explain" / "explain.json").read_text())
    from safetensors.torch import load_file

    w = load_file(str(run_dir / "model.safetensors"))["linear.weight"][0].tolist()
    assert info["standardised"] and list(info["weights"]["y"]) == ["a", "b", "c"]
    assert list(info["weights"]["y"].values()) == pytest.approx(w)
    assert (run_dir / "explain" / "features.png").is_file()


# ---------------------------------------------------------------------------------------------- the CLI


@pytest.mark.slow
def test_cli_lists_and_runs_the_commands(trained, tmp_path):
    run = lm_run(trained)
    p = run_cli(["sample", str(run), "--max-new-tokens", "10", "--device", "cpu"], tmp_path)
    assert p.returncode == 0 and "10 tokens" in p.stderr
    p = run_cli(["predict", str(run), "x.csv"], tmp_path)
    assert p.returncode == 2 and "dgtrain sample" in p.stderr
    from dgtrain.cli import SUBCOMMANDS

    listed = run_cli(["--help"], tmp_path).stdout
    for name in ("sample", "predict", "export", "explain"):
        assert SUBCOMMANDS[name][0] == f"dgtrain.commands.{name}:main"
        assert f"dgtrain {name} " in listed
