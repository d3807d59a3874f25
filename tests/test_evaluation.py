"""Metrics from hand-made predictions, and what the protocol hands the classifiers.

Every expected number here is worked out by hand (in the comments) or
computed by an independent, plain formula, never by the function under test.
"""

import pytest
import torch

from cilab import experiment
from cilab.config import build_config
from cilab.data import Scenario, load_dataset
from cilab.evaluation import (accuracy, confusion_matrix, extract_features, forgetting, single_class_tasks, summarize,
                              task_accuracies)
from cilab.experiment import Protocol
from cilab.runtime import Runtime


def test_task_accuracies_and_confusion_on_hand_made_predictions():
    # 2 classes per task, 2 tasks seen; labels 0,1 = task 0, 2,3 = task 1
    y = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    p = torch.tensor([0, 1, 1, 1, 2, 0, 0, 0])
    # task 0: 0->0 ok, 0->1 no, 1->1 ok, 1->1 ok = 3/4; task 1: 2->2 ok, the rest wrong = 1/4
    assert task_accuracies(p, y, 2, 2) == [75.0, 25.0]
    assert accuracy(p, y) == 50.0
    cm = confusion_matrix(p, y, 4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [2, 0, 0, 0]]


def test_predictions_of_unseen_classes_get_their_own_confusion_column():
    # 3 classes seen; outputs 3 and 7 are classes not seen yet (fc_scope=all can predict them)
    y = torch.tensor([0, 0, 1, 2, 2])
    p = torch.tensor([0, 7, 1, 3, 2])
    cm = confusion_matrix(p, y, 3, unseen_column=True)
    assert cm.tolist() == [[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]]
    assert accuracy(p, y) == 60.0  # 3 of 5: an unseen class is an error, not dropped
    with pytest.raises(ValueError, match="unseen_column=True"):
        confusion_matrix(p, y, 3)  # would otherwise fold 7 into another cell silently


def test_a_classifier_that_gives_every_image_one_class_is_found():
    """fc after 2 epochs on digits answered class 1 for every test image, task after task, and its
    curve (50.5, 25.3, 16.8, ...: 1 / classes seen) read as a result. Matrices made by hand."""
    import numpy as np

    confusion = {
        "fc_task01": np.array([[0, 45], [0, 46]]),  # every image -> class 1
        "fc_task02": np.array([[0, 0, 0, 44], [0, 0, 0, 46], [0, 0, 0, 45], [0, 0, 0, 45]]),  # -> class 3
        "fc_task03": np.array([[40, 5, 0], [3, 43, 0], [0, 0, 45]]),  # learned
        # fc_scope=all: every image to a class not seen yet (the extra column)
        "fc_task04": np.array([[0, 0, 45], [0, 0, 46]]),
        "nme_task01": np.array([[44, 1], [2, 44]]),
        "nme_task02": np.array([[45]]),  # one class seen: one column is the right answer
        "nme_task03": np.array([[0, 0, 0], [0, 0, 0], [0, 0, 9]]),  # only one class has test images: as well
    }
    assert single_class_tasks(confusion, "fc") == [(1, "1"), (2, "3"), (4, "a class not seen yet")]
    assert single_class_tasks(confusion, "nme") == []
    assert single_class_tasks(confusion, "knn") == []


def test_average_incremental_accuracy_and_forgetting():
    acc = [90.0, 70.0, 60.0]
    matrix = [[90.0, None, None], [60.0, 80.0, None], [30.0, 70.0, 80.0]]
    s = summarize(acc, matrix)
    assert s["average_incremental_accuracy"] == pytest.approx(220.0 / 3)  # (90 + 70 + 60) / 3
    assert s["final_accuracy"] == 60.0
    # task 0: best before the last 90 (not 60), now 30 -> 60; task 1: best 80, now 70 -> 10; mean 35.
    # (max over all rows, last included, would give the same here; the next case tells them apart)
    assert s["forgetting"] == pytest.approx(35.0)
    # task 0 improves after the last task is learned: best-before-last 50, now 70 -> -20 (not 0)
    assert forgetting([[50.0, None], [70.0, 90.0]]) == pytest.approx(-20.0)
    assert forgetting([[50.0]]) == 0.0


