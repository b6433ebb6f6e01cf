"""Rough edges of the after-training commands that a user hits: outputs that already exist, damaged run
files, relative paths, runs of a kind a command cannot serve. Each test failed before its fix.

The runs come from tests/test_after_training.py's module fixture (tiny, trained in-process once)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dgtrain.errors import DgtrainError
from tests import test_after_training as at
from tests.test_after_training import digits_run, run_main

trained = at.trained  # the module-scoped fixture that trains each tiny run once


# ------------------------------------------------------------------------------------------------ export


def test_export_out_never_deletes_a_folder_or_file_it_did_not_write(trained, tmp_path, capsys):
    run_dir = digits_run(trained)
    mine = tmp_path / "models"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DgtrainError, match=r"--out=.*models already holds files.*notes.txt"):
        run_main("export", [str(run_dir), "--format", "torchscript", "--out", str(mine)], capsys)
    assert (mine / "notes.txt").read_text() == "keep me" and [p.name for p in mine.iterdir()] == ["notes.txt"]

    a_file = tmp_path / "model.ts"
    a_file.write_text("keep me too")
    with pytest.raises(DgtrainError, match=r"--out=.*model.ts is a file; export writes a folder"):
        run_main("export", [str(run_dir), "--format", "torchscript", "--out", str(a_file)], capsys)
    assert a_file.read_text() == "keep me too" and sorted(p.name for p in tmp_path.iterdir()) == [
        "model.ts",
        "models",
    ]

    # an earlier export's folder, and an empty one, are replaced as before
    out = tmp_path / "ts"
    for _ in range(2):
        assert (
            run_main("export", [str(run_dir), "--format", "torchscript", "--out", str(out)], capsys)[0] == 0
        )
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "export.json", "model.ts"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run_main("export", [str(run_dir), "--format", "torchscript", "--out", str(empty)], capsys)[0] == 0
    assert (empty / "model.ts").is_file()


# ----------------------------------------------------------------------------------------------- predict


def test_predict_out_a_folder_exits_2_and_a_pipe_stays_a_pipe(trained, tmp_path_factory, tmp_path, capsys):
    import os
    import threading

    run_dir, data = at.tab_run(trained, tmp_path_factory)
    with pytest.raises(DgtrainError, match=r"--out=.* is a folder; give a file name"):
        run_main("predict", [str(run_dir), str(data), "--out", str(tmp_path)], capsys)
    assert list(tmp_path.iterdir()) == []

    # a named pipe (as /dev/stdout or /dev/null are special files): written into, never replaced by a file
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    got: list[str] = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()), daemon=True)
    reader.start()
    code, _, _ = run_main("predict", [str(run_dir), str(data), "--out", str(fifo), "--device", "cpu"], capsys)
    reader.join(timeout=30)
    assert code == 0 and fifo.is_fifo() and not reader.is_alive()
    assert got[0].startswith("id,y_pred\n") and got[0].count("\n") == 201


# ------------------------------------------------------------------------------------------ damaged runs


def test_a_damaged_model_safetensors_or_config_yaml_exits_2_naming_the_file(trained, tmp_path, capsys):
    import shutil

    from dgtrain.runs import load_run

    run = tmp_path / "run"
    shutil.copytree(digits_run(trained), run)
    weights = (run / "model.safetensors").read_bytes()
    for damaged in (weights[:300], b""):  # cut short by a full disk or a copy; an empty file
        (run / "model.safetensors").write_bytes(damaged)
        with pytest.raises(DgtrainError, match=r"model.safetensors: not a readable safetensors file"):
            load_run(run, "cpu", data=False)
    (run / "model.safetensors").write_bytes(weights)
    for text in ("model: [\n", "- a list\n"):
        (run / "config.yaml").write_text(text)
        with pytest.raises(DgtrainError, match=r"config.yaml: not a (readable|run's) config.*checkpoint"):
            load_run(run, "cpu", data=False)


# ------------------------------------------------------------------------------------- data=tokens runs


def tokens_run(trained, tmp_path_factory) -> Path:
    """A decoder LM on token ids above 255 (as GPT-2's are): ids no byte or char vocabulary decodes."""
    import numpy as np

    folder = tmp_path_factory.mktemp("tokens")
    rng = np.random.default_rng(0)
    rng.integers(0, 300, 6000).astype(np.uint16).tofile(folder / "train.bin")
    overrides = [f"data.train_path={folder / 'train.bin'}", "data.vocab_size=300", "data.seq_len=16"]
    return trained(
        "tokens",
        ["model=transformer", "data=tokens", *overrides, "model.d_model=32", "trainer.max_steps=3"],
    )


def test_sample_and_sample_every_refuse_a_data_tokens_run(trained, tmp_path_factory, compose, capsys):
    from dgtrain.validation import problems

    run = tokens_run(trained, tmp_path_factory)
    with pytest.raises(DgtrainError, match=r"trained on token ids \(data=tokens\)"):
        run_main("sample", [str(run), "--max-new-tokens", "5", "--device", "cpu"], capsys)
    cfg = compose(["model=transformer", "data=tokens", "data.train_path=x.bin", "trainer.sample_every=5"])
    assert any("trainer.sample_every=5 with data=tokens" in p for p in problems(cfg))
    assert not any("sample_every" in p for p in problems(compose(["model=transformer", "data=text"])))


def test_explain_and_export_label_a_data_tokens_run_with_its_ids(trained, tmp_path_factory, tmp_path, capsys):
    import json

    from dgtrain.runs import load_run

    run = tokens_run(trained, tmp_path_factory)
    assert run_main("explain", [str(run), "--out", str(tmp_path / "ex"), "--device", "cpu"], capsys)[0] == 0
    tokens = json.loads((tmp_path / "ex" / "explain.json").read_text())["tokens"]
    example = load_run(run, "cpu").setup.data.val[0][0].tolist()
    assert tokens == " ".join(map(str, example))  # not bytes: ids above 255 have no character
    side = at._export(run, "pt2", tmp_path / "pt2")
    assert side["vocabulary"] == {"level": "ids", "vocab_size": 300}


# ------------------------------------------------------------------------------------ output folders


def test_explain_and_graph_out_naming_a_file_exit_2_and_leave_it(trained, tmp_path, capsys):
    a_file = tmp_path / "report.txt"
    a_file.write_text("keep me")
    with pytest.raises(DgtrainError, match=r"--out=.*report.txt is a file; explain writes a folder"):
        run_main("explain", [str(digits_run(trained)), "--out", str(a_file)], capsys)
    with pytest.raises(
        DgtrainError, match=r"graph.out=.*report.txt is a file; dgtrain graph writes a folder"
    ):
        run_main("graph", ["model=linreg", f"graph.out={a_file}"], capsys)
    assert a_file.read_text() == "keep me"


def test_plot_out_a_folder_or_an_unknown_suffix_exits_2_and_no_suffix_gets_png(trained, tmp_path, capsys):
    run_dir = str(digits_run(trained))
    folder = tmp_path / "figs.png"
    folder.mkdir()
    with pytest.raises(DgtrainError, match=r"--out=.*figs.png is a folder; give a file name"):
        run_main("plot", [run_dir, "-o", str(folder)], capsys)
    with pytest.raises(DgtrainError, match=r"--out=.*curves.txt: matplotlib cannot write .txt files.*png"):
        run_main("plot", [run_dir, "-o", str(tmp_path / "curves.txt")], capsys)
    code, out, _ = run_main("plot", [run_dir, "-o", str(tmp_path / "curves")], capsys)
    assert code == 0 and out.strip() == f"wrote {tmp_path / 'curves.png'}"  # the file it really wrote
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "figs.png"]
    assert run_main("plot", [run_dir, "-o", str(tmp_path / "curves.pdf")], capsys)[0] == 0
    assert (tmp_path / "curves.pdf").read_bytes()[:4] == b"%PDF"


