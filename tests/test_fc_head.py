"""Issue 20: with enough SGD steps per task, LwF's and iCaRL's FC head learns the newest classes on digits.

With the study's settings on digits (lr 2.0, batch 128, 10 epochs: 30 steps a
task), the FC head classified the current task's test images at 0%. The
README ("Why the FC head missed the newest classes on digits") gives the
evidence from benchmarks/fc_probe.py: the lr is ten times too large for 10
outputs, and 30 steps cannot lift the new outputs past the old ones that
distillation holds up. With the step size the study had on CIFAR-100
(lr 0.2 for 10 outputs) and about 270 steps a task, the head is biased
towards the newest classes, as the literature reports for these methods.
"""

import pytest

from cilab.config import build_config
from cilab.experiment import run

ENOUGH_STEPS = ["data.name=digits", "scenario.num_tasks=5", "train.batch_size=16", "train.lr=0.2",
                "train.epochs=15", "train.milestones=[10,13]"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fc_head")
    return {
        "lwf": run(build_config("lwf", ENOUGH_STEPS), root / "lwf", progress=False),
        "icarl": run(build_config("icarl", ENOUGH_STEPS + ["memory.size=200", "eval.classifiers=[fc]"]),
                     root / "icarl", progress=False),
    }


def test_icarl_fc_classifies_the_current_task_at_least_as_well_as_the_old_ones(runs):
    fc = runs["icarl"]["fc"]
    for t in range(1, 5):
        row = fc["accuracy_matrix"][t]
        old = sum(row[:t]) / t
        current = fc["current_task_accuracy"][t]
        assert current == pytest.approx(row[t], abs=1e-4)  # the current task's images are the row's last block
        assert current >= old, (t + 1, current, row)
        assert current >= 50.0, (t + 1, current)


def test_lwf_fc_learns_every_new_task_far_from_zero(runs):
    # benchmarks/fc_probe.py measured 95.6, 52.7, 97.7, 78.7% for tasks 2-5 with these settings;
    # the comparison with the old tasks is not pinned for LwF (see the session note).
    fc = runs["lwf"]["fc"]
    for t in range(1, 5):
        assert fc["current_task_accuracy"][t] > 25.0, (t + 1, fc["current_task_accuracy"])
