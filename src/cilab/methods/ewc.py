"""Elastic Weight Consolidation, EWC (Kirkpatrick et al., PNAS 2017).

Task t trains on its own images (no exemplars) with a cross-entropy over the
seen outputs plus a quadratic penalty that holds each parameter near its value
after earlier tasks, in proportion to its Fisher information:

    L = CE(z[:, :n_seen], y) + lambda/2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2

theta*_k are the parameters after task k, and F_k the diagonal Fisher
information of task k's N training images x_n, taken at theta*_k with the
network in eval mode, no augmentation:

    F_k,i = 1/N sum_n (d/dtheta_i  -log p(y_n | x_n))^2

each image's own gradient (``method_args.fisher_estimator=per_sample``, the
default; computed with torch.func.vmap in chunks of ``fisher_batch`` images).

Departures, each a named option:
(1) y_n is the image's label (the empirical Fisher, as common code computes
it; ``method_args.fisher_labels=data``, the default). The paper's Fisher is an
expectation over the model's own predictions: ``fisher_labels=model`` draws
each y_n from p(. | x_n) over the seen outputs (one draw an image).
(2) ``fisher_estimator=batch`` squares the gradient of each mini-batch's mean
loss instead, F_k,i = sum_b |b| (d/dtheta_i mean_{n in b} -log p(y_n|x_n))^2 / N.
It is cheaper, and it is what cilab computed before the setting (so run
folders without it read as ``batch``). It equals the per-image Fisher where a
batch's images share one gradient, and falls towards 1/|b| of it where their
gradients disagree (they cancel in the mean).
(3) ``method_args.mode=online`` keeps one running Fisher sum and the latest
anchor (Schwarz et al. 2018's online EWC with gamma = 1) instead of one penalty
per task (``per_task``, the paper).
(4) ``method_args.normalize_fisher=true`` (the default) divides each task's
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
    fisher_batch: int = 64  # images a chunk of per-image gradients (per_sample: memory ~ fisher_batch x the
    # parameters, 120 MB for ResNet-32, 2.9 GB for ResNet-18) or a mini-batch (batch)
    normalize_fisher: bool = True  # divide each task's Fisher by its largest entry (see the module doc)
    fisher_estimator: str = "per_sample"  # per_sample (each image's gradient) | batch (mini-batch gradients)
    fisher_labels: str = "data"  # data (the empirical Fisher) | model (labels drawn from the model: the paper's)


@register("ewc")
class EWC(Method):
    Args = EWCArgs
    own_loss = True  # CE + the Fisher penalty
    limits = {"mode": ("per_task", "online"), "lambda_": ">= 0", "fisher_batch": "> 0",
              "fisher_estimator": ("per_sample", "batch"), "fisher_labels": ("data", "model")}
    # what cilab computed before each setting: the raw Fisher (fec3475), from mini-batch gradients
    absent_means = {"normalize_fisher": False, "fisher_estimator": "batch", "fisher_labels": "data"}

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
        """Diagonal Fisher of task t's training data at the current parameters (see the module doc)."""
        model = ctx.model
        x, y = ctx.data(ctx.n_old, ctx.n_seen)
        names, params = zip(*model.named_parameters())
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        was_training = model.training
        model.eval()
        squared = self._per_image_squared if self.args.fisher_estimator == "per_sample" else self._batch_squared
        bs = self.args.fisher_batch
        for i in range(0, len(y), bs):
            xb = ctx.normalize(x[i: i + bs])
            yb = y[i: i + bs]
            if self.args.fisher_labels == "model":  # one label an image, drawn from the model's prediction
                with torch.no_grad():
                    p = model(xb)[:, : ctx.n_seen].float().softmax(1)
                yb = torch.multinomial(p, 1, generator=ctx.generator).squeeze(1)
            for f, g2 in zip(fisher, squared(model, names, xb, yb, ctx.n_seen)):
                f += g2
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return [f / max(len(y), 1) for f in fisher]

    @staticmethod
    def _per_image_squared(model, names, xb, yb, n_seen) -> list[torch.Tensor]:
        """Sum over the chunk of each image's squared gradient, per parameter (torch.func)."""
        from torch.func import functional_call, grad, vmap

        # Only what trains: a frozen parameter keeps a zero Fisher, as in the batch estimate. The
        # others are read from the module (functional_call takes a partial mapping).
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        buffers = dict(model.named_buffers())  # eval mode: BatchNorm reads its running statistics

        def loss(p, xi, yi):
            z = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return F.cross_entropy(z[:, :n_seen].float(), yi.unsqueeze(0))

        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, xb, yb)  # fisher_batch x each parameter's size
        zero = torch.zeros((), device=xb.device)
        return [g[n].float().pow_(2).sum(0) if n in g else zero for n in names]  # squared in place: no second copy

    @staticmethod
    def _batch_squared(model, names, xb, yb, n_seen) -> list[torch.Tensor]:
        """|b| times the squared gradient of the chunk's mean loss, per parameter."""
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(xb)[:, :n_seen].float(), yb).backward()
        grads = dict((n, p.grad) for n, p in model.named_parameters())
        return [torch.zeros((), device=xb.device) if grads[n] is None else grads[n].float().pow(2) * len(xb)
                for n in names]

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