# ------------------------------------------------------------------------------------------------ sample


def test_sample_max_len_below_1_exits_2(trained, capsys):
    run = str(at.s2s_run(trained))
    for bad in ("0", "-3"):  # 0 was ignored (the data's length used), -3 printed an empty output
        with pytest.raises(DgtrainError, match=rf"--max-len={bad}: must be at least 1"):
            run_main("sample", [run, "--input", "1 2 3", "--max-len", bad], capsys)


def test_sample_every_below_1_is_refused_before_training(compose):
    from dgtrain.validation import problems

    for bad in (0, -1):  # -1 sampled 200 tokens at every step (step % -1 == 0)
        cfg = compose(["model=transformer", "data=text", f"trainer.sample_every={bad}"])
        assert f"trainer.sample_every={bad}: must be a positive integer, or null." in problems(cfg)


# ------------------------------------------------------------------------------------------ relative paths


def test_a_checkpoint_named_from_inside_its_folder_finds_its_run_dir(trained, tmp_path, monkeypatch, capsys):
    import shutil

    from dgtrain.runs import load_run

    run = tmp_path / "run"
    shutil.copytree(digits_run(trained), run)
    ckpt = sorted((run / "checkpoints").glob("step_*.pt"))[-1]
    monkeypatch.chdir(run / "checkpoints")
    for source in (ckpt.name, f"./{ckpt.name}", "."):  # the file, or the folder, from inside checkpoints/
        loaded = load_run(source, "cpu", data=False)
        assert loaded.run_dir.resolve() == run.resolve(), source
        assert loaded.setup.data is None  # sized from the run's data_info.json, the data not rebuilt
    assert run_main("explain", [ckpt.name, "--num", "1", "--steps", "2", "--device", "cpu"], capsys)[0] == 0
    assert (run / "explain" / "explain.json").is_file() and not (run / "checkpoints" / "explain").exists()


