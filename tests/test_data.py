"""Datasets: offline readers, clear errors for missing or malformed files, deterministic splits."""

from __future__ import annotations

import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

from dgtrain.data import EpochBatchSampler, make_loader, split_indices
from dgtrain.data.images import cifar10, digits, mnist
from dgtrain.data.regression import csv, diabetes, synthetic_linear
from dgtrain.data.sequences import PAD, seq2seq_synthetic, text
from dgtrain.errors import DgtrainError


def _idx(array: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def _write_mnist(folder, n_train=20, n_val=10, gz=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_val,), dtype=np.uint8),
    }
    for name, arr in files.items():
        raw = _idx(arr)
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (folder / name).write_bytes(raw)
    return files


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_idx_files(tmp_path, gz):
    files = _write_mnist(tmp_path / "MNIST" / "raw", gz=gz)
    b = mnist(seed=0, root=str(tmp_path))
    assert b.info.in_shape == (1, 28, 28) and b.info.num_classes == 10
    assert len(b.train) == 18 and len(b.val) == 2 and len(b.test) == 10
    assert torch.equal(b.test.y, torch.from_numpy(files["t10k-labels-idx1-ubyte"].astype(np.int64)))


def test_mnist_missing_files_are_listed(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx(np.zeros((2, 28, 28), np.uint8)))
    with pytest.raises(DgtrainError) as e:
        mnist(seed=0, root=str(tmp_path))
    msg = str(e.value)
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        assert name in msg
    assert "train-images-idx3-ubyte[" not in msg  # present files are not listed as missing
    assert str(tmp_path) in msg and "never downloads" in msg


def test_mnist_truncated_file_names_path(tmp_path):
    _write_mnist(tmp_path)
    bad = tmp_path / "train-images-idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-100])
    with pytest.raises(DgtrainError, match="truncated"):
        mnist(seed=0, root=str(tmp_path))
    bad.write_bytes(b"not an idx file at all")
    with pytest.raises(DgtrainError, match="not an MNIST idx file"):
        mnist(seed=0, root=str(tmp_path))


def _write_cifar(folder, n=6):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": list(rng.integers(0, 10, n)),
        }
        (folder / name).write_bytes(pickle.dumps(d))


def test_cifar10_reads_python_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    b = cifar10(seed=0, root=str(tmp_path))
    assert b.info.in_shape == (3, 32, 32)
    assert len(b.train) == 27 and len(b.val) == 3 and len(b.test) == 6


def test_cifar10_missing_and_malicious_files(tmp_path):
    with pytest.raises(DgtrainError, match="data_batch_1.*test_batch"):
        cifar10(seed=0, root=str(tmp_path))
    folder = tmp_path / "cifar-10-batches-py"
    _write_cifar(folder)
    sentinel = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {sentinel}",))

    (folder / "data_batch_3").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(DgtrainError, match="data_batch_3"):
        cifar10(seed=0, root=str(tmp_path))
    assert not sentinel.exists()


