"""Experiment tracking with the stock tools: TensorBoard (``log.tensorboard``) and Weights & Biases (``log.wandb``).

A tracker gets four calls from a run: ``start(run_dir, cfg)``, ``log_step(step,
loss)`` at each of the trainer's loss reads (``train.log_every`` per epoch; the
value is the one already read for the progress bar, so tracking adds no host
synchronisation), ``log_task(task, metrics)`` after each task is saved, and
``close()``. The scalars, the same for every backend:

| tag | x axis | value |
|---|---|---|
| ``train/loss`` | optimiser step, counted over the whole run | mean loss of the epoch so far |
| ``accuracy/<clf>`` | task number (1..T) | accuracy on all seen classes (%) |
| ``current_task_accuracy/<clf>`` | task number | accuracy on the task's own classes (%) |
| ``average_incremental_accuracy/<clf>`` | task number | mean of ``accuracy`` so far |
| ``forgetting/<clf>`` | task number | forgetting so far (evaluation.py) |
| ``timing/train_s``, ``timing/memory_s``, ``timing/eval_s`` | task number | seconds the task spent |
| ``timing/train_images_per_s`` | task number | training throughput so far |

Each value is the one metrics.json holds for that task. New backends register
in ``TRACKERS`` under the name of their ``log.<name>`` switch, and name the
package they import and the extra that installs it (``package``, ``extra``):
a switch whose package is missing is refused before any work.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import ClassVar

from .errors import ConfigError
from .registry import Registry
from .results import TENSORBOARD as TENSORBOARD_DIR  # inside the run folder: tensorboard --logdir runs/

TRACKERS: Registry = Registry("tracker")


def task_scalars(task: int, metrics: dict) -> dict[str, float]:
    """The per-task scalars of the module doc, read from metrics.json's content after ``task`` (0-based)."""
    out: dict[str, float] = {}
    for clf in metrics["classifiers"]:
        m = metrics[clf]
        out[f"accuracy/{clf}"] = m["accuracy"][task]
        out[f"current_task_accuracy/{clf}"] = m["current_task_accuracy"][task]
        # summarize() has updated these to "after the last completed task", which is ``task``
        out[f"average_incremental_accuracy/{clf}"] = m["average_incremental_accuracy"]
        out[f"forgetting/{clf}"] = m["forgetting"]
    for key, value in metrics["timing"]["per_task"][task].items():
        out[f"timing/{key}"] = value
    out["timing/train_images_per_s"] = metrics["train_images_per_s"]
    return out


class Tracker:
    """Does nothing; backends override what they record."""

    package: ClassVar[str | None] = None  # what ``start`` imports, checked before any work
    extra: ClassVar[str] = ""  # cilab's extra that installs it: pip install 'cilab[<extra>]'

    def start(self, run_dir: Path, cfg) -> None:
        pass

    def log_step(self, step: int, loss: float) -> None:
        pass

    def log_task(self, task: int, metrics: dict) -> None:
        pass

    def close(self) -> None:
        pass


@TRACKERS.register("tensorboard")
class TensorBoardTracker(Tracker):
    """Event files in ``<run folder>/tensorboard`` (torch's SummaryWriter; needs the ``tb`` extra)."""

    package, extra = "tensorboard", "tb"

    def start(self, run_dir: Path, cfg) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / TENSORBOARD_DIR))

    def log_step(self, step: int, loss: float) -> None:
        self.writer.add_scalar("train/loss", loss, step)

    def log_task(self, task: int, metrics: dict) -> None:
        for tag, value in task_scalars(task, metrics).items():
            self.writer.add_scalar(tag, value, task + 1)
        self.writer.flush()  # a task's results are on disk when the task is, as in metrics.json

    def close(self) -> None:
        self.writer.close()


@TRACKERS.register("wandb")
class WandbTracker(Tracker):
    """A wandb run named after the run folder, its files in the run folder (needs the ``wandb`` extra).

    wandb's own settings (``WANDB_MODE=offline``, the entity, the API key) come
    from its environment variables, as everywhere else.
    """

    package, extra = "wandb", "wandb"

    def start(self, run_dir: Path, cfg) -> None:
        import wandb

        self.run = wandb.init(project=cfg.log.wandb_project, name=Path(run_dir).name, dir=str(run_dir),
                              config=cfg.to_dict(), reinit=True)
        # two x axes, as in TensorBoard: optimiser steps for the loss, tasks for the rest
        self.run.define_metric("step")
        self.run.define_metric("task")
        self.run.define_metric("train/*", step_metric="step")
        for prefix in ("accuracy", "current_task_accuracy", "average_incremental_accuracy", "forgetting", "timing"):
            self.run.define_metric(f"{prefix}/*", step_metric="task")

    def log_step(self, step: int, loss: float) -> None:
        self.run.log({"train/loss": loss, "step": step})

    def log_task(self, task: int, metrics: dict) -> None:
        self.run.log({**task_scalars(task, metrics), "task": task + 1})

    def close(self) -> None:
        self.run.finish()


def check_installed(log_cfg) -> None:
    """ConfigError for the first tracker switched on in ``log_cfg`` whose package is not installed."""
    for name in TRACKERS:
        tracker = TRACKERS[name]
        if getattr(log_cfg, name, False) and tracker.package and importlib.util.find_spec(tracker.package) is None:
            raise ConfigError(f"log.{name}=true needs the {tracker.package} package: pip install "
                              f"'cilab[{tracker.extra}]' (or set log.{name}=false)")


class Trackers(Tracker):
    """Every tracker switched on in the ``log`` section, called in turn."""

    def __init__(self, log_cfg):
        self.parts = [TRACKERS[name]() for name in TRACKERS if getattr(log_cfg, name, False)]

    def start(self, run_dir: Path, cfg) -> None:
        for p in self.parts:
            p.start(run_dir, cfg)

    def log_step(self, step: int, loss: float) -> None:
        for p in self.parts:
            p.log_step(step, loss)

    def log_task(self, task: int, metrics: dict) -> None:
        for p in self.parts:
            p.log_task(task, metrics)

    def close(self) -> None:
        for p in self.parts:
            p.close()
