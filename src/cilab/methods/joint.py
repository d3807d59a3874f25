"""Joint training (the study, section 3.1): the upper bound that breaks the incremental constraints.

At task t the network trains on the data of all tasks 1..t. The study trains
a freshly initialised network each time ("at each new task the model is
trained on all the data provided to the net up to that point", from random
initialisation, as the study's notebooks do), so the default re-initialises
the model before every task. ``method_args.warm_start=true`` continues from
the previous task's model instead (cilab's behaviour before 0.2): a named
departure, cheaper to converge but no longer the study's upper bound.
"""

from dataclasses import dataclass

from .base import Method, TaskContext, register


@dataclass
class JointArgs:
    warm_start: bool = False  # true: start task t from task t-1's model instead of a fresh one


@register("joint")
class Joint(Method):
    Args = JointArgs
    trains_on = "seen"  # the default training_data: every class so far (no memory)

    def before_task(self, ctx: TaskContext) -> None:
        if self.args.warm_start or ctx.t == 0:
            return  # task 1's model is freshly initialised already
        # A freshly built network's weights, drawn from the global RNG, whose state
        # every checkpoint saves: a resumed run draws the same initialisation.
        ctx.model.load_state_dict(ctx.new_model().state_dict())
