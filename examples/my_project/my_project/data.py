"""A dataset function: dgtrain calls it with the keys under `data` (and `seed`) and gets a DataBundle."""

from __future__ import annotations

import torch

from dgtrain.data import DataBundle, DataInfo, TensorPairs, split_indices


def blobs(
    *, seed: int, n: int = 600, n_features: int = 16, num_classes: int = 4, val_fraction: float = 0.2
) -> DataBundle:
    """Gaussian clusters, one per class. Classification batches are (inputs float, targets long)."""
    g = torch.Generator().manual_seed(seed)
    centers = 1.5 * torch.randn(num_classes, n_features, generator=g)
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, n_features, generator=g)
    train, val = split_indices(n, val_fraction, seed)
    info = DataInfo(task="classification", in_shape=(n_features,), num_classes=num_classes)
    return DataBundle(TensorPairs(x[train], y[train]), TensorPairs(x[val], y[val]), info)
