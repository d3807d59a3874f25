"""A complete method plugin: "prob-match", a toy method in ~30 lines.

It trains with a cross-entropy over the seen outputs and distills the old
outputs with a mean squared error between the new and the old model's
softmax over them, on images of the new task only (no exemplars). Matching
probabilities rather than raw logits keeps the term bounded. docs/methods.md
walks through it; tests/test_methods.py runs it on digits, so this file
cannot rot.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilab.methods import Method, register


@dataclass
class ProbMatchArgs:
    weight: float = 1.0  # strength of the matching term


@register("prob-match")
class ProbMatch(Method):
    Args = ProbMatchArgs  # its settings: method_args.weight=...
    distills = True  # keep the previous model, frozen: `old` below
    own_loss = True  # loss() does not read the `loss` section: loss.* overrides are refused

    def uses_old_model(self, ctx) -> bool:
        return ctx.n_old > 0  # from task 2 on

    def loss(self, x, y, out, old, ctx) -> torch.Tensor:
        ce = F.cross_entropy(out.logits[:, : ctx.n_seen].float(), y)
        if old is None:
            return ce
        p = out.logits[:, : ctx.n_old].float().softmax(dim=1)
        q = old.logits[:, : ctx.n_old].float().softmax(dim=1)
        match = (p - q).pow(2).sum(dim=1).mean()
        return ce + self.args.weight * match
