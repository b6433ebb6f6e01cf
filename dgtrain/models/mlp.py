"""`mlp`: fc1 -> sigmoid -> fc2 on flattened inputs (the network of the design write-up)."""

from __future__ import annotations

import math

import torch
from torch import nn

from dgtrain.data import DataInfo


class MLP(nn.Module):
    tasks = ("regression", "classification")

    def __init__(self, in_features: int, hidden_size: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_size)
        self.fc2 = nn.Linear(hidden_size, out_features)

    @classmethod
    def from_data(cls, info: DataInfo, hidden_size: int = 64) -> MLP:
        out = info.num_classes if info.task == "classification" else info.out_dim
        return cls(math.prod(info.in_shape), hidden_size, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.sigmoid(self.fc1(x.flatten(1))))
