"""User mistakes get exit 2 and one paragraph naming the key or file and the fix, before training:
bad values, keys nothing reads, unreadable or non-finite data files (issue 10, sections 3 and 4)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from dgtrain.data.regression import csv
from dgtrain.errors import DgtrainError
from dgtrain.validation import check_config, problems


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["data.val_fraction=0"], "data.val_fraction=0: must be a number in (0, 1)."),
        (["data.val_fraction=1"], "data.val_fraction=1: must be a number in (0, 1)."),
        (["data.val_fraction=1.5"], "data.val_fraction=1.5: must be a number in (0, 1)."),
        (["optimizer.lr=nan"], "optimizer.lr=nan: must be a finite, non-negative number"),
        (["optimizer.lr=inf"], "optimizer.lr=inf: must be a finite, non-negative number"),
        (["model=transformer", "model.n_heads=0"], "model.n_heads=0: must be a positive integer."),
        (["model=transformer", "model.dropout=1.5"], "model.dropout=1.5: must be a number in [0, 1)."),
        (["model=transformer", "data=text", "data.seq_len=0"], "data.seq_len=0: must be a positive integer."),
        (["data.max_examples=0"], "data.max_examples=0: must be a positive integer."),
        # the sinks open on rank 0 only: checked with the config, every rank of trainer.devices=N stops
        # alike (the other ranks reported the lost peer as an internal error)
        (["logger.console.mode=foo"], "logger.console.mode='foo': expected auto, rich or plain."),
        (["logger.console.plain_interval_s=-1"], "logger.console.plain_interval_s=-1: expected a number of"),
        (
            ["logger=wandb", "logger.wandb.mode=foo"],
            "logger.wandb.mode='foo': expected one of online, offline",
        ),
        # on/off settings read as Python truth (head_bias=no meant a bias); loss arguments and
        # vocab_multiple=abc were tracebacks
        (["model=transformer", "model.head_bias=no"], "model.head_bias='no': expected true or false."),
        (
            ["model=transformer", "model.tie_weights=maybe"],
            "model.tie_weights='maybe': expected true or false.",
        ),
        (["data=image_folder", "data.root=x", "data.hflip=off"], "data.hflip='off': expected true or false."),
        (["optimizer.group_decay=no"], "optimizer.group_decay='no': expected true or false."),
        (["loss.label_smoothing=abc"], "loss.label_smoothing=abc: must be a number in [0, 1]"),
        (["loss.label_smoothing=1.5"], "loss.label_smoothing=1.5: must be a number in [0, 1]"),
        (["loss.label_smoothing=-0.1"], "loss.label_smoothing=-0.1: must be a number in [0, 1]"),
        (["loss=cross_entropy", "loss.ignore_index=abc"], "loss.ignore_index=abc: must be a whole number"),
        (
            ["model=transformer", "model.vocab_multiple=abc"],
            "model.vocab_multiple=abc: must be a positive integer.",
        ),
        # 0 silently never sampled, -5 sampled every 5 steps
        (["trainer.sample_every=0"], "trainer.sample_every=0: must be a positive integer, or null."),
        (["trainer.sample_every=-5"], "trainer.sample_every=-5: must be a positive integer, or null."),
        # dgtrain's schedulers: text was a traceback, step_size=0 a ZeroDivisionError, a negative warmup
        # silently shifted the cosine schedule
        (
            ["scheduler=cosine", "scheduler.warmup_steps=abc"],
            "scheduler.warmup_steps=abc: must be a whole number",
        ),
        (
            ["scheduler=cosine", "scheduler.warmup_steps=-3"],
            "scheduler.warmup_steps=-3: must be a whole number",
        ),
        (["scheduler=constant", "scheduler.warmup_steps=2.5"], "scheduler.warmup_steps=2.5: must be a whole"),
        (
            ["scheduler=step", "scheduler.step_size=0"],
            "scheduler.step_size=0: must be a positive whole number",
        ),
        (
            ["scheduler=step", "scheduler.gamma=abc"],
            "scheduler.gamma=abc: must be a finite number, positive.",
        ),
        (
            ["scheduler=cosine", "scheduler.min_lr_ratio=-1"],
            "scheduler.min_lr_ratio=-1: must be a finite number",
        ),
        # torch.optim's bounds: these were internal-error tracebacks from the optimizer's constructor
        (
            ["optimizer=sgd", "optimizer.momentum=abc"],
            "optimizer.momentum=abc: must be a finite number, 0 or more.",
        ),
        (
            ["optimizer=sgd", "optimizer.momentum=-1"],
            "optimizer.momentum=-1: must be a finite number, 0 or more.",
        ),
        (["optimizer.weight_decay=abc"], "optimizer.weight_decay=abc: must be a finite number, 0 or more."),
        (["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1: must be a finite number, 0 or more."),
        (["+optimizer.eps=-1"], "optimizer.eps=-1: must be a finite number, 0 or more."),
        (["optimizer.betas=abc"], "optimizer.betas=abc: expected two numbers in [0, 1)"),
        (["optimizer.betas=[0.9]"], "optimizer.betas=[0.9]: expected two numbers in [0, 1)"),
        (["optimizer.betas=[0.9,1.5]"], "optimizer.betas=[0.9, 1.5]: expected two numbers in [0, 1)"),
        (
            ["model=mlp", "data=csv", "data.path=x.csv", "data.target=y", "data.task=lm"],
            "data.task=lm (data=csv): this data is regression or classification; set data.task=regression",
        ),
        (["model=mlp", "model.hidden_size=-4"], "model.hidden_size=-4: must be a positive integer."),
        # a size that is text was a traceback, a fraction was truncated (batch_size=1.5 trained on 1)
        (["data.batch_size=abc"], "data.batch_size=abc: must be a positive integer."),
        (["data.batch_size=1.5"], "data.batch_size=1.5: must be a positive integer."),
        (["data.batch_size=true"], "data.batch_size=True: must be a positive integer."),
        (["data.num_workers=abc"], "data.num_workers=abc: must be a whole number, 0 or more."),
        (["data.num_workers=1.5"], "data.num_workers=1.5: must be a whole number, 0 or more."),
        (["data.max_examples=1.5"], "data.max_examples=1.5: must be a positive integer."),
        (
            ["model=convnet", "model.channels=[16,2.5]"],
            "model.channels=[16, 2.5]: must be a positive integer.",
        ),
        (["model=convnet", "model.channels=[16,-1]"], "model.channels=[16, -1]: must be a positive integer."),
        *(
            (
                ["model=transformer", "data=seq2seq_synthetic", f"data.pad_to_multiple={bad}"],
                f"data.pad_to_multiple={shown}: must be a positive integer (8 rounds every batch's",
            )
            for bad, shown in (
                ("0", "0"),
                ("-8", "-8"),
                ("2.5", "2.5"),
                ("eight", "'eight'"),
                ("true", "True"),
            )
        ),
    ],
)
def test_bad_values_are_reported_before_anything_is_built(compose, overrides, message):
    found = problems(compose(overrides))
    assert any(p.startswith(message) for p in found), found
    with pytest.raises(DgtrainError) as e:
        check_config(compose(overrides))
    assert e.value.exit_code == 2


def test_a_closed_interval_admits_its_end(compose):
    """model.dropout lies in [0, 1): 0 (no dropout, the usual choice for a benchmark) is valid."""
    assert problems(compose(["model=transformer", "model.dropout=0.0"])) == []


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "+trainer.max_stepz=5",
            "trainer.max_stepz is not a setting dgtrain knows, so it would be ignored. "
            "Did you mean trainer.max_steps? Valid keys under trainer: max_steps, max_epochs,",
        ),
        ("+checkpoint.evry=5", "checkpoint.evry is not a setting dgtrain knows"),
        (
            "+model.hiden_size=8",
            "model.hiden_size is not a setting dgtrain knows, so it would be ignored. "
            "Did you mean model.hidden_size? Valid keys under model: hidden_size,",
        ),
        ("+optimizer.lrr=0.1", "Did you mean optimizer.lr? Valid keys under optimizer: lr, betas,"),
        (
            "+data.val_frac=0.5",
            "Valid keys under data: val_fraction, max_examples, task, batch_size, num_workers,",
        ),
        ("+scheduler.warmup=5", "Did you mean scheduler.warmup_steps?"),
        ("+logger.console.verbose=1", "logger.console.verbose is not a setting dgtrain knows"),
        ("+seeed=1", "seeed is not a setting dgtrain knows, so it would be ignored. Did you mean seed?"),
        # a setting of a section or group given at the top level: pointed at where it lives
        (
            "+max_steps=5",
            "max_steps is not a setting dgtrain knows, so it would be ignored. Did you mean trainer.max_steps?",
        ),
        ("+lr=0.1", "Did you mean optimizer.lr?"),
        ("+batch_size=8", "Did you mean data.batch_size?"),
    ],
)
def test_keys_that_nothing_reads_fail_listing_the_valid_ones(compose, override, message):
    found = problems(compose(["model=mlp", override]))
    assert any(message in p for p in found), found


def test_the_valid_keys_list_each_key_once(compose):
    """Adam takes `fused` itself and dgtrain reads it too (optimizer.fused=auto): it was listed twice."""
    (found,) = [p for p in problems(compose(["+optimizer.lrr=0.1"])) if "optimizer.lrr" in p]
    keys = found.split("Valid keys under optimizer: ")[1].rstrip(".").split(", ")
    assert "fused" in keys and "group_decay" in keys
    assert len(keys) == len(set(keys)), keys


def test_pad_to_multiple_is_for_variable_length_sequences_only(compose):
    """Accepted for seq2seq data; refused, with the reason and the fix, for data of one fixed shape."""
    assert problems(compose(["model=transformer", "data=seq2seq_synthetic", "data.pad_to_multiple=8"])) == []
    for data, extra in (("text", []), ("tokens", ["data.train_path=train.bin"])):
        found = problems(compose(["model=transformer", f"data={data}", *extra, "+data.pad_to_multiple=8"]))
        assert any(
            p.startswith("data.pad_to_multiple applies to variable-length sequence data only")
            and f"data {data} gives batches of one fixed shape" in p
            and p.endswith("Remove data.pad_to_multiple.")
            for p in found
        ), found
    found = problems(compose(["model=mlp", "+data.pad_to_multiple=8"]))
    assert any("data digits gives batches of one fixed shape" in p for p in found), found


def test_every_shipped_option_and_recipe_passes_the_strict_key_check(compose):
    from dgtrain.paths import config_dir, recipes_dir
    from dgtrain.recipes import register_recipes

    register_recipes()
    root = config_dir()
    options = [
        f"{g}={p.stem}"
        for g in ("model", "data", "optimizer", "scheduler", "logger", "loss")
        for p in sorted((root / g).glob("*.yaml"))
    ]
    options += [f"recipe={p.stem}" for p in sorted(recipes_dir().glob("*.yaml"))]
    for option in options:
        found = [p for p in problems(compose([option])) if "not a setting" in p]
        assert not found, (option, found)


def test_graph_refuses_a_negative_size(tmp_path, monkeypatch):
    from dgtrain.commands.graph import main as graph_main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(DgtrainError, match=r"model\.hidden_size=-3: must be a positive integer"):
        graph_main(["model=mlp", "model.hidden_size=-3"])


# ------------------------------------------------------------------------------------------ CSV files


def _table(tmp_path, body: str, name: str = "d.csv"):
    f = tmp_path / name
    f.write_text(body)
    return str(f)


@pytest.mark.parametrize(
    "cell, shown", [("nan", "'nan'"), ("inf", "'inf'"), ("-Infinity", "'-Infinity'"), ("1e39", "'1e39'")]
)
def test_a_non_finite_csv_value_fails_at_load_naming_line_and_column(tmp_path, cell, shown):
    path = _table(tmp_path, f"a,b,y\n1,2,3\n4,{cell},6\n7,8,9\n")
    with pytest.raises(DgtrainError) as e:
        csv(seed=0, path=path, target="y")
    assert f"{path}, line 3, column 2 ('b'): the value {shown} is not a finite number" in str(e.value)


def test_a_gzipped_csv_is_read_like_the_plain_one(tmp_path):
    rows = "a,b,y\n" + "\n".join(f"{i},{i * 2 % 7},{i % 5}" for i in range(30)) + "\n"
    plain = csv(seed=0, path=_table(tmp_path, rows), target="y")
    gz = tmp_path / "d.csv.gz"
    gz.write_bytes(gzip.compress(rows.encode()))
    zipped = csv(seed=0, path=str(gz), target="y")
    assert np.array_equal(plain.train.x.numpy(), zipped.train.x.numpy())
    assert np.array_equal(plain.val.y.numpy(), zipped.val.y.numpy())


def test_a_binary_or_unreadable_file_is_named_without_a_traceback(tmp_path):
    f = tmp_path / "d.csv"
    f.write_bytes(gzip.compress(b"a,y\n1,2\n"))  # gzipped, but not named .gz
    with pytest.raises(DgtrainError, match=r"cannot be read as a UTF-8 CSV file"):
        csv(seed=0, path=str(f), target="y")
    f.write_text("a,y\n1,2\n3,4\n")
    f.chmod(0)
    try:
        if not __import__("os").access(f, __import__("os").R_OK):  # root reads anything
            with pytest.raises(DgtrainError, match=r"cannot be read .*Permission denied"):
                csv(seed=0, path=str(f), target="y")
    finally:
        f.chmod(0o644)


def test_a_csv_with_only_the_target_column_is_refused(tmp_path):
    with pytest.raises(DgtrainError, match="the only column is the target 'y', so there are no features"):
        csv(seed=0, path=_table(tmp_path, "y\n1\n2\n3\n"), target="y")


@pytest.mark.parametrize(
    "body, found",
    [("", "found an empty file."), ("a,y\n", "found 0 data row(s)"), ("a,y\n1,2\n", "found 1 data row(s)")],
)
def test_a_csv_with_too_few_rows_counts_its_data_rows(tmp_path, body, found):
    """The message counts data rows, as it asks for them: 'at least 2 data rows, found 2 rows' for a
    header and one row contradicted itself."""
    with pytest.raises(DgtrainError) as e:
        csv(seed=0, path=_table(tmp_path, body), target="y")
    assert "expected a header row and at least 2 data rows, " + found in str(e.value)
    assert e.value.exit_code == 2


def test_a_csv_of_two_rows_trains_on_finite_numbers(tmp_path):
    """Two data rows (the fewest accepted) leave one training example, whose standard deviation is NaN:
    every feature became NaN and the run stopped with exit 3 advising a lower learning rate."""
    b = csv(seed=0, path=_table(tmp_path, "a,b,y\n1,5,2\n2,7,4\n"), target="y")
    assert len(b.train) == 1 and len(b.val) == 1
    for t in (b.train.x, b.train.y, b.val.x, b.val.y):
        assert torch.isfinite(t).all(), t
    assert b.info.extra["x_std"].tolist() == [1.0, 1.0]


def test_a_trailing_delimiter_adds_no_column_and_an_unnamed_column_is_named(tmp_path):
    """'a,b,y,' on every line made a fourth column named '' whose empty values failed as 'not a number',
    with the hint data.drop=[]. It is now dropped; an unnamed column that holds values is an error."""
    path = _table(tmp_path, "a,b,y,\n" + "".join(f"{i},{i % 3},{i % 5},\n" for i in range(10)))
    assert csv(seed=0, path=path, target="y").info.extra["feature_names"] == ["a", "b"]
    path = _table(tmp_path, "a,,y\n" + "".join(f"{i},{i % 3},{i % 5}\n" for i in range(10)), name="u.csv")
    with pytest.raises(DgtrainError) as e:
        csv(seed=0, path=path, target="y")
    assert f"data.path={path}: column 2 holds values but has no name in the header row" in str(e.value)


def test_a_csv_naming_a_column_twice_is_refused(tmp_path):
    """Columns are matched by name (predict reads its input by the training feature names): with two
    columns named 'a', predict fed the first one twice and scored silently wrong predictions."""
    path = _table(tmp_path, "a,a,y\n" + "".join(f"{i},{i % 3},{i % 5}\n" for i in range(10)))
    with pytest.raises(DgtrainError) as e:
        csv(seed=0, path=path, target="y")
    assert f"data.path={path}: the header names column(s) 'a' more than once" in str(e.value)
    assert "Rename the duplicates" in str(e.value)


def test_data_drop_given_as_one_name_drops_that_column(tmp_path):
    """data.drop=ab (no brackets) was split into its letters: columns a and b were dropped silently,
    and data.drop=city failed with 'c, i, t not column(s)'."""
    path = _table(tmp_path, "a,b,ab,y\n" + "".join(f"{i},{i % 3},{i % 7},{i % 5}\n" for i in range(10)))
    assert csv(seed=0, path=path, target="y", drop="ab").info.extra["feature_names"] == ["a", "b"]
    assert csv(seed=0, path=path, target="y", drop=["ab"]).info.extra["feature_names"] == ["a", "b"]


def test_errors_quote_a_cut_field_never_a_whole_line_of_the_file(tmp_path):
    secret = "root:$6$saltsalt$" + "x" * 80 + ":19000:0:99999:7:::"
    with pytest.raises(DgtrainError) as e:
        csv(seed=0, path=_table(tmp_path, secret + "\n" + secret + "\n" + secret + "\n"), target="y")
    assert "saltsalt" not in str(e.value)
    long_value = "v" * 200
    with pytest.raises(DgtrainError) as e:
        csv(seed=0, path=_table(tmp_path, f"a,y\n1,2\n{long_value},3\n"), target="y")
    assert f"column 1 ('a'): the value '{'v' * 40}...' is not a number" in str(e.value)
    assert long_value not in str(e.value)


# ------------------------------------------------------------------------------------------ MNIST


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def _mnist(folder, n_train=20, labels=None):
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": labels
        if labels is not None
        else rng.integers(0, 10, (n_train,), np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (10,), dtype=np.uint8),
    }
    for name, arr in arrays.items():
        (folder / name).write_bytes(_idx(arr))


def test_mnist_labels_out_of_range_and_zero_images_are_named(tmp_path):
    from dgtrain.data.images import mnist

    labels = np.zeros(20, np.uint8)
    labels[7] = 12
    _mnist(tmp_path / "a", labels=labels)
    with pytest.raises(DgtrainError, match=r"training label 12 \(example 7\) .* is outside 0\.\.9"):
        mnist(seed=0, root=str(tmp_path / "a"))
    _mnist(tmp_path / "b", n_train=0, labels=np.zeros(0, np.uint8))
    with pytest.raises(DgtrainError, match="the training files under .* hold no images"):
        mnist(seed=0, root=str(tmp_path / "b"))