# ------------------------------------------------------------------------------------------ wrong files


def test_a_file_that_is_no_pickle_is_called_no_checkpoint_not_an_unsafe_one(trained, tmp_path, capsys):
    import os

    import torch

    from dgtrain import checkpoint as ckpt_io

    config = digits_run(trained) / "config.yaml"  # `dgtrain eval RUN/config.yaml`, a natural slip
    with pytest.raises(
        DgtrainError, match=r"config.yaml is not a checkpoint: torch.load cannot read it"
    ) as e:
        run_main("eval", [str(config)], capsys)
    assert "Python objects" not in str(e.value) and "file an issue" not in str(e.value)

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ckpt_io.CheckpointError, match=r"refused.*\(.*GLOBAL posix.system") as e:
        ckpt_io.load(tmp_path / "evil.pt")  # the refused global is named, not torch's generic advice


def test_export_a_csv_classifier(trained, tmp_path_factory, tmp_path):
    import numpy as np

    rng = np.random.default_rng(3)
    data = tmp_path_factory.mktemp("cls") / "pets.csv"
    rows = [f"{a:.3f},{b:.3f},{'cat' if a > b else 'dog'}" for a, b in rng.normal(size=(120, 2))]
    data.write_text("a,b,kind\n" + "\n".join(rows) + "\n")
    run = trained(
        "csv_classifier",
        ["model=mlp", "data=csv", f"data.path={data}", "data.target=kind", "data.task=classification"]
        + ["trainer.max_steps=5"],
    )
    side = at._export(run, "torchscript", tmp_path / "ts")  # was a KeyError: 'y_mean'
    assert side["class_names"] == ["cat", "dog"] and side["normalisation"]["feature_names"] == ["a", "b"]
    assert "y_mean" not in side["normalisation"] and "targets" not in side["normalisation"]


def test_a_bad_device_option_is_named_as_the_option_not_as_the_stored_config(trained, capsys):
    with pytest.raises(DgtrainError) as e:
        run_main("eval", [str(digits_run(trained)), "--device", "gpu"], capsys)
    assert str(e.value) == "--device=gpu: expected auto, cpu, cuda or cuda:N."  # said "the stored config..."


def test_init_from_a_file_that_is_no_checkpoint_says_what_it_is(trained, tmp_path):
    import os

    import torch

    from dgtrain.finetune import read_weights

    config = digits_run(trained) / "config.yaml"
    with pytest.raises(
        DgtrainError, match=r"config.yaml: cannot be read .*\(not a file torch.save wrote\)"
    ) as e:
        read_weights(config)
    assert "weights_only` set to `False" not in str(e.value)  # torch's advice to load it unsafely, cut short

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(DgtrainError, match=r"holds Python objects other than tensors.*GLOBAL posix.system"):
        read_weights(tmp_path / "evil.pt")


def test_graph_given_a_run_dir_says_it_takes_overrides(trained, capsys):
    run = str(digits_run(trained))
    with pytest.raises(DgtrainError, match=r"dgtrain graph takes the overrides a training run takes") as e:
        run_main("graph", [run], capsys)
    assert "EQUAL" not in str(e.value)  # Hydra's grammar error, before


def test_the_export_folder_gets_the_usual_permissions(trained, tmp_path):
    import os
    import stat

    umask = os.umask(0)
    os.umask(umask)
    at._export(digits_run(trained), "torchscript", tmp_path / "ts")
    assert stat.S_IMODE((tmp_path / "ts").stat().st_mode) == 0o777 & ~umask  # was 0700 (mkdtemp's)


def test_eval_with_batches_says_how_many_examples_it_scored(trained, capsys):
    import json

    run = digits_run(trained)
    _, out, _ = run_main("eval", [str(run), "--batches", "1", "--device", "cpu", "--json"], capsys)
    result = json.loads(out)
    from omegaconf import OmegaConf

    batch = int(OmegaConf.load(run / "config.yaml").data.batch_size)
    assert result["scored"] == batch < result["examples"]
    _, out, _ = run_main("eval", [str(run), "--batches", "1", "--device", "cpu"], capsys)
    assert f"| {batch} of {result['examples']} validation examples" in out  # said all of them
    _, out, _ = run_main("eval", [str(run), "--device", "cpu"], capsys)
    assert f"| {result['examples']} validation examples" in out


