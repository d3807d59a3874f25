"""Class order and tasks.

The class order is a permutation drawn from the seed. Labels are remapped once
so that output i of the network is the i-th class of the order: task t then
owns the contiguous block of outputs [bounds[t], bounds[t+1]). Tasks have one
size (B0: 100 classes in 10 tasks of 10), or the first is larger (B50: 50
classes first, then the other 50 split evenly, ``scenario.first_task_classes``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Scenario:
    class_order: list[int]  # original label of output i
    num_tasks: int
    class_names: list[str]  # names in the original label space
    first_task_classes: int | None = None  # None: every task has num_classes / num_tasks classes
    bounds: list[int] = field(init=False)  # task t owns outputs [bounds[t], bounds[t+1])

    def __post_init__(self):
        n, k, first = len(self.class_order), self.num_tasks, self.first_task_classes
        if first is None:
            self.bounds = [t * n // k for t in range(k + 1)]
        else:
            rest = (n - first) // (k - 1)
            self.bounds = [0] + [first + t * rest for t in range(k)]

    @classmethod
    def from_seed(cls, num_classes: int, num_tasks: int, seed: int, class_names: list[str],
                  first_task_classes: int | None = None) -> "Scenario":
        if first_task_classes is None:
            if num_tasks < 1 or num_classes % num_tasks:
                raise ValueError(
                    f"scenario.num_tasks={num_tasks} does not divide the {num_classes} classes; "
                    f"choose one of {[d for d in range(1, num_classes + 1) if num_classes % d == 0]}"
                )
        else:
            rest = num_classes - first_task_classes
            if not 0 < first_task_classes < num_classes or num_tasks < 2 or rest % (num_tasks - 1):
                raise ValueError(
                    f"scenario.first_task_classes={first_task_classes} leaves {max(rest, 0)} of the {num_classes} "
                    f"classes for scenario.num_tasks-1={num_tasks - 1} tasks, which must split them evenly; "
                    f"e.g. first_task_classes={num_classes // 2} with num_tasks=6 or 11 on {num_classes} classes"
                    if num_classes == 100 else
                    f"scenario.first_task_classes={first_task_classes} must be below the {num_classes} classes and "
                    f"leave a number of classes that scenario.num_tasks-1={num_tasks - 1} tasks split evenly"
                )
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(num_classes, generator=g).tolist()
        return cls(order, num_tasks, list(class_names), first_task_classes)

    @classmethod
    def for_run(cls, cfg, data) -> "Scenario":
        """The split of ``data`` that a run of ``cfg`` trains on (its scenario section and seed): the one
        place runs, reports and plans build it, so that each refuses (ValueError) what the others would."""
        return cls.from_seed(data.num_classes, cfg.scenario.num_tasks, cfg.seed, data.class_names,
                             cfg.scenario.first_task_classes)

    @property
    def num_classes(self) -> int:
        return len(self.class_order)

    @property
    def classes_per_task(self) -> int:
        """Classes of each task after the first (of every task, when they are all the same size)."""
        return self.bounds[-1] - self.bounds[-2]

    def task_outputs(self, t: int) -> range:
        """Output indices (= remapped labels) of task t."""
        return range(self.bounds[t], self.bounds[t + 1])

    def old(self, t: int) -> int:
        """Number of classes seen before task t."""
        return self.bounds[t]

    def seen(self, t: int) -> int:
        """Number of classes seen after task t."""
        return self.bounds[t + 1]

    def task_of(self, outputs: torch.Tensor) -> torch.Tensor:
        """The task index of each output index."""
        edges = torch.as_tensor(self.bounds[1:-1], device=outputs.device)
        return torch.bucketize(outputs, edges, right=True)

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
