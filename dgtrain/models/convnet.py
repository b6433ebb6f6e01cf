"""`convnet`: conv 3x3 -> ReLU -> conv 3x3 -> ReLU -> linear (the network of the design write-up),
with input channels, image size and class count taken from the data."""

from __future__ import annotations

import torch
from torch import nn

from dgtrain.data import DataInfo, flag
from dgtrain.errors import DgtrainError


class ConvNet(nn.Module):
    tasks = ("classification",)

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        num_classes: int,
        channels: tuple[int, int] = (16, 32),
        channels_last: str = "auto",
    ):
        super().__init__()
        self.channels_last_mode, self.channels_last = flag(channels_last), False
        c1, c2 = channels
        # padding=1 keeps the spatial size, so the classifier sees c2 * H * W features.
        self.conv1 = nn.Conv2d(in_channels, c1, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, kernel_size=3, padding=1)
        self.fc = nn.Linear(c2 * image_size[0] * image_size[1], num_classes)

    @classmethod
    def from_data(
        cls, info: DataInfo, channels: list[int] | tuple[int, int] = (16, 32), channels_last: str = "auto"
    ) -> ConvNet:
        if len(info.in_shape) != 3:
            raise DgtrainError(
                f"model=convnet needs image data shaped (channels, height, width); got {info.in_shape}."
            )
        if len(channels) != 2:
            raise DgtrainError(
                f"model.channels={list(channels)}: the convnet has exactly two conv layers; give two widths."
            )
        shape = (info.in_shape[1], info.in_shape[2])
        return cls(info.in_shape[0], shape, info.num_classes, tuple(channels), channels_last)

    def for_device(self, device: torch.device) -> None:
        """`model.channels_last`: keep weights and activations in NHWC order, which cuDNN's convolutions
        (and their tensor-core kernels) run fastest on. auto: on CUDA; true: anywhere; false: never."""
        mode = self.channels_last_mode
        if mode == "true" or (mode == "auto" and device.type == "cuda"):
            self.to(memory_format=torch.channels_last)
            self.channels_last = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:  # one copy of the input; every activation after it stays NHWC
            x = x.contiguous(memory_format=torch.channels_last)
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.fc(x.flatten(1))
