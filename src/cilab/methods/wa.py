"""Weight Aligning, WA (Zhao et al., CVPR 2020, "Maintaining discrimination and fairness in class incremental learning").

Training of task t, on its images plus the exemplars (lambda = n_old / n_seen, T = ``method_args.T``):

    L = (1 - lambda) * CE(z[:, :n_seen], y)
        + lambda * mean_b sum_{c < n_old} -softmax(z_old/T)_c * log softmax(z[:, :n_old]/T)_c

After every SGD step the FC weights are clipped to be non-negative
(``method_args.clip``; the paper's weight clipping, which keeps the logits of
non-negative features comparable across classes). After the task, the
weight vectors of the new classes are rescaled so that their mean norm equals
the old classes' (weight aligning):

    gamma = mean_{c < n_old} ||W_c|| / mean_{n_old <= c < n_seen} ||W_c||,   W_c <- gamma * W_c for new c

Departures: the ResNet-32 head has a bias, which the paper's formula does not
have; cilab leaves the biases as trained (``method_args.align_bias=true``
scales the new biases by gamma too). The paper's CIFAR-100 B0-10 figure with
ResNet-32, 2000 exemplars: average incremental accuracy about 64.5%.
"""

from dataclasses import dataclass

import torch

from ..losses import ce_with_kd
from .base import Method, Outputs, TaskContext, register


@dataclass
class WAArgs:
    T: float = 2.0  # distillation temperature
    clip: bool = True  # clip FC weights to >= 0 after every step
    align_bias: bool = False  # also scale the new classes' biases by gamma


@register("wa")
class WeightAligning(Method):
    Args = WAArgs
    own_loss = True  # CE + KD of its own
    distills = True
    uses_memory = True
    limits = {"T": "> 0"}

    def uses_old_model(self, ctx: TaskContext) -> bool:
        return ctx.n_old > 0  # WA's own distillation term, whatever the loss section says

    def loss(self, x: torch.Tensor, y: torch.Tensor, out: Outputs, old: Outputs | None,
             ctx: TaskContext) -> torch.Tensor:
        return ce_with_kd(out.logits, y, None if old is None else old.logits, ctx.n_old, ctx.n_seen, self.args.T)

    def after_step(self, ctx: TaskContext) -> None:
        if self.args.clip:
            with torch.no_grad():
                ctx.model.head.weight.clamp_(min=0)

    def after_train(self, ctx: TaskContext) -> None:
        if ctx.n_old == 0:
            return
        with torch.no_grad():
            head = ctx.model.head
            norms = head.weight[: ctx.n_seen].norm(dim=1)
            gamma = norms[: ctx.n_old].mean() / norms[ctx.n_old:].mean()
            head.weight[ctx.n_old: ctx.n_seen] *= gamma
            if self.args.align_bias and head.bias is not None:
                head.bias[ctx.n_old: ctx.n_seen] *= gamma
        ctx.extra["gamma"] = float(gamma)
