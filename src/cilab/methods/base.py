"""The method plugin API: ``Method`` (the hooks, with plain fine-tuning as defaults) and ``TaskContext``.

A method is a subclass of ``Method`` in its own file in this package,
registered with ``@register("name")``; it overrides only the hooks it changes.
``experiment.Protocol`` calls them in this order for task t:

    ctx = TaskContext(...)                # task index, class counts, model, memory, runtime, ...
    method.before_task(ctx)               # grow or re-initialise the network (joint, DER, LUCIR)
    x, y, *ps = method.training_data(ctx) # default: task t's images + the exemplars (+ per-sample tensors)
    ctx.old_model                         # frozen copy of the previous model, if method.uses_old_model(ctx)
    ctx.train(x, y, *ps)                  # THE loop, with method.loss / parameters / after_step
    method.after_train(ctx)               # WA aligns weights, EWC estimates its Fisher, BiC stage 2
    memory update (memory.* config)       # exemplars of the new classes, old ones cut to K / n
    method.after_memory(ctx)
    evaluation; checkpoint with method.state_dict()

On resume, ``method.load_state_dict`` then ``method.load_model(model, weights)``
run on the freshly built network, so a method whose network grows (DER) grows
it back to the checkpoint's shape before the weights are loaded.

Losses are plain tensor functions of the batch and the model outputs (no
host reads, no branching on values), so the CUDA-graph step can capture them.
A method whose ``loss`` or ``after_step`` cannot be captured sets
``graph_safe = False``; the runtime then trains it with eager steps.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable

import torch

from ..errors import ConfigError
from ..models import Outputs
from ..registry import Registry
from ..schema import from_dict

if TYPE_CHECKING:  # only for annotations: experiment imports this module
    from ..losses import Criterion
    from ..memory import ExemplarMemory

METHODS: Registry[type["Method"]] = Registry("method")


# Method.trains_on: the first output whose classes the default training_data returns.
TRAINS_ON = {"current": lambda ctx: ctx.n_old, "seen": lambda ctx: 0}


def register(name: str):
    """Class decorator: ``@register("wa")`` makes ``method: wa`` in a config use this class."""

    def deco(cls: type["Method"]) -> type["Method"]:
        if cls.trains_on not in TRAINS_ON:
            raise TypeError(f"method {name}: trains_on = {cls.trains_on!r}; it must be "
                            f"{' or '.join(map(repr, TRAINS_ON))}")
        foreign = set(cls.absent_means) - {f.name for f in dataclasses.fields(cls.Args)}
        if foreign:
            raise TypeError(f"method {name}: absent_means names {sorted(foreign)}, not settings of its Args")
        cls.name = name
        return METHODS.register(name)(cls)

    return deco


@dataclass
class NoArgs:
    """A method without settings of its own (``method_args`` must be empty)."""


@dataclass
class TaskContext:
    """What the hooks of task ``t`` can see and use. Built by ``experiment.Protocol``."""

    t: int  # task index, 0-based
    n_old: int  # classes seen before task t
    n_seen: int  # classes seen after task t
    num_classes: int  # outputs of the network (all classes, present from the start)
    model: torch.nn.Module
    memory: "ExemplarMemory"
    criterion: "Criterion"  # the ``loss`` section's classification + distillation for this task
    device: torch.device
    generator: torch.Generator  # the run's generator: draw from it, never from global RNG, to stay resumable
    train_cfg: Any  # the ``train`` section as it applies to this task (first-task schedule resolved)
    data: Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]  # data(lo, hi): training images of outputs [lo, hi)
    features: Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> fp32 features of ctx.model, eval mode
    normalize: Callable[[torch.Tensor], torch.Tensor]  # uint8 images -> the network's input (no augmentation)
    train: Callable[..., int]  # train(x, y, *per_sample, **kw): the one loop, see Protocol.train_on
    new_model: Callable[[], torch.nn.Module]  # a freshly initialised network of the run's config (CPU)
    log: Callable[[str], None]
    old_model: torch.nn.Module | None = None
    extra: dict = field(default_factory=dict)  # scratch space a method may use within the task

    @property
    def new_classes(self) -> range:
        return range(self.n_old, self.n_seen)


class Method:
    """A class-incremental method. The defaults are plain fine-tuning on the one loop.

    Class attributes a method sets:
      ``Args``         dataclass of its settings, read from ``method_args`` (unknown key = error)
      ``distills``     keeps the previous model, frozen, for its loss (``ctx.old_model``)
      ``own_loss``     its ``loss`` does not read the ``loss`` section (``ctx.criterion``): a
                       ``loss.*`` override is then refused, not silently ignored
      ``uses_memory``  keeps exemplars: ``memory.size`` must be > 0
      ``graph_safe``   its loss / after_step can be captured in a CUDA graph
      ``trains_on``    "current" (default) or "seen": the classes the default ``training_data``
                       returns, task t's or every class so far (joint), plus the exemplars
    """

    name: ClassVar[str] = ""
    Args: ClassVar[type] = NoArgs
    distills: ClassVar[bool] = False
    own_loss: ClassVar[bool] = False
    uses_memory: ClassVar[bool] = False
    graph_safe: ClassVar[bool] = True
    # The classes the default training_data returns: "current" (task t's, + the exemplars) or
    # "seen" (every class so far, + the exemplars: joint). bench.study_images prices runs by it
    # without running them, so a method that overrides training_data keeps it true.
    trains_on: ClassVar[str] = "current"
    # Limits on the method's settings, checked by ``check`` before any work:
    # {"key": "> 0" | ">= 0" | "in (0, 1)" | ("choice", "choice", ...)}.
    limits: ClassVar[dict] = {}
    # Settings added after the method, with the value that computes what it did before them:
    # {"key": value}. A run folder's config.yaml lacking one was written before it existed, so
    # it is read with this value, not the new default (config.saved_config).
    absent_means: ClassVar[dict] = {}

    def __init__(self, args: Any = None):
        self.args = args if args is not None else self.Args()

    # -- configuration ----------------------------------------------------------------------

    @classmethod
    def check(cls, cfg) -> None:
        """Refuse (ConfigError) combinations of the whole config this method cannot run."""
        # (a method with a loss of its own never reads loss.distillation: nothing to refuse)
        if not cls.distills and not cls.own_loss and cfg.loss.distillation != "none":
            raise ConfigError(
                f"method {cls.name} does not distill, but loss.distillation={cfg.loss.distillation}; "
                "set loss.distillation=none, or use a method whose loss reads it (lwf, icarl)"
            )
        if not cls.uses_memory and cfg.memory.size != 0:
            raise ConfigError(
                f"method {cls.name} keeps no exemplars, but memory.size={cfg.memory.size}; "
                "set memory.size=0, or use a method with memory (icarl, er, wa, ...)"
            )
        if cls.uses_memory and cfg.memory.size == 0:
            raise ConfigError(f"method {cls.name} needs exemplars: set memory.size > 0 (the study uses 2000)")
        tests = {"> 0": lambda v: v > 0, ">= 0": lambda v: v >= 0, "in (0, 1)": lambda v: 0 < v < 1}
        for key, rule in cls.limits.items():
            v = cfg.method_args[key]  # validate() has completed method_args with the defaults
            if isinstance(rule, tuple):
                if v not in rule:
                    raise ConfigError(f"'method_args.{key}' is '{v}', which is not one of: {', '.join(rule)}")
            elif not tests[rule](v):  # also refuses NaN
                raise ConfigError(f"'method_args.{key}' must be {rule}, got {v!r}")

    @classmethod
    def parse_args(cls, data: dict) -> Any:
        """``method_args`` (a dict from YAML / overrides) -> an instance of ``cls.Args``, checked."""
        if not isinstance(data, dict):
            raise ConfigError(f"'method_args' must be a mapping of {cls.name}'s settings, got {data!r}")
        names = [f.name for f in dataclasses.fields(cls.Args)]
        unknown = [k for k in data if k not in names]
        if unknown:
            known = ", ".join(names) if names else "none"
            raise ConfigError(f"method {cls.name} has no setting 'method_args.{unknown[0]}'; its settings: {known}")
        return from_dict(cls.Args, data, "method_args.")

    # -- hooks ---------------------------------------------------------------------------------

    def build_model(self, model_cfg, num_classes: int, image_size: int = 32) -> torch.nn.Module:
        from ..models import create_model

        return create_model(model_cfg, num_classes, image_size)

    def before_task(self, ctx: TaskContext) -> None:
        """Change the network before task t trains (grow it, re-initialise it, imprint weights)."""

    def training_data(self, ctx: TaskContext) -> tuple[torch.Tensor, ...]:
        """The uint8 images and labels task t trains on: its own classes (``trains_on = "seen"``: every
        class so far) plus the exemplars.

        A method may return further tensors with one row per image, ``(x, y, *per_sample)``
        (DER++: each exemplar's stored logits): they are shuffled and batched with the
        images and each batch's rows reach ``loss`` after ``old``.
        """
        x, y = ctx.data(TRAINS_ON[self.trains_on](ctx), ctx.n_seen)
        if len(ctx.memory):
            mx, my = ctx.memory.data(ctx.device)
            x, y = torch.cat([x, mx.to(x.device)]), torch.cat([y, my])  # x may be in host memory
        return x, y

    def uses_old_model(self, ctx: TaskContext) -> bool:
        """Whether task t needs the frozen previous model (``ctx.old_model``) in its loss."""
        return self.distills and ctx.criterion.distills

    def parameters(self, ctx: TaskContext) -> Iterable[torch.nn.Parameter]:
        """What the optimiser updates."""
        return ctx.model.parameters()

    def loss(self, x: torch.Tensor, y: torch.Tensor, out: Outputs, old: Outputs | None,
             ctx: TaskContext, *per_sample: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch: the ``loss`` section's classification + distillation.

        ``per_sample``: the batch's rows of the tensors ``training_data`` returned after (x, y).
        """
        return ctx.criterion(out.logits, y, None if old is None else old.logits)

    # ``after_step(self, ctx)``: define it to run after every SGD step (e.g. WA's weight
    # clipping); left undefined, the loop calls nothing.
    after_step: ClassVar[Callable[["Method", TaskContext], None] | None] = None

    def after_train(self, ctx: TaskContext) -> None:
        """After task t's training, before its memory update."""

    def after_memory(self, ctx: TaskContext) -> None:
        """After the memory holds task t's exemplars."""

    def state_dict(self) -> dict:
        """What the next task needs from this one (tensors and plain data: checkpoints load weights-only)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def load_model(self, model: torch.nn.Module, weights: dict) -> None:
        """Resume: load a checkpoint's weights into the freshly built ``model``.

        Runs after ``load_state_dict``. A method whose network changes shape
        during the run (DER adds an extractor per task) first brings ``model``
        to the saved shape.
        """
        model.load_state_dict(weights)