def test_csv_reader_and_errors(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    y = x @ np.array([1.0, -2.0, 0.5]) + 3
    f = tmp_path / "d.csv"
    f.write_text("a,b,c,y\n" + "\n".join(",".join(f"{v:.6f}" for v in row) for row in np.c_[x, y]) + "\n")
    b = csv(seed=0, path=str(f), target="y")
    assert b.info.in_shape == (3,) and b.info.out_dim == 1 and len(b.train) + len(b.val) == 50
    with pytest.raises(DgtrainError, match="Columns: a, b, c, y"):
        csv(seed=0, path=str(f), target="nope")
    with pytest.raises(DgtrainError, match="file not found"):
        csv(seed=0, path=str(tmp_path / "missing.csv"), target="y")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,y\n1,2\nx,3\n4,5\n")
    with pytest.raises(
        DgtrainError, match=r"line 3, column 1 \('a'\): the value 'x' is not a number.*categorical=auto"
    ):
        csv(seed=0, path=str(bad), target="y")


def test_splits_are_deterministic_from_the_seed():
    a, b, c = (digits(seed=s) for s in (0, 0, 1))
    assert torch.equal(a.val.y, b.val.y) and torch.equal(a.val.x, b.val.x)
    assert not torch.equal(a.val.x, c.val.x)
    tr, va = split_indices(100, 0.2, seed=5)
    assert len(va) == 20 and len(set(tr.tolist()) | set(va.tolist())) == 100


def test_bundled_regression_sets():
    d = diabetes(seed=0)
    assert d.info.in_shape == (10,) and len(d.train) + len(d.val) == 442
    s = synthetic_linear(seed=0, num_examples=100)
    assert s.info.extra["true_weight"].shape == (1, 8)


def test_seq2seq_batches_are_padded_to_their_own_longest():
    from torch.nn.utils.rnn import pad_sequence

    b = seq2seq_synthetic(seed=0, num_examples=200, min_len=2, max_len=20)
    loader = make_loader(b.train, 4, shuffle=True, seed=0)
    widths = set()
    for i, (src, tgt) in enumerate(loader):
        assert src.shape[1] == int((src != PAD).sum(1).max()), "a batch is padded beyond its longest source"
        assert tgt.shape[1] == int((tgt != PAD).sum(1).max()), "a batch is padded beyond its longest target"
        widths.add(src.shape[1])
        idx = loader.batch_sampler.order(0)[4 * i : 4 * i + 4].tolist()
        pairs = [b.train[j] for j in idx]
        assert torch.equal(src, pad_sequence([s for s, _ in pairs], batch_first=True, padding_value=PAD))
        assert torch.equal(tgt, pad_sequence([t for _, t in pairs], batch_first=True, padding_value=PAD))
    assert len(widths) > 3, "batches should have different shapes"


def test_pad_to_multiple_rounds_each_batch_up_and_leaves_loss_and_metrics_unchanged():
    """data.pad_to_multiple=8: every source width is a multiple of 8, every target width a multiple
    plus one, so the decoder reads and predicts a multiple of 8 (at most 3 widths per tensor for
    sequences of up to 20 symbols), the extra columns are pad tokens, and the loss and the
    evaluation metrics of a batch are those of the same batch without padding (CPU, fp32)."""
    from dgtrain.losses import cross_entropy
    from dgtrain.models.transformer import Transformer
    from dgtrain.tasks import make_task

    plain = seq2seq_synthetic(seed=0, num_examples=200, min_len=2, max_len=20)
    padded = seq2seq_synthetic(seed=0, num_examples=200, min_len=2, max_len=20, pad_to_multiple=8)
    assert padded.info.max_len == 24 and plain.info.max_len == 22  # the widest batch the model must take
    torch.manual_seed(0)
    model = Transformer.from_data(padded.info, d_model=32, n_heads=2, n_layers=2, dropout=0.0)
    model.eval()
    task, loss_fn = make_task("seq2seq", PAD), cross_entropy(task="seq2seq", pad_id=PAD)
    loaders = [make_loader(b.train, 4, shuffle=True, seed=0) for b in (plain, padded)]
    src_widths, tgt_widths, unpadded_widths = set(), set(), set()
    for i, ((src, tgt), (psrc, ptgt)) in enumerate(zip(*loaders, strict=True)):
        assert psrc.shape[1] % 8 == 0 and ptgt.shape[1] % 8 == 1
        assert (
            src.shape[1] <= psrc.shape[1] < src.shape[1] + 8
            and tgt.shape[1] <= ptgt.shape[1] < tgt.shape[1] + 8
        )
        assert torch.equal(psrc[:, : src.shape[1]], src) and bool((psrc[:, src.shape[1] :] == PAD).all())
        assert torch.equal(ptgt[:, : tgt.shape[1]], tgt) and bool((ptgt[:, tgt.shape[1] :] == PAD).all())
        src_widths.add(psrc.shape[1]), tgt_widths.add(ptgt.shape[1]), unpadded_widths.add(src.shape[1])
        if i < 3:
            with torch.no_grad():
                a, b = task.loss(model, (src, tgt), loss_fn), task.loss(model, (psrc, ptgt), loss_fn)
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert src_widths <= {8, 16, 24} and tgt_widths <= {9, 17, 25}
    assert len(unpadded_widths) > len(src_widths), "padding should leave fewer distinct shapes"
    # evaluation (greedy decoding up to the padded width): the same loss and accuracies
    val = [make_loader(b.val, 8, shuffle=False, seed=0) for b in (plain, padded)]
    got, want = (task.evaluate(model, list(v)[:3], loss_fn) for v in (val[1], val[0]))
    assert got["val/loss"] == pytest.approx(want["val/loss"], rel=1e-5)
    assert got["val/acc"] == want["val/acc"] and got["val/seq_acc"] == want["val/seq_acc"]


def test_pad_to_multiple_on_a_device_resident_copy_and_bad_values():
    """The rounded widths come from lengths kept on the host, so a copy on another device (here `meta`,
    standing in for data.device_resident on a GPU) gives batches of the same shapes without a sync."""
    b = seq2seq_synthetic(seed=0, num_examples=100, min_len=2, max_len=20, pad_to_multiple=8)
    moved = b.train.to(torch.device("meta"))
    assert moved.src.device.type == "meta" and b.train.src.device.type == "cpu"  # a copy: the original stays
    for idx in EpochBatchSampler(len(b.train), 4, shuffle=True, seed=1):  # what DirectLoader does per batch
        idx_host = torch.tensor(idx)
        (s, t), (ms, mt) = b.train.take(idx_host, idx_host), moved.take(idx_host.to("meta"), idx_host)
        assert ms.device.type == "meta" and (ms.shape, mt.shape) == (s.shape, t.shape)
        assert s.shape[1] % 8 == 0 and t.shape[1] % 8 == 1
    one = seq2seq_synthetic(seed=0, num_examples=50, pad_to_multiple=1)  # 1: the same as null
    assert one.train.src.shape[1] == 13 and one.info.max_len == 14
    for bad in (0, -8, 2.5, "8", True):
        with pytest.raises(DgtrainError, match=r"data.pad_to_multiple=.*: must be a positive integer"):
            seq2seq_synthetic(seed=0, num_examples=50, pad_to_multiple=bad)


def test_in_memory_data_is_indexed_without_a_dataloader_in_the_same_order():
    """num_workers=0: a DirectLoader; each batch is the sampler's indices, in the sampler's order, and
    starting an epoch draws from torch's RNG as a DataLoader iterator does (so dropout sees the same stream)."""
    from torch.utils.data import DataLoader

    from dgtrain.data import DirectLoader

    for b in (digits(seed=0), text(seed=0, seq_len=16), seq2seq_synthetic(seed=0, num_examples=100)):
        direct = make_loader(b.train, 8, shuffle=True, seed=3)
        workers = make_loader(b.train, 8, shuffle=True, seed=3, num_workers=1)
        assert isinstance(direct, DirectLoader) and isinstance(workers, DataLoader)
        for epoch, start in ((0, 0), (1, 2)):
            direct.batch_sampler.set_epoch(epoch, start)
            workers.batch_sampler.set_epoch(epoch, start)
            torch.manual_seed(0)
            got = list(direct)
            after_direct = torch.rand(1)
            torch.manual_seed(0)
            want = list(workers)
            assert torch.equal(torch.rand(1), after_direct), "the same draws from the global RNG"
            assert len(got) == len(want) == len(direct) - start
            for g, w in zip(got, want, strict=True):
                assert all(torch.equal(x, y) for x, y in zip(g, w, strict=True))


def test_device_resident_decision():
    from dgtrain.data import RESIDENT_SHARE, keep_on_device

    b = digits(seed=0)
    size = b.train.nbytes() + b.val.nbytes()
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    fits, too_small = int(size / RESIDENT_SHARE) + 1, int(size / RESIDENT_SHARE) - 1
    assert keep_on_device("auto", b, cuda, 0, fits)
    assert not keep_on_device("auto", b, cuda, 0, too_small), "auto leaves data that needs too much memory"
    assert not keep_on_device("auto", b, cuda, 2, fits), "auto leaves data to the DataLoader's workers"
    assert not keep_on_device("auto", b, cpu, 0, None)
    assert not keep_on_device(False, b, cuda, 0, fits)
    assert keep_on_device(True, b, cuda, 0, too_small), "true is the user's call"
    with pytest.raises(DgtrainError, match=r"data.device_resident=true needs data.num_workers=0"):
        keep_on_device("true", b, cuda, 2, fits)
    plain = type(b)(torch.utils.data.TensorDataset(torch.zeros(4)), b.val, b.info)
    with pytest.raises(DgtrainError, match=r"data.device_resident=true: this dataset \(TensorDataset\)"):
        keep_on_device("true", plain, cuda, 0, fits)
    assert not keep_on_device("auto", plain, cuda, 0, fits)


def test_device_resident_and_pin_memory_values_are_checked(compose):
    from dgtrain.validation import problems

    found = problems(compose(["model=mlp", "data.device_resident=sometimes", "data.pin_memory=maybe"]))
    assert any("data.device_resident=sometimes: expected auto, true or false" in p for p in found)
    assert any("data.pin_memory=maybe: expected true or false" in p for p in found)
    found = problems(compose(["model=mlp", "data.device_resident=true", "data.num_workers=2"]))
    assert any("data.device_resident=true needs data.num_workers=0" in p for p in found)
    assert problems(compose(["model=mlp", "data.device_resident=false", "data.pin_memory=false"])) == []


def test_text_default_corpus_and_file(tmp_path):
    b = text(seed=0, seq_len=32)
    assert b.info.task == "lm" and b.info.vocab_size > 40 and len(b.train) > 100
    x, y = b.train.__getitems__([0, 1])
    assert torch.equal(x[:, 1:], y[:, :-1])
    f = tmp_path / "t.txt"
    f.write_text("hello world " * 100)
    assert text(seed=0, path=str(f), seq_len=16).info.vocab_size == len(set("hello world "))
    assert text(seed=0, path=str(f), seq_len=16, level="byte").info.vocab_size == 256
    with pytest.raises(DgtrainError, match="too short"):
        text(seed=0, path=str(f), seq_len=1000)
    with pytest.raises(DgtrainError, match="file not found"):
        text(seed=0, path=str(tmp_path / "none.txt"))


def test_epoch_sampler_order_and_resume_position():
    s = EpochBatchSampler(10, 3, shuffle=True, seed=7)
    s.set_epoch(2)
    full = list(s)
    s.set_epoch(2, start_batch=2)
    assert list(s) == full[2:]
    s.set_epoch(3)
    assert list(s) != full
    assert sorted(i for b in full for i in b) == list(range(10))


# ------------------------------------------------------------------ honest splits and normalisation


def _rows(ds) -> set[bytes]:
    return {row.numpy().tobytes() for row in ds.x}


def test_mnist_validates_on_training_images_and_keeps_t10k_as_test(tmp_path):
    """val is carved from the training files (seeded), never from t10k; t10k is the test split."""
    _write_mnist(tmp_path, n_train=200, n_val=50)
    a, b, c = (mnist(seed=s, root=str(tmp_path), val_fraction=0.25) for s in (0, 0, 1))
    assert (len(a.train), len(a.val), len(a.test)) == (150, 50, 50)
    assert torch.equal(a.val.x, b.val.x) and not torch.equal(a.val.x, c.val.x)
    assert not _rows(a.val) & _rows(a.test) and not _rows(a.val) & _rows(a.train)
    assert len(_rows(a.train) | _rows(a.val)) == 200  # every training image in exactly one split
    with pytest.raises(DgtrainError, match=r"data.val_fraction=0.0.*between 0 and 1"):
        mnist(seed=0, root=str(tmp_path), val_fraction=0.0)


def test_cifar10_validates_on_training_batches(tmp_path):
    _write_cifar(tmp_path / "cifar-10-batches-py", n=20)
    b = cifar10(seed=0, root=str(tmp_path), val_fraction=0.2)
    assert (len(b.train), len(b.val), len(b.test)) == (80, 20, 20)
    assert not _rows(b.val) & _rows(b.test)


def test_idx_images_are_normalised_with_their_own_training_statistics(tmp_path):
    """Fashion-MNIST-like files (other pixel statistics than MNIST): the training split ends up with mean 0
    and std 1 per channel, measured on it alone; data.mean/data.std override; bad values are named."""
    folder = tmp_path / "fashion"
    _write_mnist(folder, n_train=100, n_val=10)
    raw = folder / "train-images-idx3-ubyte"
    images = np.random.default_rng(1).integers(100, 200, (100, 28, 28), dtype=np.uint8)  # mean ~0.59
    raw.write_bytes(_idx(images))
    b = mnist(seed=0, root=str(folder))
    assert abs(float(b.train.x.mean())) < 1e-4 and abs(float(b.train.x.std()) - 1) < 1e-3
    assert b.info.extra["normalise"]["from"] == "training split"
    train_idx = split_indices(100, 0.1, 0)[0].numpy()  # the seed-0 split mnist() makes
    assert b.info.extra["normalise"]["mean"][0] == pytest.approx(images[train_idx].mean() / 255, abs=1e-5)
    c = mnist(seed=0, root=str(folder), mean=[0.5], std=[0.25])
    assert torch.allclose(
        c.val.x,
        (b.val.x * b.info.extra["normalise"]["std"][0] + b.info.extra["normalise"]["mean"][0] - 0.5) / 0.25,
        atol=1e-4,
    )
    with pytest.raises(DgtrainError, match=r"data.mean=\[0.5, 0.5, 0.5\]: 3 value.*1 channel"):
        mnist(seed=0, root=str(folder), mean=[0.5, 0.5, 0.5], std=[0.2, 0.2, 0.2])
    with pytest.raises(DgtrainError, match="both data.mean and data.std"):
        mnist(seed=0, root=str(folder), mean=[0.5])


# ------------------------------------------------------------------------------------- augmentation


def test_random_crop_shifts_each_image_on_its_own():
    from dgtrain.data.augment import ImageAugment

    torch.manual_seed(0)
    x = torch.rand(64, 3, 8, 8) + 1  # no zeros inside: zeros in the output come from the padding
    out, y = ImageAugment(padding=2, hflip=False)((x, torch.arange(64)))
    assert out.shape == x.shape and torch.equal(y, torch.arange(64))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = []
    for i in range(64):
        hits = [
            (dy, dx)
            for dy in range(5)
            for dx in range(5)
            if torch.equal(out[i], padded[i, :, dy : dy + 8, dx : dx + 8])
        ]
        assert len(hits) == 1, i
        offsets.append(hits[0])
    assert len(set(offsets)) > 10  # independent draws, not one crop for the whole batch


def test_horizontal_flip_mirrors_about_half_the_images():
    from dgtrain.data.augment import ImageAugment

    torch.manual_seed(0)
    x = torch.rand(200, 1, 4, 4)
    out, _ = ImageAugment(padding=0, hflip=True)((x, None))
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(200)]
    kept = [torch.equal(out[i], x[i]) for i in range(200)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert 60 < sum(flipped) < 140


def test_augmentation_defaults_per_dataset(tmp_path):
    _write_mnist(tmp_path / "m")
    _write_cifar(tmp_path / "c" / "cifar-10-batches-py")
    assert mnist(seed=0, root=str(tmp_path / "m")).augment is None  # digits: no flips, no crops by default
    aug = cifar10(seed=0, root=str(tmp_path / "c")).augment
    assert (aug.padding, aug.hflip) == (4, True)
    assert digits(seed=0).augment is None


def test_training_batches_are_augmented_on_the_device_and_evaluation_batches_never(
    tmp_path, compose, monkeypatch
):
    from dgtrain.data.augment import ImageAugment
    from dgtrain.train import fit

    _write_cifar(tmp_path / "cifar-10-batches-py", n=20)
    seen = []
    real = ImageAugment.__call__
    monkeypatch.setattr(ImageAugment, "__call__", lambda self, b: (seen.append(len(b[0])), real(self, b))[1])
    cfg = compose(
        [
            "model=convnet",
            "data=cifar10",
            f"data.root={tmp_path}",
            "data.batch_size=16",
            "device=cpu",
            "trainer.max_steps=3",
            "trainer.log_every=1",
            "logger=[]",
            "trainer.test_at_end=true",
        ]
    )
    result = fit(cfg, tmp_path / "run")
    assert seen == [16, 16, 16]  # one call per training batch; validation and test batches untouched
    assert "test/acc" in result.summary["final"] and "val/acc" in result.summary["final"]


def test_fast_dev_run_scores_one_test_batch(compose, tmp_path, monkeypatch):
    """trainer.fast_dev_run is one train and one val batch; with test_at_end the test set is scored on
    one batch too (as Lightning's fast_dev_run does), not in full (MNIST's 10,000 images)."""
    import dgtrain.train
    from dgtrain.train import fit

    _write_cifar(tmp_path / "cifar-10-batches-py", n=20)
    scored = []
    real = dgtrain.train.evaluate
    monkeypatch.setattr(
        dgtrain.train, "evaluate", lambda s, a, n, *r: (scored.append(n), real(s, a, n, *r))[1]
    )
    cfg = compose(
        ["model=convnet", "data=cifar10", f"data.root={tmp_path}", "data.batch_size=4", "device=cpu"]
        + ["trainer.fast_dev_run=true", "trainer.test_at_end=true"]
    )
    result = fit(cfg, tmp_path / "run")
    assert "test/acc" in result.summary["final"]
    assert scored == [1, 1]  # the val batch, then the test batch


def test_test_at_end_scores_a_run_a_callback_stops_on_a_logging_step(compose, tmp_path):
    """A stop asked for in on_step_end (the hook with the logging step's host metrics) ends the run
    early_stopped; trainer.test_at_end still scores the test set once (it was skipped)."""
    from dgtrain.train import fit

    _write_cifar(tmp_path / "cifar-10-batches-py", n=20)
    cfg = compose(
        ["model=convnet", "data=cifar10", f"data.root={tmp_path}", "data.batch_size=4", "device=cpu"]
        + ["trainer.max_steps=20", "trainer.log_every=2", "trainer.test_at_end=true", "logger=[]"]
        + ["allowed_targets=[tests.]", "+callbacks.stop._target_=tests.targets.StopOnStepEnd"]
    )
    result = fit(cfg, tmp_path / "run")
    assert result.summary["status"] == "early_stopped" and result.summary["steps"] == 2
    assert [row["step"] for row in result.history if "test/acc" in row] == [2]


# ------------------------------------------------------------------------------------- image folders


def _write_folder(root, classes=("cat", "dog"), n=4, size=(6, 6), mode="RGB"):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(root / c / f"{i}.png")


def test_image_folder_reads_class_subfolders(tmp_path):
    pytest.importorskip("PIL")
    from dgtrain.data.images import image_folder

    _write_folder(tmp_path / "train", n=10)
    _write_folder(tmp_path / "test", n=3)
    b = image_folder(seed=0, root=str(tmp_path / "train"), test_root=str(tmp_path / "test"), val_fraction=0.2)
    assert (
        b.info.in_shape == (3, 6, 6)
        and b.info.num_classes == 2
        and b.info.extra["class_names"] == ["cat", "dog"]
    )
    assert (len(b.train), len(b.val), len(b.test)) == (16, 4, 6)
    assert sorted(torch.cat([b.train.y, b.val.y]).tolist()) == [0] * 10 + [1] * 10
    grey = image_folder(seed=0, root=str(tmp_path / "train"), channels=1, image_size=4)
    assert grey.info.in_shape == (1, 4, 4) and grey.test is None


def test_image_folder_errors_name_the_folder_or_file_and_the_fix(tmp_path):
    pytest.importorskip("PIL")
    from dgtrain.data.images import image_folder

    with pytest.raises(DgtrainError, match=r"data.root=.*nowhere: no such directory.*ImageFolder layout"):
        image_folder(seed=0, root=str(tmp_path / "nowhere"))
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DgtrainError, match="no class subfolders"):
        image_folder(seed=0, root=str(tmp_path / "flat"))
    _write_folder(tmp_path / "a")
    (tmp_path / "a" / "empty").mkdir()
    with pytest.raises(DgtrainError, match="class folder empty/ holds no images"):
        image_folder(seed=0, root=str(tmp_path / "a"))
    _write_folder(tmp_path / "b")
    _write_folder(tmp_path / "b", classes=("dog",), size=(7, 5))  # overwrites dog/ with 7x5 images
    with pytest.raises(DgtrainError, match=r"dog/0.png: 7x5 pixels, but 6x6.*data.image_size=N"):
        image_folder(seed=0, root=str(tmp_path / "b"))
    assert image_folder(seed=0, root=str(tmp_path / "b"), image_size=6).info.in_shape == (3, 6, 6)
    _write_folder(tmp_path / "c")
    (tmp_path / "c" / "cat" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DgtrainError, match=r"broken.png: not a readable image"):
        image_folder(seed=0, root=str(tmp_path / "c"))
    _write_folder(tmp_path / "d")
    _write_folder(tmp_path / "t", classes=("cat", "cow"))
    with pytest.raises(DgtrainError, match=r"data.test_root=.*class folder\(s\) cow do not exist"):
        image_folder(seed=0, root=str(tmp_path / "d"), test_root=str(tmp_path / "t"))


