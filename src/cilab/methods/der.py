"""Dynamically Expandable Representation, DER (Yan et al., CVPR 2021).

The network grows by one feature extractor per task (each a whole
``model.name`` backbone without its head). At task t the extractors
F_1..F_{t-1} are frozen (weights and batch-norm statistics: they stay in eval
mode), the new F_t trains, and the features are concatenated,

    u = [F_1(x), ..., F_t(x)],    z = W u + b   (a classifier over all features, all outputs),

    L = CE(z[:, :n_seen], y) + lambda_a * CE(z_a, y_a),

where z_a = W_a F_t(x) + b_a is the auxiliary classifier over the new
extractor's features alone, with n_new + 1 outputs: the new classes and one
"old" class, y_a = 0 for an old-class image, 1 + (y - n_old) for a new one.
It pushes F_t to learn what is new. The auxiliary loss applies from the
second task on. Training data: the task's images plus the exemplars
(``memory.*``, herding by default).

At growth the classifier W is rebuilt for the wider features: the old
columns keep their weights, the new extractor's columns start from the
default initialisation. F_t starts as a copy of F_{t-1} (``init=previous``,
as the authors' code does) or freshly drawn (``init=random``).

Departures: (1) no channel-level mask and pruning (the paper's sparsity
loss and "DER w/o P" vs "DER"): cilab is DER without pruning, whose
parameter count grows by one backbone per task; (2) no second, class-balanced
classifier-retraining stage (the paper re-trains the classifier on balanced
data after each task); the ``nme`` classifier, fitted on the exemplars, is
reported beside ``fc`` as a balanced alternative.

The paper's CIFAR-100 figures (ResNet-18-style backbones per the paper's
table 1, but the paper reports ResNet-32 too; 2000 exemplars; from memory,
treat as uncertain): B0-10 (10 tasks of 10 classes) average incremental
accuracy 75.36% for DER w/o P and 74.64% for DER; B50 in 10 steps of 5
classes about 72% (uncertain).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..models import Backbone, Outputs
from .base import Method, TaskContext, register


@dataclass
class DERArgs:
    aux_weight: float = 1.0  # lambda_a, the auxiliary loss's weight
    init: str = "previous"  # previous: the new extractor starts as a copy of the last one | random


class DERNet(Backbone):
    """Frozen old extractors + one trainable new one; ``head`` reads their concatenated features."""

    def __init__(self, make_extractor, num_classes: int):
        super().__init__()
        self.make_extractor = make_extractor  # () -> a backbone with .features and .feature_dim
        self.num_classes = num_classes
        self.extractors = nn.ModuleList([self._extractor()])
        self.dims = [self.extractors[0].feature_dim]
        self.head = nn.Linear(self.feature_dim, num_classes)
        self.aux_head: nn.Linear | None = None  # from the second extractor on

    def _extractor(self) -> nn.Module:
        net = self.make_extractor()
        del net.head  # only its features are used: the shared head reads all extractors
        return net

    @property
    def feature_dim(self) -> int:
        return sum(self.dims)

    def grow(self, n_aux: int, copy_previous: bool) -> None:
        """Freeze every extractor, add a new one, widen ``head``, give the new one an auxiliary head of n_aux outputs."""
        last = self.extractors[-1]
        ref = next(last.parameters())
        fmt = torch.channels_last if last.conv1.weight.is_contiguous(memory_format=torch.channels_last) \
            and not last.conv1.weight.is_contiguous() else torch.contiguous_format
        new = self._extractor().to(ref.device, memory_format=fmt)
        if copy_previous:
            new.load_state_dict(last.state_dict())
        for e in self.extractors:
            e.requires_grad_(False)
        self.extractors.append(new)
        old_head = self.head
        self.dims.append(new.feature_dim)
        self.head = nn.Linear(self.feature_dim, self.num_classes).to(ref.device)
        with torch.no_grad():
            self.head.weight[:, : old_head.in_features] = old_head.weight
            self.head.bias.copy_(old_head.bias)
        self.aux_head = nn.Linear(new.feature_dim, n_aux).to(ref.device)
        self.train(self.training)  # the frozen ones go to eval mode

    def train(self, mode: bool = True) -> "DERNet":
        super().train(mode)
        for e in self.extractors[:-1]:
            e.eval()  # frozen: their batch-norm statistics must not move
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([e.features(x) for e in self.extractors], dim=1)


@register("der")
class DER(Method):
    Args = DERArgs
    own_loss = True  # CE + its auxiliary head's CE
    uses_memory = True
    limits = {"init": ("previous", "random"), "aux_weight": ">= 0"}

    def build_model(self, model_cfg, num_classes: int, image_size: int = 32) -> nn.Module:
        from ..models import create_model

        return DERNet(lambda: create_model(model_cfg, num_classes, image_size), num_classes)

    def before_task(self, ctx: TaskContext) -> None:
        if ctx.t > 0:
            ctx.model.grow(ctx.n_seen - ctx.n_old + 1, self.args.init == "previous")

    def parameters(self, ctx: TaskContext):
        model = ctx.model
        params = list(model.extractors[-1].parameters()) + list(model.head.parameters())
        return params + (list(model.aux_head.parameters()) if model.aux_head is not None else [])

    def loss(self, x: torch.Tensor, y: torch.Tensor, out: Outputs, old: Outputs | None,
             ctx: TaskContext) -> torch.Tensor:
        ce = F.cross_entropy(out.logits[:, : ctx.n_seen].float(), y)
        if ctx.t == 0:
            return ce
        model = ctx.model
        z_aux = model.aux_head(out.features[:, -model.dims[-1]:].float())
        y_aux = torch.where(y < ctx.n_old, torch.zeros_like(y), y - ctx.n_old + 1)
        return ce + self.args.aux_weight * F.cross_entropy(z_aux, y_aux)

    def load_model(self, model: nn.Module, weights: dict) -> None:
        # The checkpoint's network has one extractor per task done: grow the
        # fresh one to that many (with the saved auxiliary head's size), then load.
        n = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("extractors."))
        while len(model.extractors) < n:
            model.grow(weights["aux_head.weight"].shape[0], copy_previous=False)
        model.load_state_dict(weights)
