"""Image classification data: `synthetic_images`, scikit-learn's bundled `digits`, `mnist` and
`cifar10` read from their standard distribution files (never downloaded), and `image_folder`
(one subfolder per class, torchvision's ImageFolder layout).

Splits of the file-based sets: `val` is carved from the training files (`val_fraction`, from the
run's seed), so best.pt, sweeps and early stops select on it; the official test files become `test`,
scored only by `dgtrain eval --split test` and `trainer.test_at_end=true`. Pixels are normalised per
channel with the mean and std of the training split (or `data.mean`/`data.std`)."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch

from dgtrain.data import DataBundle, DataInfo, TensorPairs, limit, split_indices
from dgtrain.data.augment import ImageAugment
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


def _channel_stats(
    x: torch.Tensor, mean: list[float] | None, std: list[float] | None, data: str
) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Per-channel mean and std: `data.mean`/`data.std` when given, else measured on `x` (the training
    split, never the validation or test images)."""
    c = x.shape[1]
    if (mean is None) != (std is None):
        raise DgtrainError(
            f"data={data}: set both data.mean and data.std (one value per channel), or neither to measure "
            "them on the training split."
        )
    if mean is not None:
        for key, v in (("mean", mean), ("std", std)):
            if len(v) != c:
                raise DgtrainError(
                    f"data.{key}={list(v)}: {len(v)} value(s), but the images have {c} channel(s); give one "
                    "value per channel (or null to measure them on the training split)."
                )
        if any(float(s) <= 0 for s in std):
            raise DgtrainError(f"data.std={list(std)}: every value must be positive.")
        shape = (1, c, 1, 1)
        return torch.tensor(mean).float().view(shape), torch.tensor(std).float().view(shape), "data.mean/std"
    dims = (0, 2, 3)
    m = x.mean(dims, keepdim=True, dtype=torch.float64)
    sd = (x.double() - m).pow(2).mean(dims, keepdim=True).sqrt().clamp_min(1e-6)
    return m.float(), sd.float(), "training split"


