"""Image classification data: `synthetic_images`, scikit-learn's bundled `digits`, and `mnist` and
`cifar10` read from their standard distribution files (never downloaded)."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from dgtrain.data import DataBundle, DataInfo, TensorPairs, limit, split_indices
from dgtrain.errors import DgtrainError

DIGIT_NAMES = [str(i) for i in range(10)]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _classification(
    x_train, y_train, x_val, y_val, num_classes: int, class_names=None, mean=None, std=None, pixels=None
) -> DataBundle:
    """`pixels` names the pixel files the data came from (idx, cifar, or null for tensors that are not
    images of a file format); an image file's pixel p in [0, 255] becomes ((p / 255) - mean) / std."""
    c = x_train.shape[1]
    extra = {
        "class_names": class_names or [str(i) for i in range(num_classes)],
        "pixels": pixels,
        "normalise": {"mean": mean or [0.0] * c, "std": std or [1.0] * c},
    }
    info = DataInfo(
        task="classification", in_shape=tuple(x_train.shape[1:]), num_classes=num_classes, extra=extra
    )
    return DataBundle(TensorPairs(x_train, y_train), TensorPairs(x_val, y_val), info)


def _split(
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    val_fraction: float,
    max_examples: int | None,
    num_classes: int,
    **meta,
):
    n = limit(len(x), max_examples)
    train_idx, val_idx = split_indices(n, val_fraction, seed)
    return _classification(x[train_idx], y[train_idx], x[val_idx], y[val_idx], num_classes, **meta)


def synthetic_images(
    *,
    seed: int,
    num_examples: int = 2048,
    num_classes: int = 10,
    channels: int = 3,
    image_size: int = 16,
    noise: float = 1.0,
    patterns_seed: int = 4321,
    val_fraction: float = 0.2,
    max_examples: int | None = None,
) -> DataBundle:
    """Each class is a fixed random pattern; examples are that pattern plus Gaussian noise."""
    patterns = torch.randn(
        num_classes, channels, image_size, image_size, generator=torch.Generator().manual_seed(patterns_seed)
    )
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(num_classes, (num_examples,), generator=g)
    x = patterns[y] + noise * torch.randn(num_examples, channels, image_size, image_size, generator=g)
    return _split(x, y, seed, val_fraction, max_examples, num_classes)


