"""Feature extraction and metrics from predictions.

Definitions (accuracies in percent):
- ``accuracy[t]``: after task t, on the test images of all classes seen so far,
  predicting among those classes;
- ``current_task_accuracy[t]``: after task t, on task t's test images only;
- ``accuracy_matrix[t][j]``: after task t, on task j's test images (null for j > t);
- ``average_incremental_accuracy``: mean of ``accuracy`` over all tasks (iCaRL);
- ``final_accuracy``: ``accuracy`` after the last task;
- ``forgetting``: mean over tasks j < T of max_{t < T} A[t][j] - A[T][j]
  (Chaudhry et al. 2018), T the last task; 0 with one task.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch


@torch.no_grad()
def extract_features(model, x: torch.Tensor, normalizer, batch_size: int = 1024,
                     autocast: contextlib.AbstractContextManager | None = None,
                     memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 images -> float32 features, in eval mode, in batches, on the images' device."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        # .to: images kept in host memory (data.placement=host) go to the model's device batch by batch
        xb = normalizer(x[i: i + batch_size].to(normalizer.scale.device, non_blocking=True)).contiguous(
            memory_format=memory_format)
        with autocast or contextlib.nullcontext():
            out.append(model.features(xb).float())
    model.train(was_training)
    if not out:
        return torch.empty(0, getattr(model, "feature_dim", 64), device=x.device)
    return torch.cat(out)


def task_accuracies(pred: torch.Tensor, y: torch.Tensor, task: "torch.Tensor | int", n_tasks_seen: int) -> list[float]:
    """Accuracy (%) on each seen task's test images.

    ``task`` is the task index of each label (``Scenario.task_of(y)``), or, when
    all tasks have the same size, that size (the task is then ``y // size``).
    NaN (null in metrics.json) for a task without test images: an accuracy
    over zero images is undefined, never 0%.
    """
    if isinstance(task, int):
        task = y // task
    correct = (pred == y).float()
    hits = torch.zeros(n_tasks_seen, device=y.device).index_add_(0, task, correct)
    counts = torch.bincount(task, minlength=n_tasks_seen).float()
    return (100.0 * hits / counts).tolist()  # 0 / 0 = nan


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, n: int) -> np.ndarray:
    """Rows: true class, columns: predicted class (output order)."""
    return torch.bincount(y * n + pred, minlength=n * n).reshape(n, n).cpu().numpy()


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    # mean() of nothing is nan: an accuracy over zero images is undefined, never 0%.
    return 100.0 * (pred == y).float().mean().item() if len(y) else float("nan")


def forgetting(matrix: list[list[float | None]]) -> float:
    """Average forgetting of the tasks before the last (see module doc)."""
    last = len(matrix) - 1
    if last < 1:
        return 0.0
    drops = [max(matrix[t][j] for t in range(j, last)) - matrix[last][j] for j in range(last)]
    return float(np.mean(drops))


def summarize(acc: list[float], matrix: list[list[float | None]]) -> dict:
    return {
        "average_incremental_accuracy": float(np.mean(acc)),
        "final_accuracy": float(acc[-1]),
        "forgetting": forgetting(matrix),
    }
