"""`linreg`: one linear layer, y = x W^T + b."""

from __future__ import annotations

import math

import torch
from torch import nn

from dgtrain.data import DataInfo


class LinearRegression(nn.Module):
    tasks = ("regression",)

    def __init__(self, in_features: int, out_features: int = 1):
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)

    @classmethod
    def from_data(cls, info: DataInfo) -> LinearRegression:
        return cls(math.prod(info.in_shape), info.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.flatten(1))
