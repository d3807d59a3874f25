"""The four methods of the study, as configuration of the one training loop.

A method only says what data a task trains on and which parts of the config it
accepts; the loss terms come from ``loss.*``, the exemplars from ``memory.*``
(DESIGN.md: "The four methods of the study differ only in configuration").
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry

METHODS: Registry["Method"] = Registry("method")


@dataclass(frozen=True)
class Method:
    name: str
    train_on: str  # "current": task t's data; "seen": all data of tasks 1..t (joint)
    distills: bool  # keeps a frozen copy of the previous model for distillation
    uses_memory: bool  # keeps exemplars of old classes

    def check(self, cfg) -> None:
        from .config import ConfigError

        if not self.distills and cfg.loss.distillation != "none":
            raise ConfigError(
                f"method {self.name} does not distill, but loss.distillation={cfg.loss.distillation}; "
                "set loss.distillation=none, or use method=lwf / icarl"
            )
        if not self.uses_memory and cfg.memory.size != 0:
            raise ConfigError(
                f"method {self.name} keeps no exemplars, but memory.size={cfg.memory.size}; "
                "set memory.size=0, or use method=icarl"
            )
        if self.uses_memory and cfg.memory.size == 0:
            raise ConfigError(f"method {self.name} needs exemplars: set memory.size > 0 (the study uses 2000)")


for _m in (
    Method("finetune", train_on="current", distills=False, uses_memory=False),
    Method("joint", train_on="seen", distills=False, uses_memory=False),
    Method("lwf", train_on="current", distills=True, uses_memory=False),
    Method("icarl", train_on="current", distills=True, uses_memory=True),
):
    METHODS.register(_m.name)(_m)