# ---------------------------------------------------------------------------------- real CSV files


def test_csv_from_excel_with_bom_semicolons_text_columns_and_dropped_ids(tmp_path):
    """What Excel and European locales write: a byte-order mark, ';' between fields, a text column."""
    rng = np.random.default_rng(0)
    lines = ["CRIM;id;city;MEDV"]
    for i in range(60):
        city = ("Paris", "Lyon", "Nice")[i % 3]
        crim = rng.normal()
        lines.append(f"{crim:.4f};{1000 + i};{city};{2 * crim + (i % 3):.4f}")
    f = tmp_path / "boston.csv"
    f.write_bytes(("\r\n".join(lines) + "\r\n").encode("utf-8-sig"))
    b = csv(seed=0, path=str(f), target="CRIM", drop=["id"], categorical="auto")  # CRIM: BOM stripped
    assert b.info.extra["feature_names"] == ["city=Lyon", "city=Nice", "city=Paris", "MEDV"]
    assert b.info.in_shape == (4,) and len(b.train) + len(b.val) == 60
    same = csv(seed=0, path=str(f), target="CRIM", drop=["id"], delimiter=";", categorical="auto")
    assert torch.equal(same.train.x, b.train.x)
    with pytest.raises(DgtrainError, match=r"line 2, column 3 \('city'\): the value 'Paris' is not a number"):
        csv(seed=0, path=str(f), target="CRIM", drop=["id"])  # categorical=none, the default
    with pytest.raises(DgtrainError, match=r"data.drop: zip not column\(s\).*Columns: CRIM, id, city, MEDV"):
        csv(seed=0, path=str(f), target="CRIM", drop=["zip"])
    with pytest.raises(DgtrainError, match=r"column 3 \('city'\).*target of a regression must be numeric"):
        csv(seed=0, path=str(f), target="city", categorical="auto")
    with pytest.raises(DgtrainError, match=r"first line holds a single field.*Set data.delimiter"):
        csv(seed=0, path=str(f), target="CRIM", delimiter=",")
    only = csv(seed=0, path=str(f), target="MEDV", categorical=["city"], drop=["id"])
    assert only.info.extra["feature_names"] == ["CRIM", "city=Lyon", "city=Nice", "city=Paris"]


