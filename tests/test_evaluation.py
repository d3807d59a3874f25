import numpy as np
import pytest
import torch

from cilab.evaluation import accuracy, confusion_matrix, forgetting, summarize, task_accuracies


def test_task_accuracies_and_confusion_on_hand_made_predictions():
    # 2 classes per task, 2 tasks seen; labels 0,1 = task 0, 2,3 = task 1
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    p = torch.tensor([0, 1, 1, 1, 2, 0, 0, 0])
    assert task_accuracies(p, y, 2, 2) == [75.0, 25.0]
    assert accuracy(p, y) == 50.0
    cm = confusion_matrix(p, y, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [2, 0, 0, 0]]
    assert cm.sum() == len(y)


def test_average_incremental_accuracy_and_forgetting():
    acc = [90.0, 70.0, 60.0]
    matrix = [[90.0, None, None], [60.0, 80.0, None], [30.0, 70.0, 80.0]]
    s = summarize(acc, matrix)
    assert s["average_incremental_accuracy"] == pytest.approx(np.mean(acc))
    assert s["final_accuracy"] == 60.0
    # task 0: best 90, now 30 -> 60; task 1: best 80, now 70 -> 10
    assert s["forgetting"] == pytest.approx(35.0)
    assert forgetting([[50.0]]) == 0.0
