"""Experience replay, ER (Chaudhry et al., 2019, "On tiny episodic memories in continual learning").

Task t trains on its own images plus the exemplars of the old classes with a
plain cross-entropy over the seen outputs:

    L = mean_b  -log softmax(z_b[0:n_seen])[y_b]

No distillation. The ``loss`` section is not used (ER's loss is fixed).

Departures from the paper, both cilab's one-loop protocol: (1) the
exemplars are mixed into the task's training set and batches are drawn from
the union, where the paper draws a replay batch of the same size beside every
new batch; (2) the memory is class-balanced, m = K / n_seen per class, with
the ``memory.selection`` rule (the preset uses ``random``), where the paper
also studies reservoir sampling over the stream.
"""

import torch
import torch.nn.functional as F

from .base import Method, Outputs, TaskContext, register


@register("er")
class ExperienceReplay(Method):
    own_loss = True  # CE on the replayed batch
    uses_memory = True

    def loss(self, x: torch.Tensor, y: torch.Tensor, out: Outputs, old: Outputs | None,
             ctx: TaskContext) -> torch.Tensor:
        return F.cross_entropy(out.logits[:, : ctx.n_seen].float(), y)