def test_csv_classification_labels_become_sorted_classes(tmp_path):
    """data.task=classification: the target's labels are the classes (sorted; numerically when they are
    numbers), y holds class indices, only the features are standardised; bad label columns are named."""
    rng = np.random.default_rng(0)
    f = tmp_path / "iris.csv"
    rows = [
        f"{rng.normal():.3f},{rng.normal():.3f},{('virginica', 'setosa', 'versicolor')[i % 3]}"
        for i in range(60)
    ]
    f.write_text("a,b,species\n" + "\n".join(rows) + "\n")
    b = csv(seed=0, path=str(f), target="species", task="classification")
    assert b.info.task == "classification" and b.info.num_classes == 3
    assert b.info.extra["class_names"] == ["setosa", "versicolor", "virginica"]
    assert b.train.y.dtype == torch.long and b.train.y.ndim == 1 and "y_mean" not in b.info.extra
    idx = torch.cat([b.train.y, b.val.y])
    assert sorted(idx.tolist()) == sorted([(2, 0, 1)[i % 3] for i in range(60)])  # every row's own class
    assert abs(float(b.train.x.mean())) < 1e-5  # the features are standardised

    n = tmp_path / "digits.csv"
    n.write_text("a,label\n" + "\n".join(f"{i / 7:.3f},{(10, 2, 1)[i % 3]}" for i in range(30)) + "\n")
    assert csv(seed=0, path=str(n), target="label", task="classification").info.extra["class_names"] == [
        "1",
        "2",
        "10",
    ]  # numerically, not "1" < "10" < "2"
    one = tmp_path / "one.csv"
    one.write_text("a,label\n" + "\n".join(f"{i},x" for i in range(5)) + "\n")
    with pytest.raises(DgtrainError, match=r"one class only \('x'\).*at least two"):
        csv(seed=0, path=str(one), target="label", task="classification")
    empty = tmp_path / "empty.csv"
    empty.write_text("a,label\n1,x\n2,\n3,y\n")
    with pytest.raises(DgtrainError, match=r"empty\.csv, line 3: the target column 'label' is empty"):
        csv(seed=0, path=str(empty), target="label", task="classification")
    with pytest.raises(
        DgtrainError, match=r"data.task='lm': data=csv learns regression .* or classification"
    ):
        csv(seed=0, path=str(f), target="species", task="lm")