# -- what Protocol hands the classifiers -------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset(build_config("icarl", ["data.name=digits"]).data)


def _protocol(tmp_path, data, overrides, n_test=40):
    """A run's state before training (seeded random ResNet-20), keeping the first n_test test images (speed)."""
    cfg = build_config("icarl", ["data.name=digits", "scenario.num_tasks=2", "memory.size=20", "model.name=resnet20",
                                 *overrides])
    sc = Scenario.from_seed(data.num_classes, cfg.scenario.num_tasks, cfg.seed, data.class_names)
    p = Protocol(cfg, tmp_path, data, sc, Runtime.resolve(cfg.train), False, 0, {}, lambda msg: None)
    p.x_test, p.y_test = p.x_test[:n_test], p.y_test[:n_test]
    return p


def _fp32_features(p, x):
    """The reference: the run's fp32 model on the normalised images, no autocast, eval mode."""
    p.model.eval()
    with torch.no_grad():
        return p.model.features(p.normalizer(x).contiguous(memory_format=p.rt.memory_format))


def test_features_are_fp32_when_training_runs_in_bf16(tmp_path, digits):
    # train.amp=bf16 on the CPU (CPU autocast supports bf16): training would run in
    # bf16, but herding and every classifier must see what the fp32 model computes.
    p = _protocol(tmp_path, digits, ["train.amp=bf16", "train.device=cpu"])
    assert p.rt.amp == "bf16"
    x = p.x_test[:16]
    ref = _fp32_features(p, x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = p.model.features(p.normalizer(x)).float()
    bf16_error = ((low - ref).norm() / ref.norm()).item()
    assert bf16_error > 1e-3  # what the test must catch: bf16 moves features by ~3 significant digits
    for got in (p.features(x), extract_features(p.model, x, p.normalizer)):
        assert got.dtype == torch.float32
        # fp32 against fp32 (channels_last vs contiguous kernels): rounding only, ~1e-7
        assert ((got - ref).norm() / ref.norm()).item() < 1e-5
    # also inside an autocast region (a memory builder that trains under autocast and extracts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = extract_features(p.model, x, p.normalizer)
    assert ((inside - ref).norm() / ref.norm()).item() < 1e-5


def test_nme_class_means_use_the_exemplars_and_their_flips_and_fc_scope_is_recorded(tmp_path, digits, monkeypatch):
    p = _protocol(tmp_path, digits, ["train.device=cpu", "eval.classifiers=[nme,fc]"])
    built = {}
    real = experiment.build_classifier
    monkeypatch.setattr(experiment, "build_classifier", lambda name, cfg: built.setdefault(name, real(name, cfg)))
    # exemplars: 3 images of each of the first task's 5 classes, put in by hand
    for c in range(5):
        p.memory.add(c, p.x_train[p.y_train == c][:3])
    p.evaluate(0, 5)

    # independent computation, class by class: mean of the unit features of the 3 exemplars and of
    # their mirror images (6 unit vectors), then made unit length (iCaRL's code)
    imgs = torch.cat([p.x_train[p.y_train == c][:3] for c in range(5)])
    both = torch.nn.functional.normalize(_fp32_features(p, torch.cat([imgs, imgs.flip(3)])), dim=1)
    expected = []
    for c in range(5):
        f, ff = both[3 * c: 3 * c + 3], both[15 + 3 * c: 15 + 3 * c + 3]
        mean = (f.sum(0) + ff.sum(0)) / 6
        expected.append(mean / mean.norm())
        without = f.mean(0) / f.mean(0).norm()
        # the flips must matter on these images, or this test could not tell the two apart
        assert (expected[-1] - without).norm() > 1e-3
    torch.testing.assert_close(built["nme"].means, torch.stack(expected), rtol=1e-5, atol=1e-6)
    assert p.metrics["nme"]["class_means"] == "exemplars and their horizontal flips"
    assert p.metrics["fc"]["scope"] == "all"  # the study's arg-max over every output, named in metrics.json
