"""Real short runs on the bundled digits: forgetting and its remedies must show."""

import json

import pytest

from cilab.cli import main
from cilab.config import build_config
from cilab.experiment import run
from helpers import check_bookkeeping

# The runs of `make demo` (cilab.cli.DEMO_OVERRIDES / DEMO_METHODS): 5 tasks of 2 digits, the
# settings the README's "Results" explains, so these tests check the story the demo tells.


@pytest.fixture(scope="module")
def methods(tmp_path_factory):
    from cilab.cli import DEMO_METHODS, DEMO_OVERRIDES

    out = tmp_path_factory.mktemp("e2e")
    got = {m: run(build_config(m, DEMO_OVERRIDES + extra), out / m, progress=False) for m, extra in DEMO_METHODS.items()}
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
        assert len(r["accuracy"]) == len(r["current_task_accuracy"]) == 5
        assert r["accuracy_matrix"][0][1:] == [None] * 4
    # how the classifiers computed, named: iCaRL's flip-averaged means, the study's arg-max over all outputs
    assert m["nme"]["class_means"] == "exemplars and their horizontal flips" and m["fc"]["scope"] == "all"
    # K=100 over 2, 4, 6, 8, 10 classes: 100 // n a class, n * (100 // n) in all
    assert m["memory_per_class"] == [50, 25, 16, 12, 10] and m["memory_total"] == [100, 100, 96, 96, 100]
    for metrics in methods.values():
        check_bookkeeping(metrics["_out"], metrics)


def test_finetuning_forgets_while_joint_training_remembers(methods):
    ft = methods["finetune"]["fc"]["accuracy_matrix"][-1][0]  # first task's classes after the last task
    joint = methods["joint"]["fc"]["accuracy_matrix"][-1][0]
    assert ft < 5.0
    assert joint > 70.0
    assert methods["finetune"]["fc"]["forgetting"] > 50.0


def test_icarl_beats_lwf_and_lwf_keeps_old_classes_that_finetuning_loses(methods):
    """LwF's *final* accuracy against fine-tuning's depends on the seed on digits (README, "Results":
    seed 0 22.2 against 14.2, seeds 1 and 2 9.8 / 14.9 and 12.0 / 14.2; on an H100 10.2 / 14.9), so
    it is not asserted. What its distillation shows in every run measured is old classes kept: the
    accuracy on the earlier tasks' classes, averaged over tasks 2-5, was 16.3 to 30.7 for LwF (seeds
    0-2, fp32 and bf16) and 0 for fine-tuning, and 0 for LwF with loss.distillation=none too. iCaRL
    (NME) ended above LwF by 29 points or more (fp32)."""
    def old_classes(m):  # per later task, the mean accuracy over the tasks before it; then their mean
        rows = methods[m]["fc"]["accuracy_matrix"][1:]
        return sum(sum(row[:t]) / t for t, row in enumerate(rows, 1)) / len(rows)

    final = {m: methods[m][methods[m]["classifiers"][0]]["final_accuracy"] for m in methods}
    assert final["icarl"] > final["lwf"] + 10.0
    assert old_classes("lwf") > 10.0 and old_classes("finetune") < 1.0, (old_classes("lwf"), old_classes("finetune"))


def test_the_demo_tells_the_studys_story(methods):
    """Issue 14, item 5: fine-tuning forgets, joint training does not, iCaRL remembers, and
    NME > FC > fine-tuning (the study's figure 1). Seed 0: final 14.2 / 86.7 / 62.7 (NME), average
    incremental 78.2 (NME) > 55.2 (FC) > 40.3 (fine-tuning); the demo's settings before this issue
    ended iCaRL's NME at 25.3 and its FC at chance. The bars hold for seeds 0-2 (README, "Results":
    iCaRL's NME ended at 39.1-62.7 while joint ended at 86.7-94.9, so "iCaRL keeps 60% of joint"
    held for seed 0 alone; NME - FC >= 10.8 and FC - fine-tuning >= 8.2 points on average)."""
    final = lambda m, c="fc": methods[m][c]["final_accuracy"]  # noqa: E731
    avg = lambda m, c="fc": methods[m][c]["average_incremental_accuracy"]  # noqa: E731
    assert final("finetune") <= 20.0  # at most the last task's 2 classes of 10
    assert final("joint") >= 80.0
    assert final("icarl", "nme") >= 2 * final("finetune")
    assert avg("icarl", "nme") > avg("icarl", "fc") + 5.0
    assert avg("icarl", "fc") > avg("finetune") + 5.0


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
    from helpers import write_fake_cifar100

    write_fake_cifar100(tmp_path / "data", n_train=5, n_test=2, monkeypatch=monkeypatch)
    code = main(["run", "icarl", "--out", str(tmp_path / "run"), "--quiet", f"data.root={tmp_path / 'data'}",
                 "data.download=false", "scenario.num_tasks=2", "train.epochs=1", "train.milestones=[]",
                 "memory.size=200", "train.batch_size=100"])
    assert code == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["dataset"] == "cifar100" and m["status"] == "complete"
    assert len(m["class_names"]) == 100 and m["class_names"][0].startswith("class")
    assert (tmp_path / "run" / "checkpoints" / "task_02.pt").exists()
