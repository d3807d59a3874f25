"""Exemplar selection (herding | random) and the ``real`` exemplar builder."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..registry import Registry

SELECTIONS: Registry = Registry("exemplar selection")
EXEMPLAR_BUILDERS: Registry = Registry("memory kind")


@dataclass
class BuildContext:
    """What an exemplar builder may use after a task has been trained."""

    cfg: Any  # the ``memory`` section
    model: torch.nn.Module  # the network just trained, in eval mode
    features: Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> L2-normalised features
    normalizer: Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> normalised float input
    generator: torch.Generator  # seeded, on the device
    num_classes: int  # outputs of the network
    log: Callable[[str], None] = print
    progress: bool = True  # show progress bars (long builders such as DeepInversion)


def _pad_classes(feats: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """List of (n_c x d) -> C x N x d zero-padded, and the C x N validity mask."""
    n = max(len(f) for f in feats)
    out = feats[0].new_zeros(len(feats), n, feats[0].shape[1])
    valid = torch.zeros(len(feats), n, dtype=torch.bool, device=feats[0].device)
    for i, f in enumerate(feats):
        out[i, : len(f)] = f
        valid[i, : len(f)] = True
    return out, valid


@SELECTIONS.register("herding")
def herding(feats: list[torch.Tensor], m: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """iCaRL herding for several classes at once.

    ``feats`` holds one (n_c x d) L2-normalised feature matrix per class.
    Step k adds, among the images not yet chosen, the one that brings the mean
    of the chosen set closest (L2) to the class mean. Returns, per class, the
    indices of min(m, n_c) images in the order they were chosen.
    All classes advance together as C x N tensor ops: no per-image Python.
    """
    x, valid = _pad_classes(feats)
    counts = valid.sum(1)
    mu = x.sum(1) / counts[:, None]
    available = valid.clone()
    chosen_sum = torch.zeros_like(mu)
    rows = torch.arange(len(feats), device=x.device)
    order = []
    for k in range(min(m, x.shape[1])):
        cand = (chosen_sum[:, None, :] + x) / (k + 1)  # mean if each image were added
        dist = (cand - mu[:, None, :]).pow(2).sum(-1)
        dist = dist.masked_fill(~available, float("inf"))
        idx = dist.argmin(1)
        order.append(idx)
        available[rows, idx] = False
        chosen_sum += x[rows, idx]
    order = torch.stack(order, 1) if order else torch.empty(len(feats), 0, dtype=torch.long, device=x.device)
    return [order[i, : min(m, len(f))] for i, f in enumerate(feats)]


@SELECTIONS.register("random")
def random_selection(feats: list[torch.Tensor], m: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """m images per class drawn uniformly without replacement (seeded)."""
    return [torch.randperm(len(f), device=f.device, generator=generator)[:m] for f in feats]


@EXEMPLAR_BUILDERS.register("real")
def build_real(ctx: BuildContext, class_images: dict[int, torch.Tensor], m: int) -> dict[int, torch.Tensor]:
    """Exemplars are training images chosen by ``memory.selection``."""
    labels = sorted(class_images)
    feats = [ctx.features(class_images[c]) for c in labels]
    picks = SELECTIONS[ctx.cfg.selection](feats, m, ctx.generator)
    return {c: class_images[c][idx] for c, idx in zip(labels, picks)}
