"""N CIFAR ResNets as one network, for measuring whether several runs' steps should train as one.

Issue 17's study is ~100 small runs; one ResNet-32 step at batch 128 leaves a
large GPU mostly idle, and N processes under MPS reached only about twice one
run's rate on an H200 (README, "Several runs on one GPU"). The other lever is
to train the N runs' networks as one network whose kernels are N times larger.
``GroupedResNetCifar`` is that network: N independent ResNets of one
architecture, their convolutions fused into grouped convolutions
(``groups=N``), which is also how ``torch.func.vmap`` batches a convolution
over stacked weights; here it is plain modules, so the step is captured in a
CUDA graph like any other.

Layout: model i reads channels [3i, 3i + 3) of the input (B x 3N x H x W, each
model its own batch of B images) and owns channel group i of every layer;
logits are B x N x classes. Nothing mixes between groups, so each model
computes exactly what it would alone:
  * a grouped convolution is N separate convolutions;
  * batch norm is per channel, and each channel belongs to one model, whose
    batch statistics are those of its own B images;
  * option-A shortcuts pad each model's channels separately;
  * the sum of the N models' losses has, for model i's parameters, the
    gradient of model i's own loss, and SGD with momentum and weight decay is
    elementwise, so one optimiser step is N independent steps.
The blocks are resnet.BasicBlock with ``groups=N``.
``tests/test_grouped.py`` checks outputs and two SGD steps against N separate
ResNets. ``cilab bench batched`` times the fused step for N = 1, 2, 4, 8.
Nothing in a run uses it yet: it is the measurement that decides whether
cilab should train several seeds as one model.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .resnet import Outputs, ResNetCifar


class GroupedResNetCifar(ResNetCifar):
    """N ResNet-(6k+2) of cilab's CIFAR family in one module (``ResNetCifar`` with ``groups=N``);
    ``forward`` as a Backbone's, logits B x N x classes."""

    def __init__(self, n: int, blocks_per_stage: int, num_classes: int, widths=(16, 32, 64)):
        super().__init__(blocks_per_stage, num_classes, tuple(widths), groups=n)
        self.n = n
        del self.head  # one linear head per network instead, a batched matrix product
        self.feature_dim = widths[-1]
        self.head_weight = nn.Parameter(torch.zeros(n, num_classes, self.feature_dim))
        self.head_bias = nn.Parameter(torch.zeros(n, num_classes))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """B x 3N x H x W -> B x N x feature_dim."""
        f = super().features(x)
        return f.reshape(len(f), self.n, self.feature_dim)

    def forward(self, x: torch.Tensor, with_features: bool = False):
        f = self.features(x)
        z = torch.einsum("bnd,ncd->bnc", f, self.head_weight) + self.head_bias
        return Outputs(z, f) if with_features else z

    @classmethod
    def fuse(cls, models: list[ResNetCifar]) -> "GroupedResNetCifar":
        """One module computing what ``models`` (same architecture, last ReLU on) compute, with their weights."""
        def shape(m: ResNetCifar):
            return (m.stage_ends, [m.layers[end - 1].conv2.out_channels for end in m.stage_ends],
                    m.head.out_features)

        first = models[0]
        if any(shape(m) != shape(first) for m in models):
            raise ValueError("fuse takes ResNets of one architecture (blocks, widths, classes): "
                             + "; ".join(str(shape(m)) for m in models))
        if not all(m.layers[-1].relu for m in models):
            raise ValueError("fuse takes ResNets with their last ReLU (model.last_relu=true); the grouped blocks keep it")
        blocks, widths, classes = first.stage_ends[0], shape(first)[1], first.head.out_features
        fused = cls(len(models), blocks, classes, widths)
        states = [m.state_dict() for m in models]
        own = fused.state_dict()
        with torch.no_grad():
            for key, value in own.items():
                if key.startswith("head_"):
                    name = "head." + key.removeprefix("head_")
                    value.copy_(torch.stack([s[name] for s in states]))
                elif value.dim() == 0:  # BatchNorm's num_batches_tracked: one count for all, the first model's
                    value.copy_(states[0][key])
                else:  # conv weights (out channels first) and BatchNorm vectors: model i's block i
                    value.copy_(torch.cat([s[key] for s in states]))
        return fused

    def unfuse(self, i: int) -> dict[str, torch.Tensor]:
        """Model i's weights, as a ResNetCifar state dict (the inverse of ``fuse``; copies, not views)."""
        out = {}
        for key, value in self.state_dict().items():
            if key.startswith("head_"):
                out["head." + key.removeprefix("head_")] = value[i].clone()
            elif value.dim() == 0:
                out[key] = value.clone()
            else:
                size = len(value) // self.n
                out[key] = value[i * size: (i + 1) * size].clone()
        return out
