"""Callables that the `_target_` tests build (allowed through `allowed_targets=[tests.]`)."""

from __future__ import annotations

from torch import nn


class Backbone(nn.Module):
    def __init__(self, in_features: int, hidden: int):
        super().__init__()
        self.fc = nn.Linear(in_features, hidden)


class Classifier(nn.Module):
    """A lightning-hydra-template style wrapper: the network arrives built, from `model.net`."""

    def __init__(self, net: nn.Module, num_classes: int, extras: list | None = None):
        super().__init__()
        self.net, self.head = net, nn.Linear(net.fc.out_features, num_classes)
        self.extras = extras


def record(*args, **kwargs):
    return args, kwargs
