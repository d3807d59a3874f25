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

    The labels ``y`` live on the training device. The images ``x`` normally do
    too; when they are kept in host memory instead (``data.placement``, a
    dataset too large for the GPU), each batch is gathered on the host into
    one of two pinned staging buffers and copied to the device asynchronously,
    so the host gathers batch k+1 while batch k is copied and trained on.
    The shuffle and the augmentation draw from the same generator on the same
    device either way, so both placements train on the same batches.

    ``per_sample``: further tensors with one row per image, on the labels'
    device (DER++'s stored logits), cut into the same batches, unaugmented.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, normalizer: Normalizer,
                 augment: bool, generator: torch.Generator, channels_last: bool = False, stage: bool | None = None,
                 per_sample: tuple[torch.Tensor, ...] = ()):
        self.x, self.y = x, y
        self.per_sample = tuple(per_sample)
        self.batch_size = batch_size
        self.normalizer = normalizer
        self.augment = augment
        self.generator = generator
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.stage = x.device != y.device if stage is None else stage  # stage=True: tests on one device

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __iter__(self):
        perm = torch.randperm(len(self.y), device=self.y.device, generator=self.generator)
        batches = _staged_batches(self.x, perm, self.batch_size, self.y.device) if self.stage else None
        for i in range(0, len(perm), self.batch_size):
            idx = perm[i: i + self.batch_size]
            xb = next(batches) if batches is not None else self.x[idx]
            if self.augment:
                xb = augment_batch(xb, self.generator)
            yield (self.normalizer(xb).contiguous(memory_format=self.memory_format), self.y[idx],
                   *(t[idx] for t in self.per_sample))


def _staged_batches(x: torch.Tensor, perm: torch.Tensor, batch_size: int, device: torch.device):
    """Batches ``x[perm[i:i+batch_size]]`` of host images, on ``device``, through two pinned buffers."""
    order = perm.cpu()  # one host sync per epoch, not per batch
    pin = device.type == "cuda"
    buffers = [torch.empty((min(batch_size, len(x)), *x.shape[1:]), dtype=x.dtype, pin_memory=pin) for _ in range(2)]
    copied = [None, None]  # per buffer: the event after its last copy to the device
    for k, i in enumerate(range(0, len(order), batch_size)):
        idx = order[i: i + batch_size]
        buf = buffers[k % 2][: len(idx)]
        if copied[k % 2] is not None:
            copied[k % 2].synchronize()  # its copy of batch k-2 must be done before it is refilled
        torch.index_select(x, 0, idx, out=buf)
        out = buf.to(device, non_blocking=pin)
        if pin:
            copied[k % 2] = torch.cuda.Event()
            copied[k % 2].record()
        else:
            out = out.clone()  # same device: .to returned the buffer itself, which batch k+2 overwrites
        yield out


def data_placement(nbytes: int, device: torch.device, placement: str) -> str:
    """``data.placement`` resolved: "device" or "host" for a dataset of ``nbytes`` bytes.

    auto: on the GPU when the images take at most DEVICE_DATA_FRACTION of its
    free memory (the rest is left to the model, its activations and the
    exemplars), in pinned host memory otherwise. Without a GPU both are the
    same memory.
    """
    if placement != "auto":
        return placement
    if device.type != "cuda":
        return "device"
    free, _ = torch.cuda.mem_get_info(device)
    return "device" if nbytes <= DEVICE_DATA_FRACTION * free else "host"


DEVICE_DATA_FRACTION = 0.5


def place(x: torch.Tensor, device: torch.device, where: str) -> torch.Tensor:
    """``x`` on the device, or in host memory (pinned where a GPU will copy from it)."""
    if where == "device":
        return x.to(device)
    return x.pin_memory() if device.type == "cuda" else x
