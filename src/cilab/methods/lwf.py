"""Learning without Forgetting (Li & Hoiem, 2016), with iCaRL's losses as in the study (section 3.3).

Loss of task t on its own data x:  clf(z, y) on the outputs [n_old, O) +
dist(z, z_old) on the outputs [0, n_old), z_old from the frozen model of task
t-1; both terms come from the ``loss`` section (the study: BCE with logits for
both). No exemplars. Departure from the LwF paper, as in the study: the
paper's temperature-scaled cross-entropy and warm-up stage are replaced by
iCaRL's sigmoid losses "to have a fair comparison".
"""

from .base import Method, register


@register("lwf")
class LwF(Method):
    distills = True