def test_csv_classification_of_a_continuous_target_warns(tmp_path, caplog):
    rng = np.random.default_rng(0)
    f = tmp_path / "prices.csv"
    f.write_text("a,price\n" + "\n".join(f"{i},{v:.4f}" for i, v in enumerate(rng.normal(size=60))) + "\n")
    with caplog.at_level("WARNING", logger="dgtrain"):
        b = csv(seed=0, path=str(f), target="price", task="classification")
    assert b.info.num_classes == 60  # as asked, one class per value; but said
    assert "holds 60 distinct numbers in 60 rows" in caplog.text and "data.task=regression" in caplog.text
    caplog.clear()
    labels = tmp_path / "grades.csv"  # few numeric labels: a real classification, nothing to say
    labels.write_text("a,grade\n" + "\n".join(f"{i},{i % 5}" for i in range(60)) + "\n")
    with caplog.at_level("WARNING", logger="dgtrain"):
        csv(seed=0, path=str(labels), target="grade", task="classification")
    assert caplog.text == ""


def test_csv_tab_separated_is_detected(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text("a\tb\ty\n" + "\n".join(f"{i}\t{i % 5}\t{3 * i}" for i in range(20)) + "\n")
    assert csv(seed=0, path=str(f), target="y").info.extra["feature_names"] == ["a", "b"]


# ------------------------------------------------------------------------------- time to first step

_FIRST_STEP = """
import sys
from dgtrain.recipes import compose
from dgtrain.train import setup
cfg, _ = compose(sys.argv[1:] + ["device=cpu"])
s = setup(cfg)
s.task.loss(s.model, next(iter(s.train_loader)), s.loss_fn).backward()
print(" ".join(sorted(m for m in ("sklearn", "scipy", "matplotlib", "PIL", "wandb", "tensorboard") if m in sys.modules)))
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model=convnet", "data=synthetic_images"], ""),
        (["model=transformer", "data=text"], ""),
        (["model=convnet"], "scipy sklearn"),  # digits: scikit-learn's bundled data is the data in use
    ],
)
def test_only_the_data_in_use_pays_for_its_imports(overrides, expected, tmp_path):
    import subprocess
    import sys

    from tests.conftest import cli_env

    p = subprocess.run(
        [sys.executable, "-c", _FIRST_STEP, *overrides],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=cli_env(),
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.strip() == expected  # sklearn.datasets alone costs ~1.35 s here
