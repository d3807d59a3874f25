"""Dark Experience Replay++, DER++ (Buzzega et al., NeurIPS 2020, "Dark experience for general continual learning").

The memory keeps, beside each exemplar's image and label, the network's
logits for it (its "dark knowledge"). Task t trains on its images plus the
exemplars, each batch B = new images N and replayed exemplars R:

    L = mean_{i in N} CE(z_i[:, :n_seen], y_i)
        + alpha * mean_{i in R} ||z_i - s_i||^2 / O
        + beta  * mean_{i in R} CE(z_i[:, :n_seen], y_i)

s_i are the stored logits (all O outputs of the network: the paper matches
the whole logit vector), alpha = ``method_args.alpha``, beta =
``method_args.beta`` (the MSE is the mean over outputs, as in the
authors' code). A batch without replayed images has only the first term.

The stored logits travel with the images as a per-sample tensor of the
training data (``training_data`` returns (x, y, stored), stored = [is
exemplar, logits]); they are kept in this method's state, one tensor per
class aligned row by row with ``ExemplarMemory``'s per-class images: when
the memory cuts a class to its first m, so does this (``after_memory``).

Departures, all from cilab's one-loop, class-balanced memory: (1) the
memory is class-balanced (m = K / n_seen per class, ``memory.selection``,
the preset uses ``random``), where the paper uses reservoir sampling over
the stream; (2) the logits of task t's exemplars are stored once, after
task t's training, on the unaugmented images in eval mode, where the paper
stores the logits of the (augmented) training batch at the moment a sample
enters the reservoir; (3) exemplars are mixed into the task's training set,
not drawn as two separate replay batches beside every stream batch, so the
alpha and beta terms share one replayed subset of each batch.

The paper's figures: DER++ was evaluated on Seq-CIFAR-10, Seq-TinyImageNet
(ResNet-18) and MNIST variants, not on CIFAR-100 B0-10. Class-IL on
Seq-CIFAR-10 (5 tasks of 2 classes): 64.88% with 200 exemplars, 72.70% with
500, 85.24% with 5120 (from memory of the paper's table 2; uncertain).
Later papers report DER++ on CIFAR-100 in 10 tasks of 10 classes (2000
exemplars) at a final accuracy of about 50-55% (uncertain, the follow-up
X-DER paper, Boschini et al. TPAMI 2022).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, Outputs, TaskContext, register


@dataclass
class DERppArgs:
    alpha: float = 0.1  # weight of the logit MSE on replayed exemplars (the paper's CIFAR-10 setting is 0.1-0.2)
    beta: float = 0.5  # weight of the CE on replayed exemplars' labels


@register("derpp")
class DERpp(Method):
    Args = DERppArgs
    own_loss = True  # CE + stored-logit MSE + replay CE
    uses_memory = True

    limits = {"alpha": ">= 0", "beta": ">= 0"}

    def __init__(self, args=None):
        super().__init__(args)
        self.logits: dict[int, torch.Tensor] = {}  # class -> stored logits, row i = memory.per_class[class][i]

    def training_data(self, ctx: TaskContext) -> tuple[torch.Tensor, ...]:
        x, y = ctx.data(ctx.n_old, ctx.n_seen)
        # stored[:, 0] = 1 for a replayed exemplar, 0 for a new image; stored[:, 1:] its logits
        stored = torch.zeros(len(y), 1 + ctx.num_classes, device=y.device)
        if len(ctx.memory):
            mx, my = ctx.memory.data(ctx.device)
            s = torch.cat([self.logits[c].to(y.device) for c in ctx.memory.classes])  # memory.data's order
            mem = torch.cat([torch.ones(len(my), 1, device=y.device), s], dim=1)
            x, y, stored = torch.cat([x, mx]), torch.cat([y, my]), torch.cat([stored, mem])
        return x, y, stored

    def loss(self, x: torch.Tensor, y: torch.Tensor, out: Outputs, old: Outputs | None,
             ctx: TaskContext, stored: torch.Tensor | None = None) -> torch.Tensor:
        z = out.logits.float()
        ce = F.cross_entropy(z[:, : ctx.n_seen], y, reduction="none")
        if stored is None:  # a second stage trained without stored logits
            return ce.mean()
        replay = stored[:, 0]
        new = 1 - replay
        # masked means without reading the counts back to the host (CUDA-graph safe)
        n_new, n_rep = new.sum().clamp_min(1), replay.sum().clamp_min(1)
        mse = (z - stored[:, 1:]).pow(2).mean(dim=1)
        return ((new * ce).sum() / n_new + self.args.alpha * (replay * mse).sum() / n_rep
                + self.args.beta * (replay * ce).sum() / n_rep)

    def after_memory(self, ctx: TaskContext) -> None:
        # Mirror ExemplarMemory.reduce (each class cut to its first m), then
        # store the logits of the exemplars just chosen for the new classes.
        for c in list(self.logits):
            self.logits[c] = self.logits[c][: len(ctx.memory.per_class[c])].clone()
        model = ctx.model
        for c in ctx.new_classes:
            if c in ctx.memory.per_class:
                with torch.no_grad():
                    self.logits[c] = model.head(ctx.features(ctx.memory.per_class[c])).float()
        for c, imgs in ctx.memory.per_class.items():
            assert len(self.logits[c]) == len(imgs), f"DER++: stored logits out of step with class {c}'s exemplars"

    def state_dict(self) -> dict:
        return {"logits": {c: v.cpu() for c, v in self.logits.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.logits = {int(c): v for c, v in state.get("logits", {}).items()}
