"""Batches cut from a whole split that lives on the device.

Shuffling, pad-4 random crop, horizontal flip and normalisation are batched
tensor ops on the device, driven by one seeded generator: no DataLoader, no
workers, no per-image Python (the airbench / hlb-CIFAR10 recipe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PAD = 4


def augment_batch(x: torch.Tensor, generator: torch.Generator | None = None,
                  offsets: torch.Tensor | None = None, flips: torch.Tensor | None = None) -> torch.Tensor:
    """Random 32x32 crop of the zero-padded (4 px) image and a flip with p=0.5.

    ``x`` is uint8 B x C x H x W. Crop and flip are one gather: the column index
    of a flipped image simply runs backwards. ``offsets`` (B x 2, in 0..8, as
    (dy, dx)) and ``flips`` (B, bool) may be given to make the result known.
    """
    b, c, h, w = x.shape
    if offsets is None:
        offsets = torch.randint(0, 2 * PAD + 1, (b, 2), device=x.device, generator=generator)
    if flips is None:
        flips = torch.rand(b, device=x.device, generator=generator) < 0.5
    padded = F.pad(x, (PAD, PAD, PAD, PAD))
    ar_h = torch.arange(h, device=x.device)
    ar_w = torch.arange(w, device=x.device)
    rows = offsets[:, 0:1] + ar_h  # B x H
    cols = offsets[:, 1:2] + torch.where(flips[:, None], (w - 1) - ar_w, ar_w)  # B x W
    bi = torch.arange(b, device=x.device)[:, None, None, None]
    ci = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class Normalizer:
    """uint8 -> float, (x/255 - mean) / std as one fused multiply-add."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor):
        self.scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)
        self.shift = (-mean / std).view(1, -1, 1, 1)

    def to(self, device) -> "Normalizer":
        n = Normalizer.__new__(Normalizer)
        n.scale, n.shift = self.scale.to(device), self.shift.to(device)
        return n

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addcmul(self.shift, x.float(), self.scale)


class BatchLoader:
    """Iterates seeded, shuffled, augmented, normalised batches of (x, y), or (x, y, *per_sample).

    ``per_sample``: further tensors with one row per image (DER++'s stored
    logits), cut into the same batches, unaugmented.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, normalizer: Normalizer,
                 augment: bool, generator: torch.Generator, channels_last: bool = False,
                 per_sample: tuple[torch.Tensor, ...] = ()):
        self.x, self.y = x, y
        self.per_sample = tuple(per_sample)
        self.batch_size = batch_size
        self.normalizer = normalizer
        self.augment = augment
        self.generator = generator
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        perm = torch.randperm(len(self.y), device=self.x.device, generator=self.generator)
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i: i + self.batch_size]
            xb = self.x[idx]
            if self.augment:
                xb = augment_batch(xb, self.generator)
            yield (self.normalizer(xb).contiguous(memory_format=self.memory_format), self.y[idx],
                   *(t[idx] for t in self.per_sample))
