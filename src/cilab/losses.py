"""The study's classification + distillation loss pairs, keyed by ``loss.classification``-``loss.distillation``.

Notation: ``z`` are the new model's logits (B x O; O = all outputs, 100 on
CIFAR-100, present from the start), ``y`` the labels (output indices),
``z_old`` the frozen previous model's logits, ``n_old`` the number of classes
seen before the current task, ``n_seen`` the number seen including it, so the
new slice is the outputs ``[n_old, n_seen)``. "mean over B x k" is the mean over
all B*k elements; BCE(x, t) = BCEWithLogits = -t log sigmoid(x) - (1-t) log(1 - sigmoid(x));
softmax_O is a softmax over all O outputs, sliced afterwards.

The study's notebooks (issue 14, item 2), one pair per row; a task with no
distillation (the first task, or ``loss.distillation=none``) uses the pair's
``first`` rule:

=======  ===========================================  ==========================================================
pair     classification (first task / later tasks)    distillation (tasks 2..)
=======  ===========================================  ==========================================================
bce-bce  sum BCE(z, onehot) over [0, O) / (B*O) /      sum BCE(z, sigmoid(z_old)) over [0, n_old) / (B*O)
         ... over [n_old, O) / (B*O)                   (iCaRL: with the classification, ONE mean over B x O)
ce-mse   CE(z[:, :n_seen], y) / CE(z over all O, y)    mean over B x n_old of (softmax_O(z) - softmax_O(z_old))^2
bce-mse  mean BCE over B x n_seen on [0, n_seen) /     mean over B x n_old of (sigmoid(z) - sigmoid(z_old))^2
         mean BCE over B x (new) on [n_old, n_seen)
mse-mse  mean over B x n_seen of (softmax_O(z) -       as bce-mse (sigmoid MSE)
         onehot)^2 on [0, n_seen) / same on the
         new slice, mean over B x (new)
ce-bce   as ce-mse                                     mean over B x n_old of BCE(softmax_O(z), softmax_O(z_old))
                                                       on [0, n_old): probabilities passed as logits (the study's)
=======  ===========================================  ==========================================================

On the first task [0, n_seen) = the first task's own outputs (10 on CIFAR-100).
The one-hot target is over all outputs and then sliced, so an exemplar of an
old class has an all-zero target on the new slice.

Without distillation at every task (fine-tuning, joint): bce-none is the
study's fine-tuning loss, BCE over all O, mean over B x O; ce-none and mse-none
are not in the study and apply the ce / mse first-task rule on [0, n_seen).

Options (both default to the study):

* ``loss.ce_bce_input``: ``softmax`` (the study) | ``logits``: iCaRL's BCE
  distillation on the logits, mean over B x n_old of BCE(z, sigmoid(z_old)) on
  [0, n_old). The study feeds probabilities in [0, 1] to BCEWithLogits, which
  applies a second sigmoid, so its "predictions" live in [0.5, 0.73], and the
  gradient reaches the logits only through a softmax over all O (scaled by
  p ~ 1/O): on random logits (B=128, O=100, n_old=50) its gradient is 10-50x
  smaller than the logits variant's.
* ``loss.unseen_outputs``: ``train`` (the study) | ``ignore``: the whole loss is
  computed on ``z[:, :n_seen]`` and ``z_old[:, :n_seen]``, i.e. every formula
  above with O replaced by n_seen, as if the head grew with each task. The
  outputs of classes not seen yet get no gradient at all; with ``train`` the
  BCE zero targets (bce-bce, bce-none) push them down from the first task on,
  and every softmax over all O trains them too (issue 20). bce-bce's normaliser becomes
  B * n_seen, the number of elements the loss still covers, so it stays one
  mean (iCaRL's form) and equals the study's at the last task; keeping B * O
  would instead scale the loss, and so the learning rate, by n_seen / O.

All terms are computed in fp32 and are plain tensor functions: no host
synchronisation and no branching on data, so the training step can be captured
as a CUDA graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .registry import Registry

Tensor = torch.Tensor

CLASSIFICATIONS = ("bce", "ce", "mse")
DISTILLATIONS = ("bce", "mse", "none")


def _onehot(y: Tensor, z: Tensor) -> Tensor:
    return F.one_hot(y, z.shape[1]).to(z.dtype)


def _bce(x: Tensor, t: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(x, t, reduction="none")


# -- classification terms: first-task rules (z, y, n_seen) and later-task rules (z, y, n_old, n_seen)


def bce_all_outputs(z: Tensor, y: Tensor, n_seen: int) -> Tensor:
    """mean over B x O of BCE(z, onehot(y)): the study's fine-tuning, joint and iCaRL first task."""
    return _bce(z, _onehot(y, z)).mean()


