"""Datasets as in-memory tensors, the epoch-seeded batch sampler, and the loaders built from them.

Every dataset here implements `__getitems__`, so the DataLoader fetches a whole batch with one
indexing operation instead of one Python call per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset

from dgtrain.errors import DgtrainError

TASKS = ("regression", "classification", "seq2seq", "lm")


@dataclass
class DataInfo:
    """What a model needs to know about its data to size itself."""

    task: str
    in_shape: tuple[int, ...] = ()  # per example, e.g. (1, 8, 8) for digits, (10,) for diabetes
    out_dim: int = 1  # regression targets per example
    num_classes: int = 0
    vocab_size: int = 0
    pad_id: int | None = None
    bos_id: int | None = None
    eos_id: int | None = None
    max_len: int = 0  # longest sequence (tokens) the model must handle
    extra: dict = field(default_factory=dict)


@dataclass
class DataBundle:
    train: Dataset
    val: Dataset  # what the run validates on (best.pt, sweeps): always carved from the training files
    info: DataInfo
    # The official held-out test set where a dataset has one (MNIST t10k, CIFAR-10 test_batch): scored
    # only by `dgtrain eval --split test` and `trainer.test_at_end=true`, never to select anything.
    test: Dataset | None = None
    # A transform of training batches already on the device (data.augment); never applied to val/test.
    augment: Callable | None = None


def _identity(batch):
    return batch


class TensorPairs(Dataset):
    """(inputs, targets) tensors held in memory; a batch is one fancy-index per tensor."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        assert len(x) == len(y), (x.shape, y.shape)
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]

    def __getitems__(self, idx: Sequence[int]):
        idx_t = torch.as_tensor(idx)
        return self.x[idx_t], self.y[idx_t]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that orders epoch `epoch` of a run seeded with `seed` (documented, so a
    hand-written loop can reproduce dgtrain's data order exactly)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class EpochBatchSampler:
    """Yields index batches; epoch e is `torch.randperm(n, generator=epoch_generator(seed, e))`.

    The order depends only on (seed, epoch), so resuming at (epoch, batch k) needs no saved RNG.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool, seed: int, drop_last: bool = False):
        if n == 0:
            raise ValueError("empty dataset")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = (
            n,
            batch_size,
            shuffle,
            seed,
            drop_last,
        )
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        return self.n // self.batch_size if self.drop_last else -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = (
            torch.randperm(self.n, generator=epoch_generator(self.seed, self.epoch))
            if self.shuffle
            else torch.arange(self.n)
        )
        for b in range(self.start_batch, len(self)):
            yield order[b * self.batch_size : (b + 1) * self.batch_size].tolist()


def make_loader(
    ds: Dataset, batch_size: int, *, shuffle: bool, seed: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    sampler = EpochBatchSampler(len(ds), batch_size, shuffle=shuffle, seed=seed)
    collate = getattr(ds, "collate", _identity)
    return DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic random train/val split of n examples, from the run's seed."""
    if not 0.0 < val_fraction < 1.0:
        raise DgtrainError(f"data.val_fraction={val_fraction}: must be a number in (0, 1).")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = max(1, int(round(n * val_fraction)))
    if n - n_val < 1:
        raise DgtrainError(
            f"data: {n} example(s) leave none for training after the validation split "
            f"(data.val_fraction={val_fraction}); use more data (data.max_examples) or a smaller fraction."
        )
    return perm[n_val:], perm[:n_val]


def limit(n: int, cap: int | None) -> int:
    return n if cap is None else min(n, int(cap))
