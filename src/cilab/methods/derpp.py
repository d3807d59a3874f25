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
task t's training, on the unaugmented images, where the paper stores the
logits of the (augmented) training batch at the moment a sample enters the
reservoir. Like the paper's, they are training-mode logits
(``store_logits=train``, the default): BatchNorm normalises with the
statistics of batches of ``train.batch_size`` exemplars that interleave the
new classes, as a shuffled training batch mixes them, and its running
statistics are put back afterwards. ``store_logits=eval`` stores eval-mode
logits (running statistics) instead, as cilab did before: after a short
training the running statistics lag the batch statistics, the eval-mode
logits come out orders of magnitude larger than any the network produces in
training (measured on digits after one epoch: 6e5 against 70), and the MSE
to them diverges (NaN in task 3 on digits, 1 epoch a task, seeds 0 and 1);
(3) exemplars are mixed into the task's training set,
not drawn as two separate replay batches beside every stream batch, so the
alpha and beta terms share one replayed subset of each batch; (4) both
cross-entropies run over the seen outputs, as for cilab's other softmax
methods (``ce_outputs=seen``); the paper does not say, and the authors' code
takes every output of the network (``ce_outputs=all``), which also pushes
down the logits of the classes still to come.

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
    store_logits: str = "train"  # train: training-mode logits, as the paper stores them | eval: eval-mode (cilab before)
    ce_outputs: str = "seen"  # seen: both CEs over z[:, :n_seen] | all: over every output (the authors' code)


@register("derpp")
class DERpp(Method):
    Args = DERppArgs
    own_loss = True  # CE + stored-logit MSE + replay CE
    uses_memory = True

    limits = {"alpha": ">= 0", "beta": ">= 0", "store_logits": ("train", "eval"), "ce_outputs": ("seen", "all")}
    absent_means = {"store_logits": "eval"}  # what cilab stored before the setting (d2e94f8)

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
        ce = F.cross_entropy(z if self.args.ce_outputs == "all" else z[:, : ctx.n_seen], y, reduction="none")
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
        new = [c for c in ctx.new_classes if c in ctx.memory.per_class]
        if new:
            self.logits.update(zip(new, self._logits(ctx, [ctx.memory.per_class[c] for c in new])))
        for c, imgs in ctx.memory.per_class.items():
            assert len(self.logits[c]) == len(imgs), f"DER++: stored logits out of step with class {c}'s exemplars"

    def _logits(self, ctx: TaskContext, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The logits to store for each new class's exemplars ``xs[i]`` (``store_logits``)."""
        model = ctx.model
        if self.args.store_logits == "eval":
            with torch.no_grad():
                return [model.head(ctx.features(x)).float() for x in xs]
        # Training mode. Batches interleave the classes (the first exemplar of every class, then
        # the second, ...: mixed as a shuffled batch is, without drawing from the generator), of
        # about train.batch_size images each (no tiny last batch to skew BatchNorm's statistics).
        sizes = [len(x) for x in xs]
        order = torch.argsort(torch.cat([torch.arange(n) for n in sizes]), stable=True).to(xs[0].device)
        x = torch.cat(xs)[order]
        saved = {n: b.clone() for n, b in model.named_buffers()}
        was_training = model.training
        model.train()
        try:
            with torch.no_grad():
                chunks = torch.tensor_split(x, -(-len(x) // ctx.train_cfg.batch_size))
                z = torch.cat([model(ctx.normalize(xb)).float() for xb in chunks])
        finally:  # the running statistics stay those of training
            with torch.no_grad():
                for n, b in model.named_buffers():
                    b.copy_(saved[n])
            model.train(was_training)
        back = torch.empty_like(z)
        back[order] = z  # row i of z belongs to exemplar order[i]
        return list(back.split(sizes))

    def state_dict(self) -> dict:
        return {"logits": {c: v.cpu() for c, v in self.logits.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.logits = {int(c): v for c, v in state.get("logits", {}).items()}