def bce_from_old(z: Tensor, y: Tensor, n_old: int, n_seen: int) -> Tensor:
    """sum over b, o in [n_old, O) of BCE(z, onehot(y)) / (B*O)   (iCaRL / LwF, the study's BCE-BCE).

    Divided by B*O, not by the number of its own elements, so that with the BCE
    distillation it is one mean over the whole logit matrix, as iCaRL's single loss.
    """
    return _bce(z[:, n_old:], _onehot(y, z)[:, n_old:]).sum() / z.numel()


def bce_first_slice(z: Tensor, y: Tensor, n_seen: int) -> Tensor:
    """mean over B x n_seen of BCE(z, onehot(y)) on [0, n_seen)   (the study's BCE-MSE, first task)."""
    return _bce(z[:, :n_seen], _onehot(y, z)[:, :n_seen]).mean()


def bce_new_slice(z: Tensor, y: Tensor, n_old: int, n_seen: int) -> Tensor:
    """mean over B x (n_seen - n_old) of BCE(z, onehot(y)) on the new slice   (the study's BCE-MSE)."""
    return _bce(z[:, n_old:n_seen], _onehot(y, z)[:, n_old:n_seen]).mean()


def ce_first_slice(z: Tensor, y: Tensor, n_seen: int) -> Tensor:
    """mean_b -log softmax(z[b, :n_seen])[y_b]   (the study's eq. 1 on the first task's outputs)."""
    return F.cross_entropy(z[:, :n_seen], y)


def ce_all_outputs(z: Tensor, y: Tensor, n_old: int, n_seen: int) -> Tensor:
    """mean_b -log softmax(z[b, :])[y_b], over ALL O outputs   (the study's CE-MSE, CE-BCE)."""
    return F.cross_entropy(z, y)


def mse_first_slice(z: Tensor, y: Tensor, n_seen: int) -> Tensor:
    """mean over B x n_seen of (softmax_O(z) - onehot(y))^2 on [0, n_seen)   (the study's MSE-MSE, first task)."""
    return (z.softmax(dim=1) - _onehot(y, z))[:, :n_seen].pow(2).mean()


def mse_new_slice(z: Tensor, y: Tensor, n_old: int, n_seen: int) -> Tensor:
    """mean over B x (n_seen - n_old) of (softmax_O(z) - onehot(y))^2 on the new slice   (the study's MSE-MSE)."""
    return (z.softmax(dim=1) - _onehot(y, z))[:, n_old:n_seen].pow(2).mean()


# -- distillation terms (z, z_old, n_old)


def bce_icarl_distillation(z: Tensor, z_old: Tensor, n_old: int) -> Tensor:
    """sum over b, o < n_old of BCE(z, sigmoid(z_old)) / (B*O)   (iCaRL; see ``bce_from_old``)."""
    return _bce(z[:, :n_old], torch.sigmoid(z_old[:, :n_old])).sum() / z.numel()


def softmax_mse_distillation(z: Tensor, z_old: Tensor, n_old: int) -> Tensor:
    """mean over B x n_old of (softmax_O(z) - softmax_O(z_old))^2 on [0, n_old)   (the study's CE-MSE, eq. 2)."""
    return (z.softmax(dim=1)[:, :n_old] - z_old.softmax(dim=1)[:, :n_old]).pow(2).mean()


def sigmoid_mse_distillation(z: Tensor, z_old: Tensor, n_old: int) -> Tensor:
    """mean over B x n_old of (sigmoid(z) - sigmoid(z_old))^2 on [0, n_old)   (the study's BCE-MSE, MSE-MSE)."""
    return (torch.sigmoid(z[:, :n_old]) - torch.sigmoid(z_old[:, :n_old])).pow(2).mean()


# ``loss.ce_bce_input``: what the CE-BCE pair's distillation feeds to BCEWithLogits.
CE_BCE_INPUTS: Registry[Callable[[Tensor, Tensor, int], Tensor]] = Registry("loss.ce_bce_input")


@CE_BCE_INPUTS.register("softmax")
def softmax_bce_distillation(z: Tensor, z_old: Tensor, n_old: int) -> Tensor:
    """mean over B x n_old of BCEWithLogits(softmax_O(z), softmax_O(z_old)) on [0, n_old)   (the study's CE-BCE).

    Probabilities are passed where logits belong, reproduced as the study ran it.
    """
    return _bce(z.softmax(dim=1)[:, :n_old], z_old.softmax(dim=1)[:, :n_old]).mean()


@CE_BCE_INPUTS.register("logits")
def logit_bce_distillation(z: Tensor, z_old: Tensor, n_old: int) -> Tensor:
    """mean over B x n_old of BCEWithLogits(z, sigmoid(z_old)) on [0, n_old)   (cilab's principled CE-BCE)."""
    return _bce(z[:, :n_old], torch.sigmoid(z_old[:, :n_old])).mean()


# ``loss.unseen_outputs``: which outputs the loss sees.
UNSEEN_OUTPUTS: Registry[Callable[[Tensor, int], Tensor]] = Registry("loss.unseen_outputs")


