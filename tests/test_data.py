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
    assert len(b.train) == 20 and len(b.val) == 10
    assert torch.equal(b.val.y, torch.from_numpy(files["t10k-labels-idx1-ubyte"].astype(np.int64)))


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
    assert len(b.train) == 30 and len(b.val) == 6


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
    with pytest.raises(DgtrainError, match="line 3"):
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
