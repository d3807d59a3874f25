"""Bias Correction, BiC (Wu et al., CVPR 2019, "Large scale incremental learning").

Task t (n = n_old old classes, m new ones, lambda = n / (n + m), T = ``method_args.T``):

1. A held-out split: from every old class ``val_per_class`` of its exemplars,
   and the same number of images from every new class, set aside; stage 1
   never sees them. The paper splits the exemplar memory 9:1 into train/val
   and takes a validation set of the same size per class from the new data;
   cilab's default takes round(``val_fraction`` * m_old) per class, m_old the
   exemplars each old class has (10% of the memory, the paper's 9:1).
2. Stage 1, on the rest of the task's images and exemplars:

       L = (1 - lambda) * CE(z[:, :n_seen], y)
           + lambda * mean_b sum_{c < n_old} -softmax(z_old/T)_c * log softmax(z[:, :n_old]/T)_c

   z_old are the previous model's logits, its bias correction included.
3. Stage 2: a two-parameter bias layer on the new classes' logits,

       q_c = alpha * z_c + beta   (n_old <= c < n_seen),    q_c = z_c for old classes,

   trained with CE(q[:, :n_seen], y) on the held-out split, everything else
   frozen. Old tasks keep the (alpha, beta) of their own stage 2.

The bias layers live in the network's head (``BiasCorrectedHead``: the
linear layer followed by per-output alpha / beta buffers), so the FC
classifier, the frozen old model, ``train.keep_best`` and checkpoints all
see the corrected logits; being buffers, no stage-1 optimiser touches them.

Departures: (1) stage 2 is fitted on the held-out images' logits computed
once, unaugmented, in eval mode (the rest is frozen, so those logits are
fixed), full batch with Adam (``bias_steps``, ``bias_lr``), where the paper
runs SGD epochs over augmented batches; (2) the first task has no old
classes, hence no held-out split and no stage 2 (as in the paper).

The paper's CIFAR-100 figures: BiC's own paper gives CIFAR-100 (ResNet-32,
2000 exemplars) in steps of 20 classes, as a curve. The figures to check
against are those later papers measured with BiC's settings on the splits
cilab runs (from memory of the tables; treat the decimals as uncertain):
B0-10 (10 tasks of 10 classes) average incremental accuracy 65.08%
(Yan et al., CVPR 2021, DER's table 1); B50 in 10 steps of 5 classes
53.21% (Douillard et al., ECCV 2020, PODNet's table 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..losses import ce_with_kd
from .base import Method, Outputs, TaskContext, register


@dataclass
class BiCArgs:
    T: float = 2.0  # distillation temperature
    val_fraction: float = 0.1  # held out per class: this fraction of an old class's exemplars
    bias_steps: int = 500  # full-batch steps of stage 2
    bias_lr: float = 0.02  # Adam's learning rate in stage 2


class BiasCorrectedHead(nn.Module):
    """``fc`` followed by per-output affine corrections: fc(f) * alpha + beta (buffers, 1 and 0 at first)."""

    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc
        self.register_buffer("alpha", torch.ones(fc.out_features))
        self.register_buffer("beta", torch.zeros(fc.out_features))

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc(f) * self.alpha + self.beta


@register("bic")
class BiC(Method):
    Args = BiCArgs
    own_loss = True  # CE + KD of its own
    distills = True
    uses_memory = True
    limits = {"T": "> 0", "val_fraction": "in (0, 1)", "bias_steps": "> 0", "bias_lr": "> 0"}

    def build_model(self, model_cfg, num_classes: int, image_size: int = 32) -> nn.Module:
        model = super().build_model(model_cfg, num_classes, image_size)
        model.head = BiasCorrectedHead(model.head)
        return model

    def uses_old_model(self, ctx: TaskContext) -> bool:
        return ctx.n_old > 0  # BiC's own distillation term, whatever the loss section says

    def training_data(self, ctx: TaskContext) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = super().training_data(ctx)
        if ctx.n_old == 0:
            return x, y
        m_old = min(len(ctx.memory.per_class[c]) for c in range(ctx.n_old))
        per_class = max(1, round(self.args.val_fraction * m_old))
        held = torch.zeros(len(y), dtype=torch.bool, device=y.device)
        for c in range(ctx.n_seen):
            idx = (y == c).nonzero().squeeze(1)
            pick = torch.randperm(len(idx), device=y.device, generator=ctx.generator)[:per_class]
            held[idx[pick]] = True
        ctx.extra["bic_val"] = (x[held], y[held])
        return x[~held], y[~held]

    def loss(self, x: torch.Tensor, y: torch.Tensor, out: Outputs, old: Outputs | None,
             ctx: TaskContext) -> torch.Tensor:
        return ce_with_kd(out.logits, y, None if old is None else old.logits, ctx.n_old, ctx.n_seen, self.args.T)

    def after_train(self, ctx: TaskContext) -> None:
        if ctx.n_old == 0:
            return
        x_val, y_val = ctx.extra.pop("bic_val")
        alpha, beta = self.fit_bias(ctx, x_val, y_val)
        head = ctx.model.head
        head.alpha[ctx.n_old: ctx.n_seen] = alpha
        head.beta[ctx.n_old: ctx.n_seen] = beta
        ctx.log(f"BiC task {ctx.t + 1}: alpha {alpha:.4f}, beta {beta:.4f} on {len(y_val)} held-out images")

    def fit_bias(self, ctx: TaskContext, x_val: torch.Tensor, y_val: torch.Tensor) -> tuple[float, float]:
        """Stage 2: (alpha, beta) minimising CE of the corrected logits on the held-out images."""
        head = ctx.model.head
        with torch.no_grad():
            z = head(ctx.features(x_val))[:, : ctx.n_seen].float()  # the corrections so far included
        new = torch.zeros(ctx.n_seen, dtype=torch.bool, device=z.device)
        new[ctx.n_old:] = True
        return fit_affine(z, y_val, new, self.args.bias_steps, self.args.bias_lr)


def fit_affine(z: torch.Tensor, y: torch.Tensor, new: torch.Tensor, steps: int, lr: float) -> tuple[float, float]:
    """argmin over (alpha, beta) of CE(where(new, alpha * z + beta, z), y), from (1, 0), full-batch Adam."""
    ab = torch.tensor([1.0, 0.0], device=z.device, requires_grad=True)
    opt = torch.optim.Adam([ab], lr=lr)
    for _ in range(steps):
        q = torch.where(new, ab[0] * z + ab[1], z)
        loss = F.cross_entropy(q, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(ab[0].detach()), float(ab[1].detach())
