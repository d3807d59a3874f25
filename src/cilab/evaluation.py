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

from pathlib import Path

import numpy as np
import torch

from . import results


@torch.no_grad()
def extract_features(model, x: torch.Tensor, normalizer, batch_size: int = 1024,
                     memory_format=torch.contiguous_format) -> torch.Tensor:
    """uint8 images -> float32 features, in eval mode, in batches, on the images' device.

    Always computed in fp32, also when training runs under bf16 autocast
    (``train.amp``) and also when called from inside an autocast region:
    herding picks exemplars by small differences between feature means, and
    NME / kNN / SVM / MLP compare distances between features, both of which
    bf16's 8-bit mantissa (about 3 significant digits) would round away.
    Extraction is a small part of a run's time, so fp32 costs little.
    """
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        # .to: images kept in host memory (data.placement=host) go to the model's device batch by batch
        xb = normalizer(x[i: i + batch_size].to(normalizer.scale.device, non_blocking=True)).contiguous(
            memory_format=memory_format)
        with torch.autocast(device_type=xb.device.type, enabled=False):
            out.append(model.features(xb.float()).float())
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


def confusion_matrix(pred: torch.Tensor, y: torch.Tensor, n: int, unseen_column: bool = False) -> np.ndarray:
    """Rows: true class, columns: predicted class (output order), n seen classes.

    ``unseen_column``: one more column, n, counting the predictions of any
    class not seen yet (output >= n), which a classifier whose arg-max runs
    over all outputs can make (``eval.fc_scope=all``); the matrix is then
    n x (n + 1) and each row still sums to that class's test images.
    """
    cols = n + 1 if unseen_column else n
    if not unseen_column and len(pred) and int(pred.max()) >= n:
        raise ValueError(f"a prediction is output {int(pred.max())}, beyond the {n} seen classes; "
                         "pass unseen_column=True")
    pred = pred.clamp_max(n) if unseen_column else pred
    return torch.bincount(y * cols + pred, minlength=n * cols).reshape(n, cols).cpu().numpy()


def single_class_tasks(confusion: dict[str, np.ndarray], classifier: str) -> list[tuple[int, str]]:
    """(task, class) for each task after which ``classifier`` gave every test image one class, where
    two or more classes have test images: it has not learned to tell them apart, and its accuracy, 1 / classes seen
    (50, 25, 16.7, ... with 2 classes a task), would otherwise read as a result. ``confusion``:
    confusion.npz's matrices, ``<classifier>_task<NN>``; the class is its column, or "a class not
    seen yet" for the extra column of ``eval.fc_scope=all``."""
    found = []
    prefix = f"{classifier}_task"
    for key in sorted(k for k in confusion if k.startswith(prefix) and k[len(prefix):].isdigit()):
        cm = np.asarray(confusion[key])
        used = np.flatnonzero(cm.sum(axis=0))
        if (cm.sum(axis=1) > 0).sum() >= 2 and len(used) == 1:  # two classes with test images, or one answer is right
            column = int(used[0])
            found.append((int(key[len(prefix):]), "a class not seen yet" if column == cm.shape[0] else str(column)))
    return found


def single_class_note(classifier: str, found: list[tuple[int, str]]) -> str:
    """What :func:`single_class_tasks` found, in words (a run's log, a report's notes)."""
    tasks = [f"{t} (class {c})" if c.isdigit() else f"{t} ({c})" for t, c in found]
    listed = tasks[0] if len(tasks) == 1 else f"{', '.join(tasks[:-1])} and {tasks[-1]}"
    return (f"{classifier} gave every test image one class after task{'s' * (len(found) > 1)} {listed}: it has not "
            "learned to tell the classes apart (too few training steps, or a learning rate too large for the "
            "data: README, 'Why the FC head missed the newest classes on digits')")


def single_class_notes_in(folder: Path, classifiers: list[str]) -> list[str]:
    """:func:`single_class_note` for each of ``classifiers`` that gave every test image one class
    after some task, read from the run folder's confusion.npz (none where it is missing or unreadable)."""
    try:
        with np.load(Path(folder) / results.CONFUSION) as z:
            confusion = {k: z[k] for k in z.files}
    except (OSError, ValueError):
        return []
    return [single_class_note(c, found) for c in classifiers if (found := single_class_tasks(confusion, c))]


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    # counted in integers: a float32 mean is off in the 7th digit (3 of 5 -> 60.0000024);
    # an accuracy over zero images is undefined (nan, null in metrics.json), never 0%.
    return 100.0 * int((pred == y).sum()) / len(y) if len(y) else float("nan")


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
