"""Elastic Weight Consolidation, EWC (Kirkpatrick et al., PNAS 2017).

Task t trains on its own images (no exemplars) with a cross-entropy over the
seen outputs plus a quadratic penalty that holds each parameter near its value
after earlier tasks, in proportion to its Fisher information:

    L = CE(z[:, :n_seen], y) + lambda/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2

theta*_k are the parameters after task k, and F_k the diagonal empirical
Fisher information of task k's training data,

    F_k,i = mean over batches b of (d/dtheta_i  mean_{x in b} -log p(y|x))^2 * |b|,

taken at theta*_k with the network in eval mode, no augmentation.

Departures: (1) the Fisher is estimated from mini-batch gradients (batch
``method_args.fisher_batch``), not per-sample gradients: cheaper, common
practice, and a biased estimate; (2) ``method_args.mode=online`` keeps one
running Fisher sum and the latest anchor (Schwarz et al. 2018's online EWC
with gamma = 1) instead of one penalty per task (``per_task``, the paper);
(3) ``method_args.normalize_fisher=true`` (the default) divides each task's
Fisher by its largest entry. The penalty's curvature is then at most lambda,
and SGD with momentum 0.9 stays stable on it while lr * lambda < 3.8 (on
digits the raw Fisher with lambda = 1000 and lr 0.1 made the loss NaN in
task 2); ``false`` is the paper's raw Fisher, for which lambda must be
chosen against the Fisher's scale.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import Method, Outputs, TaskContext, register


@dataclass
class EWCArgs:
    lambda_: float = 10.0  # strength of the penalty (with normalize_fisher: keep lr * lambda_ < 3.8)
    mode: str = "per_task"  # per_task (the paper) | online (one Fisher sum, latest anchor)
    fisher_batch: int = 64
    normalize_fisher: bool = True  # divide each task's Fisher by its largest entry (see the module doc)


@register("ewc")
class EWC(Method):
    Args = EWCArgs
    own_loss = True  # CE + the Fisher penalty
    limits = {"mode": ("per_task", "online"), "lambda_": ">= 0", "fisher_batch": "> 0"}
    absent_means = {"normalize_fisher": False}  # the raw Fisher, as cilab had it before the setting (fec3475)

    def __init__(self, args=None):
        super().__init__(args)
        self.fishers: list[list[torch.Tensor]] = []  # one list of per-parameter tensors per penalty term
        self.anchors: list[list[torch.Tensor]] = []

    def before_task(self, ctx: TaskContext) -> None:
        self.fishers = [[f.to(ctx.device) for f in fs] for fs in self.fishers]
        self.anchors = [[a.to(ctx.device) for a in an] for an in self.anchors]

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        """lambda/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2 (0 before the first task has ended)."""
        params = list(model.parameters())
        total = params[0].new_zeros((), dtype=torch.float32)
        for fisher, anchor in zip(self.fishers, self.anchors):
            for p, f, a in zip(params, fisher, anchor):
                total = total + (f * (p.float() - a).pow(2)).sum()
        return self.args.lambda_ / 2 * total

    def loss(self, x: torch.Tensor, y: torch.Tensor, out: Outputs, old: Outputs | None,
             ctx: TaskContext) -> torch.Tensor:
        return F.cross_entropy(out.logits[:, : ctx.n_seen].float(), y) + self.penalty(ctx.model)

    def fisher(self, ctx: TaskContext) -> list[torch.Tensor]:
        """Diagonal empirical Fisher of task t's training data at the current parameters."""
        model = ctx.model
        x, y = ctx.data(ctx.n_old, ctx.n_seen)
        params = list(model.parameters())
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        was_training = model.training
        model.eval()
        bs = self.args.fisher_batch
        for i in range(0, len(y), bs):
            xb = ctx.normalize(x[i: i + bs])
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb)[:, : ctx.n_seen].float(), y[i: i + bs]).backward()
            for f, p in zip(fisher, params):
                if p.grad is not None:
                    f += p.grad.float().pow(2) * len(xb)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return [f / max(len(y), 1) for f in fisher]

    def after_train(self, ctx: TaskContext) -> None:
        fisher = self.fisher(ctx)
        if self.args.normalize_fisher:
            top = max(float(f.max()) for f in fisher)
            fisher = [f / top for f in fisher] if top > 0 else fisher
        anchor = [p.detach().float().clone() for p in ctx.model.parameters()]
        if self.args.mode == "online" and self.fishers:
            self.fishers = [[a + b for a, b in zip(self.fishers[0], fisher)]]
            self.anchors = [anchor]
        else:
            self.fishers.append(fisher)
            self.anchors.append(anchor)

    def state_dict(self) -> dict:
        return {"fishers": [[f.cpu() for f in fs] for fs in self.fishers],
                "anchors": [[a.cpu() for a in an] for an in self.anchors]}

    def load_state_dict(self, state: dict) -> None:
        # On the CPU as saved; before_task moves them to the run's device.
        self.fishers = [list(fs) for fs in state.get("fishers", [])]
        self.anchors = [list(an) for an in state.get("anchors", [])]
