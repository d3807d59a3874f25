"""Classification and distillation losses, keyed by ``loss.classification`` / ``loss.distillation``.

Notation: ``z`` are the new model's logits (B x O, O = all outputs, 100 on
CIFAR-100, present from the start), ``y`` the labels (output indices), ``n_old``
the number of classes seen before the current task, ``n_seen`` the number seen
including it, ``z_old`` the frozen previous model's logits.

The sigmoid (BCE) terms are element-wise over outputs and normalised by B*O,
the number of elements of the whole logit matrix. That makes the classification
and distillation terms two parts of one mean, so with ``bce``/``bce``

    clf + dist == mean over all B x O of BCE(z, t),
    t = sigmoid(z_old) on the old outputs, one-hot(y) on the rest,

which is exactly iCaRL's single loss (tested). The softmax terms (ce, mse) are
over the seen outputs ``[0, n_seen)``: a softmax needs every competing class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .registry import Registry

CLASSIFICATION_LOSSES: Registry = Registry("classification loss")
DISTILLATION_LOSSES: Registry = Registry("distillation loss")


@CLASSIFICATION_LOSSES.register("bce")
def bce_classification(z: torch.Tensor, y: torch.Tensor, first: int, n_seen: int) -> torch.Tensor:
    """sum_{b, o >= first} BCEWithLogits(z[b,o], onehot(y)[b,o]) / (B*O).

    Covers outputs ``[first, O)``: all of them without distillation (so old and
    future outputs are pushed to 0, as plain fine-tuning does), only the
    non-distilled ones ``[n_old, O)`` with it (LwF/iCaRL).
    """
    target = F.one_hot(y, z.shape[1]).to(z.dtype)
    part = F.binary_cross_entropy_with_logits(z[:, first:], target[:, first:], reduction="sum")
    return part / z.numel()


@CLASSIFICATION_LOSSES.register("ce")
def ce_classification(z: torch.Tensor, y: torch.Tensor, first: int, n_seen: int) -> torch.Tensor:
    """mean_b -log softmax(z[b, :n_seen])[y_b]   (the study's eq. 1)."""
    return F.cross_entropy(z[:, :n_seen], y)


@CLASSIFICATION_LOSSES.register("mse")
def mse_classification(z: torch.Tensor, y: torch.Tensor, first: int, n_seen: int) -> torch.Tensor:
    """mean_b sum_{c < n_seen} (softmax(z[b, :n_seen])_c - onehot(y_b)_c)^2."""
    p = z[:, :n_seen].float().softmax(dim=1)
    return (p - F.one_hot(y, n_seen).to(p.dtype)).pow(2).sum(dim=1).mean()


@DISTILLATION_LOSSES.register("bce")
def bce_distillation(z: torch.Tensor, z_old: torch.Tensor, n_old: int) -> torch.Tensor:
    """sum_{b, o < n_old} BCEWithLogits(z[b,o], sigmoid(z_old[b,o])) / (B*O)   (iCaRL)."""
    target = torch.sigmoid(z_old[:, :n_old].float())
    part = F.binary_cross_entropy_with_logits(z[:, :n_old].float(), target, reduction="sum")
    return part / z.numel()


@DISTILLATION_LOSSES.register("mse")
def mse_distillation(z: torch.Tensor, z_old: torch.Tensor, n_old: int) -> torch.Tensor:
    """mean_b sum_{c < n_old} (softmax(z[b, :n_old])_c - softmax(z_old[b, :n_old])_c)^2   (the study's eq. 2, L2)."""
    p = z[:, :n_old].float().softmax(dim=1)
    q = z_old[:, :n_old].float().softmax(dim=1)
    return (p - q).pow(2).sum(dim=1).mean()


@DISTILLATION_LOSSES.register("none")
def no_distillation(z: torch.Tensor, z_old: torch.Tensor, n_old: int) -> torch.Tensor:
    """No distillation: 0."""
    return z.new_zeros(())


@dataclass
class Criterion:
    """Classification + distillation for one task; built from the ``loss`` section."""

    classification: str
    distillation: str
    n_old: int
    n_seen: int

    @property
    def distills(self) -> bool:
        return self.distillation != "none" and self.n_old > 0

    def __call__(self, z: torch.Tensor, y: torch.Tensor, z_old: torch.Tensor | None) -> torch.Tensor:
        z = z.float()  # losses in fp32 even under bf16 autocast
        first = self.n_old if self.distills else 0
        loss = CLASSIFICATION_LOSSES[self.classification](z, y, first, self.n_seen)
        if self.distills:
            loss = loss + DISTILLATION_LOSSES[self.distillation](z, z_old, self.n_old)
        return loss