def digits(*, seed: int, val_fraction: float = 0.2, max_examples: int | None = None) -> DataBundle:
    """scikit-learn's bundled handwritten digits: 1,797 grey 8x8 images, scaled to [0, 1], as (1, 8, 8)."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    return _split(x, y, seed, val_fraction, max_examples, 10, class_names=DIGIT_NAMES, pixels="digits")


# ---------------------------------------------------------------------------------------------- MNIST

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}


def _find(root: Path, name: str, subdirs: tuple[str, ...]) -> Path | None:
    for sub in subdirs:
        for suffix in ("", ".gz"):
            p = root / sub / (name + suffix)
            if p.is_file():
                return p
    return None


def _read_idx(path: Path, expect_dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DgtrainError(
            f"{path}: cannot be read ({e}); expected an MNIST idx file, gzipped or not."
        ) from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expect_dims:
        raise DgtrainError(
            f"{path}: not an MNIST idx file of unsigned bytes with {expect_dims} dimension(s) "
            f"(magic bytes {raw[:4].hex() or 'missing'}, expected 000008{expect_dims:02x})."
        )
    header_len = 4 + 4 * expect_dims
    dims = struct.unpack(f">{expect_dims}I", raw[4:header_len])
    expected = int(np.prod(dims))
    if len(raw) - header_len != expected:
        raise DgtrainError(
            f"{path}: header says shape {dims} ({expected} bytes) but the file holds "
            f"{len(raw) - header_len} bytes of data; the file is truncated or corrupt."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def mnist(
    *,
    seed: int,
    root: str = "data/mnist",
    max_examples: int | None = None,
    max_val_examples: int | None = None,
) -> DataBundle:
    """MNIST from its four idx files under `root` (or `root/MNIST/raw`); validation = the t10k test set."""
    base = Path(root).expanduser()
    subdirs = ("", "MNIST/raw", "raw")
    paths = {k: _find(base, v, subdirs) for k, v in MNIST_FILES.items()}
    missing = [MNIST_FILES[k] for k, p in paths.items() if p is None]
    if missing:
        raise DgtrainError(
            f"data=mnist: missing file(s) under data.root={base.resolve()}: "
            f"{', '.join(n + '[.gz]' for n in missing)}. dgtrain never downloads data: place the four MNIST idx "
            "files (train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte, gzipped or not) in that folder or in its MNIST/raw/, or set data.root."
        )
    arrays = {k: _read_idx(p, 3 if k.endswith("images") else 1) for k, p in paths.items()}

    def prep(images: np.ndarray, labels: np.ndarray, cap: int | None, what: str):
        if len(images) != len(labels):
            raise DgtrainError(
                f"data=mnist: {len(images)} {what} images but {len(labels)} labels under {base}."
            )
        if len(images) == 0:
            raise DgtrainError(f"data=mnist: the {what} files under {base} hold no images.")
        if int(labels.max()) > 9:
            bad = int(np.argmax(labels > 9))
            raise DgtrainError(
                f"data=mnist: {what} label {int(labels[bad])} (example {bad}) under {base} is outside 0..9; "
                "the labels file is not MNIST's or is corrupt."
            )
        n = limit(len(images), cap)
        x = (torch.from_numpy(images[:n].copy()).float().unsqueeze(1) / 255.0 - MNIST_MEAN) / MNIST_STD
        return x, torch.from_numpy(labels[:n].astype(np.int64))

    x_tr, y_tr = prep(arrays["train_images"], arrays["train_labels"], max_examples, "training")
    x_va, y_va = prep(arrays["val_images"], arrays["val_labels"], max_val_examples, "test")
    return _classification(x_tr, y_tr, x_va, y_va, 10, DIGIT_NAMES, [MNIST_MEAN], [MNIST_STD], pixels="idx")


# -------------------------------------------------------------------------------------------- CIFAR-10

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_VAL = ("test_batch",)
_CIFAR_MEAN = torch.tensor([0.4914, 0.4822, 0.4465]).view(1, 3, 1, 1)
_CIFAR_STD = torch.tensor([0.2470, 0.2435, 0.2616]).view(1, 3, 1, 1)


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """CIFAR-10 batches are pickles; accept only what they contain (dicts, lists, bytes, numpy arrays)
    so that a tampered file cannot run code."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        d = _ArraysOnlyUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
        data = np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a CIFAR-10 batch
        raise DgtrainError(
            f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e}); expected the pickled "
            "dict with b'data' (N x 3072 uint8) and b'labels' from cifar-10-python.tar.gz."
        ) from e
    if len(data) != len(labels):
        raise DgtrainError(f"{path}: {len(data)} images but {len(labels)} labels.")
    return data, labels


def cifar10(
    *,
    seed: int,
    root: str = "data/cifar10",
    max_examples: int | None = None,
    max_val_examples: int | None = None,
) -> DataBundle:
    """CIFAR-10 from the python batches under `root/cifar-10-batches-py` (or `root`); validation = test_batch."""
    base = Path(root).expanduser()
    folder = next(
        (d for d in (base / "cifar-10-batches-py", base) if (d / "test_batch").is_file()),
        base / "cifar-10-batches-py",
    )
    missing = [n for n in CIFAR_TRAIN + CIFAR_VAL if not (folder / n).is_file()]
    if missing:
        raise DgtrainError(
            f"data=cifar10: missing file(s) in {folder.resolve()}: {', '.join(missing)}. dgtrain never downloads "
            "data: extract cifar-10-python.tar.gz so that data_batch_1 ... data_batch_5 and test_batch lie in "
            "<data.root>/cifar-10-batches-py/, or set data.root."
        )

    def load(names, cap):
        parts = [_read_cifar_batch(folder / n) for n in names]
        data = np.concatenate([p[0] for p in parts])
        labels = np.concatenate([p[1] for p in parts])
        n = limit(len(data), cap)
        x = (torch.from_numpy(data[:n].copy()).float() / 255.0 - _CIFAR_MEAN) / _CIFAR_STD
        return x, torch.from_numpy(labels[:n])

    x_tr, y_tr = load(CIFAR_TRAIN, max_examples)
    x_va, y_va = load(CIFAR_VAL, max_val_examples)
    return _classification(
        x_tr,
        y_tr,
        x_va,
        y_va,
        10,
        CIFAR10_NAMES,
        _CIFAR_MEAN.flatten().tolist(),
        _CIFAR_STD.flatten().tolist(),
        pixels="cifar",
    )