@UNSEEN_OUTPUTS.register("train")
def keep_unseen(z: Tensor, n_seen: int) -> Tensor:
    """All O outputs, as the study (outputs of future classes are trained toward 0)."""
    return z


@UNSEEN_OUTPUTS.register("ignore")
def drop_unseen(z: Tensor, n_seen: int) -> Tensor:
    """Only the seen outputs [0, n_seen): the formulas with O = n_seen, no gradient to future classes."""
    return z[:, :n_seen]


# -- the pairs


@dataclass(frozen=True)
class LossPair:
    first: Callable[[Tensor, Tensor, int], Tensor]  # classification when nothing is distilled
    classification: Callable[[Tensor, Tensor, int, int], Tensor] | None  # with distillation
    distillation: Callable[[Tensor, Tensor, int], Tensor] | None


# A pair is built from the criterion's options, so a pair can take its own (ce-bce: ce_bce_input).
LOSS_PAIRS: Registry[Callable[["Criterion"], LossPair]] = Registry("loss pair")

LOSS_PAIRS.register("bce-bce")(lambda c: LossPair(bce_all_outputs, bce_from_old, bce_icarl_distillation))
LOSS_PAIRS.register("ce-mse")(lambda c: LossPair(ce_first_slice, ce_all_outputs, softmax_mse_distillation))
LOSS_PAIRS.register("bce-mse")(lambda c: LossPair(bce_first_slice, bce_new_slice, sigmoid_mse_distillation))
LOSS_PAIRS.register("mse-mse")(lambda c: LossPair(mse_first_slice, mse_new_slice, sigmoid_mse_distillation))
LOSS_PAIRS.register("ce-bce")(lambda c: LossPair(ce_first_slice, ce_all_outputs, CE_BCE_INPUTS[c.ce_bce_input]))
LOSS_PAIRS.register("bce-none")(lambda c: LossPair(bce_all_outputs, None, None))
LOSS_PAIRS.register("ce-none")(lambda c: LossPair(ce_first_slice, None, None))
LOSS_PAIRS.register("mse-none")(lambda c: LossPair(mse_first_slice, None, None))


@dataclass
class Criterion:
    """Classification + distillation for one task; built from the ``loss`` section."""

    classification: str
    distillation: str
    n_old: int
    n_seen: int
    ce_bce_input: str = "softmax"
    unseen_outputs: str = "train"
    pair: LossPair = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.pair = LOSS_PAIRS[f"{self.classification}-{self.distillation}"](self)
        self._outputs = UNSEEN_OUTPUTS[self.unseen_outputs]

    @classmethod
    def from_config(cls, loss_cfg, n_old: int, n_seen: int) -> "Criterion":
        return cls(loss_cfg.classification, loss_cfg.distillation, n_old, n_seen,
                   ce_bce_input=loss_cfg.ce_bce_input, unseen_outputs=loss_cfg.unseen_outputs)

    @property
    def distills(self) -> bool:
        return self.distillation != "none" and self.n_old > 0

    def terms(self, z: Tensor, y: Tensor, z_old: Tensor | None) -> tuple[Tensor, Tensor]:
        """(classification, distillation); the distillation is 0 on a task that does not distill."""
        z = self._outputs(z.float(), self.n_seen)  # losses in fp32 even under bf16 autocast
        if not self.distills:
            return self.pair.first(z, y, self.n_seen), z.new_zeros(())
        z_old = self._outputs(z_old.float(), self.n_seen)
        return (self.pair.classification(z, y, self.n_old, self.n_seen),
                self.pair.distillation(z, z_old, self.n_old))

    def __call__(self, z: Tensor, y: Tensor, z_old: Tensor | None) -> Tensor:
        clf, dist = self.terms(z, y, z_old)
        return clf + dist if self.distills else clf


def ce_with_kd(z: Tensor, y: Tensor, z_old: Tensor | None, n_old: int, n_seen: int, T: float) -> Tensor:
    """(1 - lambda) * CE(z[:, :n_seen], y) + lambda * KD_T, lambda = n_old / n_seen (WA, BiC).

    KD_T = mean_b sum_{c < n_old} -softmax(z_old/T)_c * log softmax(z[:, :n_old]/T)_c; without an
    old model (the first task) the loss is the cross-entropy alone.
    """
    z = z.float()
    ce = F.cross_entropy(z[:, :n_seen], y)
    if z_old is None:
        return ce
    lam = n_old / n_seen
    target = torch.softmax(z_old[:, :n_old].float() / T, dim=1)
    kd = -(target * torch.log_softmax(z[:, :n_old] / T, dim=1)).sum(dim=1).mean()
    return (1 - lam) * ce + lam * kd


def feature_cosine_distillation(f: Tensor, f_old: Tensor) -> Tensor:
    """mean_b (1 - cos(f_b, f_old_b)): LUCIR's less-forget term and PODNet's POD-flat, on the embeddings."""
    return (1 - F.cosine_similarity(f.float(), f_old.float(), dim=1)).mean()
