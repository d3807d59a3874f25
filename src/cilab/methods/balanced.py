"""Class-balanced fine-tuning of the classifier, a second stage on the one loop (LUCIR, PODNet).

After the memory update the exemplars hold the same number of images for
every seen class; training only the head on them removes the bias towards the
new classes that the imbalanced task data left. This module registers no method.
"""

from __future__ import annotations

import dataclasses
import torch

from .base import TaskContext


def finetune_head(ctx: TaskContext, epochs: int, lr: float) -> int:
    """Train ``ctx.model.head`` alone for ``epochs`` at constant ``lr`` on the exemplars; returns images seen.

    The loss is the method's own without an old model, i.e. its first-task
    loss (LUCIR's CE, PODNet's NCA over the seen classes). The backbone takes
    no gradient (``train_on`` freezes what it does not update), and
    its BatchNorm statistics are put back afterwards: the loop runs the network
    in train mode, and a head-only stage must not move the features the test
    images are classified on (PODNet's code fine-tunes with the BatchNorm
    statistics frozen too).
    """
    if epochs <= 0 or len(ctx.memory) == 0:
        return 0
    x, y = ctx.memory.data(ctx.device)
    cfg = dataclasses.replace(ctx.train_cfg, epochs=epochs, lr=lr, milestones=[], val_split=0.0, keep_best=False)
    buffers = {n: b.detach().clone() for n, b in ctx.model.named_buffers()}
    images = ctx.train(x, y, parameters=ctx.model.head.parameters(), train_cfg=cfg, old_model=None,
                       desc=f"task {ctx.t + 1} balanced fine-tuning")  # the loop freezes the rest
    with torch.no_grad():
        for n, b in ctx.model.named_buffers():
            b.copy_(buffers[n])
    return images
