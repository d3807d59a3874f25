"""Class order and tasks.

The class order is a permutation drawn from the seed. Labels are remapped once
so that output i of the network is the i-th class of the order: task t then
owns the contiguous block of outputs [t*c, (t+1)*c).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Scenario:
    class_order: list[int]  # original label of output i
    num_tasks: int
    class_names: list[str]  # names in the original label space

    @classmethod
    def from_seed(cls, num_classes: int, num_tasks: int, seed: int, class_names: list[str]) -> "Scenario":
        if num_tasks < 1 or num_classes % num_tasks:
            raise ValueError(
                f"scenario.num_tasks={num_tasks} does not divide the {num_classes} classes; "
                f"choose one of {[d for d in range(1, num_classes + 1) if num_classes % d == 0]}"
            )
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_classes, generator=g).tolist()
        return cls(order, num_tasks, list(class_names))

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def classes_per_task(self) -> int:
        return self.num_classes // self.num_tasks

    def task_outputs(self, t: int) -> range:
        """Output indices (= remapped labels) of task t."""
        c = self.classes_per_task
        return range(t * c, (t + 1) * c)

    def seen(self, t: int) -> int:
        """Number of classes seen after task t."""
        return (t + 1) * self.classes_per_task

    @property
    def tasks(self) -> list[list[int]]:
        """Original labels of each task's classes."""
        return [[self.class_order[i] for i in self.task_outputs(t)] for t in range(self.num_tasks)]

    @property
    def ordered_names(self) -> list[str]:
        return [self.class_names[c] for c in self.class_order]

    def remap(self, y: torch.Tensor) -> torch.Tensor:
        """Original labels -> output indices."""
        lut = torch.empty(self.num_classes, dtype=torch.int64)
        lut[torch.as_tensor(self.class_order)] = torch.arange(self.num_classes)
        return lut.to(y.device)[y]
