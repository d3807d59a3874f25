"""iCaRL (Rebuffi et al., CVPR 2017), the study's main method (section 3.4).

Task t trains on its data plus the exemplars, with LwF's loss (the ``loss``
section; iCaRL: one BCE over all B x O outputs, targets sigmoid(z_old) on the
old outputs, one-hot on the rest); then herding picks m = K / n_seen exemplars
per new class and old classes are cut to their first m (``memory`` section);
the nearest-mean-of-exemplars classifier (``eval.classifiers``: nme) predicts.
Every piece is configuration: this plugin only says "distill, keep memory".
"""

from .base import Method, register


@register("icarl")
class ICaRL(Method):
    distills = True
    uses_memory = True
