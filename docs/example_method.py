"""A complete method plugin: "new-only distillation", a toy method in ~30 lines.

It trains like LwF, but distills the old outputs with a mean squared error on
logits, and only on images of the new task (no exemplars). docs/methods.md
walks through it; tests/test_methods.py runs it on digits, so this file
cannot rot.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cilab.methods import Method, register


@dataclass
class LogitMatchArgs:
    weight: float = 1.0  # strength of the logit-matching term


@register("logit-match")
class LogitMatch(Method):
    Args = LogitMatchArgs  # its settings: method_args.weight=...
    distills = True  # keep the previous model, frozen: `old` below

    def uses_old_model(self, ctx) -> bool:
        return ctx.n_old > 0  # from task 2 on

    def loss(self, x, y, out, old, ctx) -> torch.Tensor:
        ce = F.cross_entropy(out.logits[:, : ctx.n_seen].float(), y)
        if old is None:
            return ce
        match = (out.logits[:, : ctx.n_old].float() - old.logits[:, : ctx.n_old].float()).pow(2).mean()
        return ce + self.args.weight * match
