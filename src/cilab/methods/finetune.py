"""Fine-tuning (the study, section 3.2): each task trains the previous model on its own data only.

Loss: the ``loss`` section's classification term (the study: BCE over all
outputs), no distillation, no exemplars. It shows catastrophic forgetting.
Every hook is ``Method``'s default.
"""

from .base import Method, register


@register("finetune")
class FineTune(Method):
    pass
