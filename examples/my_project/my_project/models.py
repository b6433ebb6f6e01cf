"""Two ways to hand dgtrain a model.

`MLP` is a plain `nn.Module`: every size comes from the config. `Classifier` wraps any backbone built
from a nested `_target_` node (`model.net`) and sizes its head from the data through `from_data`.
"""

from __future__ import annotations

import torch
from torch import nn

from dgtrain.data import DataInfo


class MLP(nn.Module):
    """A plain module: dgtrain calls `MLP(**model_config)`."""

    def __init__(self, in_features: int, hidden: int, num_classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Backbone(nn.Module):
    def __init__(self, in_features: int, hidden: int, depth: int = 1):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(depth):
            layers += [nn.Linear(in_features if i == 0 else hidden, hidden), nn.ReLU()]
        self.layers = nn.Sequential(*layers)
        self.out_features = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Classifier(nn.Module):
    # The tasks this model learns; dgtrain refuses other data before training (validation.py).
    tasks = ("classification",)

    def __init__(self, net: nn.Module, num_classes: int):
        super().__init__()
        self.net = net
        self.head = nn.Linear(net.out_features, num_classes)

    @classmethod
    def from_data(cls, info: DataInfo, net: nn.Module) -> Classifier:
        """dgtrain calls this (when it exists) with the data's description and the built `model.net`."""
        return cls(net, num_classes=info.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.net(x.flatten(1)))