# ------------------------------------------------------------------------------------------------ explain


def test_explain_num_larger_than_a_batch_explains_that_many_images(trained, tmp_path, capsys):
    import json

    from omegaconf import OmegaConf

    run = digits_run(trained)
    num = int(OmegaConf.load(run / "config.yaml").data.batch_size) + 3  # more than the first batch holds
    argv = [str(run), "--num", str(num), "--steps", "1", "--device", "cpu", "--out", str(tmp_path / "ex")]
    assert run_main("explain", argv, capsys)[0] == 0
    info = json.loads((tmp_path / "ex" / "explain.json").read_text())
    assert len(info["examples"]) == num and (tmp_path / "ex" / f"ig_{num - 1}.png").is_file()
    with pytest.raises(DgtrainError, match=r"--num=100000: the validation split has \d+ images"):
        run_main("explain", [str(run), "--num", "100000", "--out", str(tmp_path / "ex2")], capsys)


def test_explain_again_leaves_no_maps_of_the_earlier_explanation(trained, tmp_path, capsys):
    run = str(digits_run(trained))
    out = tmp_path / "ex"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for num in ("5", "2"):
        argv = [run, "--num", num, "--steps", "1", "--device", "cpu", "--out", str(out)]
        assert run_main("explain", argv, capsys)[0] == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["explain.json", "images.png", "notes.txt"]
        + [f"{m}_{i}.png" for m in ("ig", "saliency") for i in (0, 1)]
    )


def test_graph_again_leaves_no_files_of_the_earlier_drawing(tmp_path, capsys):
    out = tmp_path / "g"
    out.mkdir()
    (out / "notes.md").write_text("mine")
    for batches in ("2", "1"):
        argv = ["model=mlp", "device=cpu", f"graph.batches={batches}", f"graph.out={out}"]
        assert run_main("graph", argv, capsys)[0] == 0
    names = {p.name for p in out.iterdir()}
    assert "autograd_2.md" not in names and "autograd_2.dot" not in names  # batch 2 of the earlier drawing
    assert {"notes.md", "graph.json", "modules.md", "autograd_1.md"} <= names


# ------------------------------------------------------------------------------------ resumed, then stopped


def test_a_run_resumed_past_its_final_weights_and_stopped_loads_its_newest_checkpoint(trained, tmp_path):
    """A completed run (model.safetensors) resumed with more steps and stopped by SIGTERM: summary.json says
    stopped, and its newest checkpoint holds later weights than model.safetensors."""
    import json
    import shutil

    import torch

    from dgtrain import checkpoint as ckpt_io
    from dgtrain.finetune import weights_file
    from dgtrain.runs import load_run

    run = tmp_path / "run"
    shutil.copytree(digits_run(trained), run)
    assert load_run(run, "cpu", data=False).weights_name.endswith("model.safetensors")  # completed: final
    state = ckpt_io.load(sorted((run / "checkpoints").glob("step_*.pt"))[-1])
    state["step"] = 999
    state["model"] = {k: v + 1 for k, v in state["model"].items()}  # the weights the continuation reached
    ckpt_io.save(state, run / "checkpoints" / "step_00000999.pt")
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "status": "stopped", "steps": 999}))

    loaded = load_run(run, "cpu", data=False)
    assert loaded.weights_name.endswith("step_00000999.pt (step 999)")  # was model.safetensors: step 30
    for name, t in loaded.model.state_dict().items():
        assert torch.equal(t, state["model"][name])
    assert weights_file(run).name == "step_00000999.pt"  # init_from=RUN_DIR as well


# ------------------------------------------------------------------------------------------------ the CLI


def test_a_closed_pipe_stops_a_command_quietly(tmp_path):
    import subprocess
    import sys

    from tests.conftest import cli_env

    # `dgtrain ls | head -1`: the reader leaves before the command writes
    p = subprocess.Popen(
        [sys.executable, "-m", "dgtrain", "ls"], cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) == 141 and "Traceback" not in err and "BrokenPipeError" not in err, err


