"""Datasets as in-memory tensors, the epoch-seeded batch sampler, and the loaders built from them.

Every dataset here is `InMemory`: a batch is one indexing operation per tensor (`take`), never one
Python call per sample. With `data.num_workers=0` dgtrain indexes them directly (`DirectLoader`), with
no DataLoader, in the same order; with workers, a DataLoader fetches the same batches through
`__getitems__`. `to(device)` moves a dataset's tensors once (`data.device_resident`), after which its
batches are drawn on the GPU with no per-batch host-to-device copy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

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


class InMemory(Dataset):
    """A dataset held as tensors on one device (`device`): a batch is `take(idx, idx_host)`."""

    device = torch.device("cpu")

    def take(self, idx: torch.Tensor, idx_host: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The batch of examples `idx` (a long tensor on `self.device`); `idx_host` holds the same
        indices on the CPU, for what the host must know about a batch (a padded length)."""
        raise NotImplementedError

    def to(self, device: torch.device) -> InMemory:
        """A copy whose tensors live on `device` (made once; batches are then drawn there)."""
        raise NotImplementedError

    def nbytes(self) -> int:
        """Bytes that `to(device)` puts on the device."""
        raise NotImplementedError

    def __getitems__(self, idx: Sequence[int]):
        idx_t = torch.as_tensor(idx)
        return self.take(idx_t, idx_t)


class TensorPairs(InMemory):
    """(inputs, targets) tensors held in memory; a batch is one fancy-index per tensor."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        assert len(x) == len(y), (x.shape, y.shape)
        self.x, self.y = x, y
        self.device = x.device

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]

    def take(self, idx, idx_host):
        return self.x[idx], self.y[idx]

    def to(self, device):
        return TensorPairs(self.x.to(device), self.y.to(device))

    def nbytes(self) -> int:
        return self.x.nbytes + self.y.nbytes


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator that orders epoch `epoch` of a run seeded with `seed` (documented, so a
    hand-written loop can reproduce dgtrain's data order exactly)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class EpochBatchSampler:
    """Yields index batches; epoch e is `torch.randperm(n, generator=epoch_generator(seed, e))`.

    The order depends only on (seed, epoch), so resuming at (epoch, batch k) needs no saved RNG.

    With `world` processes, batch k is the k-th *global* batch of `batch_size * world` indices of that one
    permutation, and rank r takes its r-th contiguous slice: the ranks' shards are disjoint and together
    are exactly what one process with the global batch would see (docs/distributed.md). A short last
    global batch is split as evenly as possible; should it hold fewer indices than ranks, the missing
    ones are taken from the start of the permutation, so that no rank gets an empty batch.
    """

    def __init__(
        self,
        n: int,
        batch_size: int,
        shuffle: bool,
        seed: int,
        drop_last: bool = False,
        rank: int = 0,
        world: int = 1,
    ):
        if n == 0:
            raise ValueError("empty dataset")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world size {world}")
        self.n, self.batch_size, self.shuffle, self.seed, self.drop_last = (
            n,
            batch_size,
            shuffle,
            seed,
            drop_last,
        )
        self.rank, self.world = rank, world
        self.global_batch = batch_size * world
        self.epoch = 0
        self.start_batch = 0
        self.max_batches: int | None = None  # trainer.limit_*_batches / overfit_batches: batches per epoch

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __len__(self) -> int:
        g = self.global_batch
        full = self.n // g if self.drop_last else -(-self.n // g)
        return full if self.max_batches is None else max(1, min(full, self.max_batches))

    def order(self, epoch: int) -> torch.Tensor:
        """Epoch `epoch`'s order of the examples (on the CPU), the same on every rank."""
        if self.shuffle:
            return torch.randperm(self.n, generator=epoch_generator(self.seed, epoch))
        return torch.arange(self.n)

    def shard(self, order: torch.Tensor, b: int) -> torch.Tensor:
        """This rank's indices of global batch `b` of `order` (a tensor on any device)."""
        g = self.global_batch
        chunk = order[b * g : (b + 1) * g]
        if self.world == 1:
            return chunk
        if len(chunk) == g:
            return chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        if len(chunk) < self.world:
            chunk = torch.cat([chunk, order[: self.world - len(chunk)]])
        return torch.tensor_split(chunk, self.world)[self.rank]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order(self.epoch)
        for b in range(self.start_batch, len(self)):
            yield self.shard(order, b).tolist()


