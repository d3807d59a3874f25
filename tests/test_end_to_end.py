"""Real short runs on the bundled digits: forgetting and its remedies must show."""

import json

import numpy as np
import pytest

from cilab.cli import main
from cilab.config import build_config
from cilab.experiment import run

# 2 tasks of 5 digits, a few epochs: enough for the methods to separate clearly.
E2E = ["data.name=digits", "scenario.num_tasks=2", "train.epochs=3", "train.milestones=[2]",
       "train.batch_size=16", "train.lr=0.2", "seed=0"]


def check_bookkeeping(out, m):
    """Every accuracy in metrics.json recomputed from the saved confusion matrices, and every
    confusion row checked against the dataset's own test-image count of that class.

    Independent of evaluation.py: the class counts come from the dataset and the class
    order, accuracies from confusion traces. Catches accuracies over the wrong images
    (unseen classes, another task), a shifted accuracy matrix, lost or double-counted images.
    """
    from cilab.config import DataConfig
    from cilab.data import load_dataset

    y_test = load_dataset(DataConfig(name=m["dataset"])).y_test
    per_class = [int((y_test == c).sum()) for c in m["class_order"]]  # output k = k-th class of the order
    cpt = m["classes_per_task"]
    with np.load(out / "confusion.npz") as z:
        for clf in m["classifiers"]:
            r = m[clf]
            for t in range(m["num_tasks"]):
                cm = z[f"{clf}_task{t + 1:02d}"]
                n = cpt * (t + 1)
                assert cm.shape[0] == n and cm.shape[1] in (n, n + 1), (clf, t, cm.shape)
                assert cm.sum(axis=1).tolist() == per_class[:n], (clf, t)
                assert r["accuracy"][t] == pytest.approx(100.0 * np.trace(cm) / cm.sum()), (clf, t)
                for j in range(t + 1):
                    block = cm[j * cpt:(j + 1) * cpt]
                    hits = sum(block[i, j * cpt + i] for i in range(cpt))
                    assert r["accuracy_matrix"][t][j] == pytest.approx(100.0 * hits / block.sum()), (clf, t, j)
                assert r["accuracy_matrix"][t][t + 1:] == [None] * (m["num_tasks"] - t - 1)
                assert r["current_task_accuracy"][t] == pytest.approx(r["accuracy_matrix"][t][t])
            assert r["final_accuracy"] == r["accuracy"][-1]
            assert r["average_incremental_accuracy"] == pytest.approx(sum(r["accuracy"]) / len(r["accuracy"]))


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e")
    extra = {"icarl": ["memory.size=100"]}
    got = {m: run(build_config(m, E2E + extra.get(m, [])), out / m, progress=False)
           for m in ("finetune", "joint", "lwf", "icarl")}
    for m, metrics in got.items():
        metrics["_out"] = out / m
    return got


def test_metrics_file_has_the_documented_fields(methods):
    m = methods["icarl"]
    for key in ("method", "seed", "class_order", "tasks", "timing", "train_images_per_s", "status"):
        assert key in m
    assert m["status"] == "complete" and sorted(c for t in m["tasks"] for c in t) == list(range(10))
    for clf in ("nme", "fc"):
        r = m[clf]
        assert len(r["accuracy"]) == len(r["current_task_accuracy"]) == 2
        assert r["accuracy_matrix"][0][1] is None
    # how the classifiers computed, named: iCaRL's flip-averaged means, the study's arg-max over all outputs
    assert m["nme"]["class_means"] == "exemplars and their horizontal flips" and m["fc"]["scope"] == "all"
    assert m["memory_total"] == [100, 100] and m["memory_per_class"] == [20, 10]  # K=100: 100 // 5, 100 // 10
    for metrics in methods.values():
        check_bookkeeping(metrics["_out"], metrics)


def test_finetuning_forgets_while_joint_training_remembers(methods):
    ft = methods["finetune"]["fc"]["accuracy_matrix"][-1][0]  # first task's classes after the last task
    joint = methods["joint"]["fc"]["accuracy_matrix"][-1][0]
    assert ft < 5.0
    assert joint > 70.0
    assert methods["finetune"]["fc"]["forgetting"] > 50.0


def test_icarl_beats_lwf_beats_finetuning(methods):
    final = {m: methods[m][methods[m]["classifiers"][0]]["final_accuracy"] for m in methods}
    assert final["icarl"] > final["lwf"] + 10.0
    assert final["lwf"] > final["finetune"] + 3.0


def test_all_five_classifiers_from_one_training(tmp_path):
    out = tmp_path / "clf"
    cfg = build_config("icarl", ["data.name=digits", "scenario.num_tasks=5", "train.epochs=1", "train.milestones=[]",
                                 "train.batch_size=64", "memory.size=50", "eval.classifiers=[nme,fc,knn,svm,mlp]"])
    m = run(cfg, out, progress=False)
    check_bookkeeping(out, m)  # every classifier's numbers agree with its confusion matrices and the data
    # one training for all five: the images trained on are one pass per epoch over task data + exemplars
    from cilab.config import DataConfig
    from cilab.data import load_dataset

    y = load_dataset(DataConfig(name="digits")).y_train
    order = m["class_order"]
    task_sizes = [sum(int((y == c).sum()) for c in order[2 * t: 2 * t + 2]) for t in range(5)]
    memory_before = [0] + m["memory_total"][:-1]
    assert m["train_images"] == sum(a + b for a, b in zip(task_sizes, memory_before))
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["classifiers"] == ["nme", "fc", "knn", "svm", "mlp"]
    # different classifiers on the same features: not all the same numbers
    assert len({tuple(m[c]["accuracy"]) for c in ("nme", "fc", "knn", "svm", "mlp")}) > 1


def test_cifar100_path_gives_a_working_run(tmp_path, monkeypatch, capsys):
    from test_datasets import write_fake_cifar100

    write_fake_cifar100(tmp_path / "data", n_train=5, n_test=2, monkeypatch=monkeypatch)
    code = main(["run", "icarl", "--out", str(tmp_path / "run"), "--quiet", f"data.root={tmp_path / 'data'}",
                 "data.download=false", "scenario.num_tasks=2", "train.epochs=1", "train.milestones=[]",
                 "memory.size=200", "train.batch_size=100"])
    assert code == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["dataset"] == "cifar100" and m["status"] == "complete"
    assert len(m["class_names"]) == 100 and m["class_names"][0].startswith("class")
    assert (tmp_path / "run" / "checkpoints" / "task_02.pt").exists()
