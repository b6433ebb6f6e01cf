"""On-device augmentation of image training batches: random crop with zero padding, horizontal flip.

It runs on the batch after it reached the device (the training loop calls it; validation and test
batches are never augmented), vectorised over the batch, with an independent draw for every image.
torchvision's v2 transforms draw one set of parameters per call, so applied to a batched tensor they
would crop and flip every image of the batch the same way; dgtrain therefore does not need torchvision
here. Random numbers come from torch's generator of the batch's device, seeded by `seed=`.
"""

from __future__ import annotations

import torch


class ImageAugment:
    """`(x, y) -> (x', y)` for image batches shaped (N, C, H, W).

    padding: pad each side by this many pixels (zeros: the training mean after normalisation), then
      crop back to H x W at a random offset per image (0: no crop). hflip: mirror half the images."""

    def __init__(self, padding: int = 4, hflip: bool = True):
        if int(padding) < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding, self.hflip = int(padding), bool(hflip)

    def __repr__(self) -> str:
        return f"ImageAugment(padding={self.padding}, hflip={self.hflip})"

    def __call__(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        x, *rest = batch
        if self.padding:
            x = random_crop(x, self.padding)
        if self.hflip:
            x = random_hflip(x)
        return (x, *rest)


def random_crop(x: torch.Tensor, padding: int) -> torch.Tensor:
    """Each image padded by `padding` zeros and cropped back to its size at its own random offset."""
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
    off = torch.randint(0, 2 * padding + 1, (2, n), device=x.device)
    rows = (off[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (off[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    img = torch.arange(n, device=x.device)[:, None, None, None]
    ch = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[img, ch, rows, cols]  # one gather: (N, C, H, W)


def random_hflip(x: torch.Tensor) -> torch.Tensor:
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