def test_explain_without_matplotlib_exits_2_before_writing_anything(trained, tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    argv = [str(digits_run(trained)), "--num", "1", "--steps", "1", "--out", str(tmp_path / "ex")]
    with pytest.raises(
        DgtrainError, match=r"matplotlib not installed here: pip install 'dgtrain\[explain\]'"
    ):
        run_main("explain", argv, capsys)
    assert not (tmp_path / "ex").exists()  # it wrote saliency_0.png and ig_0.png, then failed


def test_sample_beam_over_the_vocabulary_or_max_len_past_the_positions_exits_2(trained, capsys):
    from dgtrain.runs import load_run

    run = at.s2s_run(trained)
    model = load_run(run, "cpu", data=False).model
    beam, too_long = str(model.vocab_size + 1), str(model.max_positions)
    with pytest.raises(
        DgtrainError, match=rf"--beam={beam}: at most the vocabulary size"
    ):  # was topk's error
        run_main("sample", [str(run), "--input", "1 2", "--beam", beam, "--device", "cpu"], capsys)
    with pytest.raises(DgtrainError, match=rf"--max-len={too_long}: the model has max_positions"):
        run_main("sample", [str(run), "--input", "1 2", "--max-len", too_long, "--device", "cpu"], capsys)
    argv = [
        str(run),
        "--input",
        "1 2",
        "--beam",
        "2",
        "--max-len",
        str(model.max_positions - 1),
        "--device",
        "cpu",
    ]
    assert run_main("sample", argv, capsys)[0] == 0


def test_a_refused_allow_target_option_is_named_as_the_option(trained, capsys):
    with pytest.raises(DgtrainError) as e:
        run_main("eval", [str(digits_run(trained)), "--allow-target", "os"], capsys)
    assert str(e.value).startswith("--allow-target os: os cannot be allowed as a whole")
    assert "stored config" not in str(e.value)


def test_a_stopped_run_with_its_own_checkpoint_dir_is_found_from_its_run_dir(trained, tmp_path):
    """checkpoint.dir=ELSEWHERE and no model.safetensors (stopped by a signal): RUN_DIR finds ELSEWHERE."""
    import shutil

    from omegaconf import OmegaConf

    from dgtrain.finetune import weights_file
    from dgtrain.runs import load_run

    run, elsewhere = tmp_path / "run", tmp_path / "ckpts"
    shutil.copytree(digits_run(trained), run)
    shutil.move(run / "checkpoints", elsewhere)
    (run / "model.safetensors").unlink()
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.checkpoint.dir = str(elsewhere)
    OmegaConf.save(cfg, run / "config.yaml")
    newest = sorted(elsewhere.glob("step_*.pt"))[-1]
    loaded = load_run(run, "cpu", data=False)  # was "no model.safetensors and no checkpoint"
    assert loaded.weights_name.startswith(str(newest)) and loaded.run_dir == run
    assert weights_file(run) == newest  # init_from=RUN_DIR


def test_predict_labels_with_an_input_that_takes_none_exits_2(trained, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    run = str(digits_run(trained))
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tmp_path / "a.png")
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x01\x03")
    with pytest.raises(DgtrainError, match=r"--labels=.*: labels go with an idx image file"):
        run_main("predict", [run, str(tmp_path), "--labels", str(labels), "--device", "cpu"], capsys)
    code, out, err = run_main("predict", [run, str(tmp_path), "--device", "cpu"], capsys)
    assert code == 0 and out.startswith("id,pred") and "a.png" in out


def test_predict_labels_with_a_csv_exits_2(trained, tmp_path_factory, tmp_path, capsys):
    run_dir, data = at.tab_run(trained, tmp_path_factory)
    with pytest.raises(DgtrainError, match=r"--labels=.*: labels go with an idx image file"):
        run_main("predict", [str(run_dir), str(data), "--labels", str(data)], capsys)


def test_predict_out_a_symlink_writes_through_it(trained, tmp_path_factory, tmp_path, capsys):
    run_dir, data = at.tab_run(trained, tmp_path_factory)
    real = tmp_path / "real.csv"
    real.write_text("old\n")
    link = tmp_path / "pred.csv"
    link.symlink_to(real)  # as /dev/stdout -> /proc/self/fd/1, or a results folder kept elsewhere
    assert (
        run_main("predict", [str(run_dir), str(data), "--out", str(link), "--device", "cpu"], capsys)[0] == 0
    )
    assert link.is_symlink() and real.read_text().startswith("id,y_pred\n")  # the link was replaced by a file


def test_plot_out_a_symlink_writes_through_it(trained, tmp_path, capsys):
    real = tmp_path / "real.png"
    real.write_bytes(b"old")
    link = tmp_path / "curves.png"
    link.symlink_to(real)
    assert run_main("plot", [str(digits_run(trained)), "-o", str(link)], capsys)[0] == 0
    assert link.is_symlink() and real.read_bytes()[:4] == b"\x89PNG"