class DirectLoader:
    """What a DataLoader with num_workers=0 does for an `InMemory` dataset, without the DataLoader:
    the same EpochBatchSampler order, one `take` per batch, wherever the dataset's tensors live.

    Starting an epoch's iterator makes the same draw from torch's global RNG that a DataLoader makes
    (the base seed of its workers), so the run's random stream, and with it dropout, is the same
    whichever loader serves the data. The order is computed on the CPU and, for data on the GPU,
    copied there once per epoch; each batch is then a slice of it and a gather on the device."""

    def __init__(self, ds: InMemory, batch_sampler: EpochBatchSampler, pin_memory: bool = False):
        self.dataset, self.pin_memory = ds, pin_memory and ds.device.type == "cpu"
        self.batch_sampler = batch_sampler

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        torch.empty((), dtype=torch.int64).random_()  # the draw a DataLoader iterator makes when it starts
        return self._batches(self.batch_sampler.epoch, self.batch_sampler.start_batch)

    def _batches(self, epoch: int, start: int) -> Iterator[tuple[torch.Tensor, ...]]:
        sampler, ds = self.batch_sampler, self.dataset
        order = sampler.order(epoch)
        # pinned, so the copy is queued without waiting for the device
        on_device = order if ds.device.type == "cpu" else order.pin_memory().to(ds.device, non_blocking=True)
        same = on_device is order  # data on the CPU: shard the order once per batch
        for b in range(start, len(sampler)):
            idx_host = sampler.shard(order, b)
            batch = ds.take(idx_host if same else sampler.shard(on_device, b), idx_host)
            # page-locked batches copy to the GPU without blocking the host (`to(non_blocking=True)`)
            yield tuple(t.pin_memory() for t in batch) if self.pin_memory else batch


# data.device_resident=auto moves an in-memory dataset to the GPU when it takes at most this share of
# the GPU's free memory (train and validation splits together), leaving the rest to the model.
RESIDENT_SHARE = 0.25


def flag(value: Any) -> str:
    """'auto', 'true' or 'false' from a config value (Hydra reads `true`/`false` as booleans)."""
    return str(value).lower()


def keep_on_device(
    mode: Any, data: DataBundle, device: torch.device, num_workers: int, free_bytes: int | None
) -> bool:
    """`data.device_resident`: whether the datasets' tensors move to `device` once (docs/loop.md).
    auto: on CUDA, for in-memory data read in this process that fits in RESIDENT_SHARE of `free_bytes`."""
    mode = flag(mode)
    in_memory = isinstance(data.train, InMemory) and isinstance(data.val, InMemory)
    if mode == "false":
        return False
    if mode == "true":
        if not in_memory:
            raise DgtrainError(
                f"data.device_resident=true: this dataset ({type(data.train).__name__}) is not held as "
                "tensors in memory, so it cannot be moved to the device. Use data.device_resident=auto "
                "or false."
            )
        if num_workers:
            raise DgtrainError(
                f"data.device_resident=true needs data.num_workers=0 (got {num_workers}): batches of "
                "device-resident data are drawn on the device, in this process. Set data.num_workers=0 "
                "or data.device_resident=false."
            )
        return True
    if device.type != "cuda" or not in_memory or num_workers or free_bytes is None:
        return False
    return data.train.nbytes() + data.val.nbytes() <= RESIDENT_SHARE * free_bytes


def batch_sampler_for(
    ds: Dataset, batch_size: int, *, shuffle: bool, seed: int, rank: int = 0, world: int = 1
) -> EpochBatchSampler:
    """The epoch-seeded sampler (rank `rank`'s shard of each global batch); a dataset may bring its own
    for training (random LM windows: data/sequences.py)."""
    if shuffle and hasattr(ds, "batch_sampler"):
        return ds.batch_sampler(batch_size, seed, rank=rank, world=world)
    return EpochBatchSampler(len(ds), batch_size, shuffle=shuffle, seed=seed, rank=rank, world=world)


def _collate_for(ds: Dataset):
    """dgtrain's in-memory datasets return a whole batch from `__getitems__` (nothing to collate); any
    other map-style Dataset (a user's, docs/extending.md) returns one example per index, which torch's
    default collate stacks into the batch's tensors."""
    from torch.utils.data import Subset, default_collate

    base = ds
    while isinstance(base, Subset):  # trainer.overfit_batches wraps the training split
        base = base.dataset
    return _identity if isinstance(base, InMemory) else default_collate


def make_loader(
    ds: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int,
    num_workers: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
) -> DataLoader | DirectLoader:
    """A `DirectLoader` for in-memory data read in this process (num_workers=0), else a DataLoader.
    `batch_size` is per process; with `world` processes each one loads its shard of a global batch."""
    sampler = batch_sampler_for(ds, batch_size, shuffle=shuffle, seed=seed, rank=rank, world=world)
    if isinstance(ds, InMemory) and num_workers == 0:
        return DirectLoader(ds, sampler, pin_memory=pin_memory)
    collate = getattr(ds, "collate", None) or _collate_for(ds)
    return DataLoader(
        ds,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
    )


def limit_batches(loader: DataLoader, limit: float | None) -> None:
    """At most `limit` batches per epoch (a whole number >= 1), or that fraction of them (0 < limit < 1)."""
    if limit is None:
        return
    sampler = loader.batch_sampler
    sampler.max_batches = None
    full = len(sampler)
    sampler.max_batches = int(limit) if limit >= 1 else max(1, int(full * limit))


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