def _image_bundle(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    data: str,
    seed: int,
    val_fraction: float,
    max_examples: int | None,
    num_classes: int,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    augment: bool = False,
    crop_padding: int = 4,
    hflip: bool = True,
    extra: dict | None = None,
) -> DataBundle:
    """Images in [0, 1] shaped (N, C, H, W) from the training files -> train/val split (val carved with
    the run's seed), normalised with training statistics, plus the official test set if any."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise DgtrainError(
            f"data.val_fraction={val_fraction}: must lie strictly between 0 and 1 (the share of the training "
            f"files held out for validation; data={data} validates on it, never on its test set)."
        )
    n = limit(len(x), max_examples)
    train_idx, val_idx = split_indices(n, float(val_fraction), seed)
    m, sd, source = _channel_stats(x[train_idx], mean, std, data)

    def norm(t: torch.Tensor) -> torch.Tensor:
        return (t - m) / sd

    info = DataInfo(
        task="classification",
        in_shape=tuple(x.shape[1:]),
        num_classes=num_classes,
        # what `dgtrain predict`/`export` need to prepare new images as training did (dgtrain/runs.py)
        extra={
            "normalise": {"mean": m.flatten().tolist(), "std": sd.flatten().tolist(), "from": source},
            **(extra or {}),
        },
    )
    if int(crop_padding) < 0:
        raise DgtrainError(f"data.crop_padding={crop_padding}: must be 0 or more (pixels of zero padding).")
    return DataBundle(
        TensorPairs(norm(x[train_idx]), y[train_idx]),
        TensorPairs(norm(x[val_idx]), y[val_idx]),
        info,
        test=TensorPairs(norm(test[0]), test[1]) if test is not None else None,
        augment=ImageAugment(int(crop_padding), bool(hflip)) if augment else None,
    )


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
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
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
    val_fraction: float = 0.1,
    max_examples: int | None = None,
    max_test_examples: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    augment: bool = False,
    crop_padding: int = 4,
    hflip: bool = False,
) -> DataBundle:
    """MNIST (or any idx files in its layout: Fashion-MNIST, KMNIST) under `root` (or `root/MNIST/raw`).

    Validation = `val_fraction` of the training images; test = the t10k files (`--split test`)."""
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
        x = torch.from_numpy(images[:n].copy()).float().unsqueeze(1) / 255.0
        return x, torch.from_numpy(labels[:n].astype(np.int64))

    x_tr, y_tr = prep(arrays["train_images"], arrays["train_labels"], None, "training")
    test = prep(arrays["test_images"], arrays["test_labels"], max_test_examples, "test")
    return _image_bundle(
        x_tr,
        y_tr,
        data="mnist",
        seed=seed,
        val_fraction=val_fraction,
        max_examples=max_examples,
        num_classes=10,
        test=test,
        mean=mean,
        std=std,
        augment=augment,
        crop_padding=crop_padding,
        hflip=hflip,
        extra={"class_names": DIGIT_NAMES, "pixels": "idx"},
    )


# -------------------------------------------------------------------------------------------- CIFAR-10

CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST = ("test_batch",)


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
    val_fraction: float = 0.1,
    max_examples: int | None = None,
    max_test_examples: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    augment: bool = True,
    crop_padding: int = 4,
    hflip: bool = True,
) -> DataBundle:
    """CIFAR-10 from the python batches under `root/cifar-10-batches-py` (or `root`).

    Validation = `val_fraction` of data_batch_1..5; test = test_batch (`--split test`)."""
    base = Path(root).expanduser()
    folder = next(
        (d for d in (base / "cifar-10-batches-py", base) if (d / "test_batch").is_file()),
        base / "cifar-10-batches-py",
    )
    missing = [n for n in CIFAR_TRAIN + CIFAR_TEST if not (folder / n).is_file()]
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
        return torch.from_numpy(data[:n].copy()).float() / 255.0, torch.from_numpy(labels[:n])

    x_tr, y_tr = load(CIFAR_TRAIN, None)
    return _image_bundle(
        x_tr,
        y_tr,
        data="cifar10",
        seed=seed,
        val_fraction=val_fraction,
        max_examples=max_examples,
        num_classes=10,
        test=load(CIFAR_TEST, max_test_examples),
        mean=mean,
        std=std,
        augment=augment,
        crop_padding=crop_padding,
        hflip=hflip,
        extra={"class_names": CIFAR10_NAMES, "pixels": "cifar"},
    )


# ----------------------------------------------------------------------------------------- image folders

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".ppm", ".pgm", ".tif", ".tiff")


def _read_class_folders(
    root: Path, key: str, channels: int, image_size: int | None, classes: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images under root/<class>/ as floats in [0, 1], (N, C, H, W); class index = sorted folder name
    (torchvision's ImageFolder order), or the position in `classes` when given (a test folder)."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as e:
        raise DgtrainError(
            "data=image_folder reads images with Pillow, which is not installed: pip install 'dgtrain[images]' "
            "(or pip install pillow)."
        ) from e
    if not root.is_dir():
        raise DgtrainError(
            f"{key}={root}: no such directory. Expected one subfolder per class holding its images "
            "(torchvision's ImageFolder layout: ROOT/cat/001.png, ROOT/dog/002.jpg, ...)."
        )
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise DgtrainError(
            f"{key}={root}: no class subfolders. Put each class's images in its own subfolder "
            "(ROOT/cat/001.png, ROOT/dog/002.jpg, ...); the folder names become the class names."
        )
    if classes is None:
        classes = found
    elif unknown := [c for c in found if c not in classes]:
        raise DgtrainError(
            f"{key}={root}: class folder(s) {', '.join(unknown)} do not exist under data.root; the classes "
            f"the model learns are {', '.join(classes)}."
        )
    mode = {1: "L", 3: "RGB"}.get(int(channels))
    if mode is None:
        raise DgtrainError(f"data.channels={channels}: expected 1 (greyscale) or 3 (RGB).")
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        if folder.is_dir() and not files:
            raise DgtrainError(
                f"{key}={root}: class folder {name}/ holds no images ({', '.join(IMAGE_SUFFIXES)}). Remove the "
                "folder or add its images."
            )
        for f in files:
            try:
                with Image.open(f) as im:
                    im = im.convert(mode)
                    if image_size is not None and im.size != (image_size, image_size):
                        im = im.resize((image_size, image_size), Image.BILINEAR)
                    arr = np.asarray(im, dtype=np.uint8)
            except (OSError, UnidentifiedImageError) as e:
                raise DgtrainError(f"{f}: not a readable image ({e}). Remove or replace the file.") from e
            if images and arr.shape != images[0].shape:
                raise DgtrainError(
                    f"{f}: {arr.shape[1]}x{arr.shape[0]} pixels, but {images[0].shape[1]}x{images[0].shape[0]} "
                    "before it. Images of one run share one size: set data.image_size=N to resize every "
                    "image to N x N."
                )
            images.append(arr)
            labels.append(label)
    x = torch.from_numpy(np.stack(images)).float() / 255.0
    x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.long), classes


def image_folder(
    *,
    seed: int,
    root: str | None,
    test_root: str | None = None,
    image_size: int | None = None,
    channels: int = 3,
    val_fraction: float = 0.1,
    max_examples: int | None = None,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    augment: bool = True,
    crop_padding: int = 4,
    hflip: bool = True,
) -> DataBundle:
    """A directory of class subfolders (ROOT/<class>/<image>), read into memory with Pillow.

    Validation = `val_fraction` of it; `test_root`, in the same layout, is the held-out test set."""
    if not root:
        raise DgtrainError(
            "data=image_folder needs a directory: set data.root=/path/to/images (one subfolder per class)."
        )
    if image_size is not None and int(image_size) < 1:
        raise DgtrainError(f"data.image_size={image_size}: must be a positive number of pixels, or null.")
    size = None if image_size is None else int(image_size)
    x, y, classes = _read_class_folders(Path(root).expanduser(), "data.root", channels, size)
    if len(classes) < 2:
        raise DgtrainError(
            f"data.root={root}: only one class folder ({classes[0]}/); classification needs two."
        )
    test = None
    if test_root:
        xt, yt, _ = _read_class_folders(
            Path(test_root).expanduser(), "data.test_root", channels, size, classes
        )
        if xt.shape[1:] != x.shape[1:]:
            raise DgtrainError(
                f"data.test_root={test_root}: images of {tuple(xt.shape[1:])}, training images of "
                f"{tuple(x.shape[1:])}; set data.image_size=N to resize both."
            )
        test = (xt, yt)
    return _image_bundle(
        x,
        y,
        data="image_folder",
        seed=seed,
        val_fraction=val_fraction,
        max_examples=max_examples,
        num_classes=len(classes),
        test=test,
        mean=mean,
        std=std,
        augment=augment,
        crop_padding=crop_padding,
        hflip=hflip,
        extra={"class_names": classes, "pixels": None},
    )
