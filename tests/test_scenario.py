import pytest
import torch

from cilab.data import Scenario


def test_same_seed_same_order_different_seeds_differ():
    a = Scenario.from_seed(100, 10, 0, [str(i) for i in range(100)])
    b = Scenario.from_seed(100, 10, 0, [str(i) for i in range(100)])
    c = Scenario.from_seed(100, 10, 1, [str(i) for i in range(100)])
    assert a.class_order == b.class_order
    assert a.class_order != c.class_order


def test_tasks_are_disjoint_and_cover_all_classes():
    s = Scenario.from_seed(100, 10, 3, [str(i) for i in range(100)])
    tasks = s.tasks
    assert len(tasks) == 10 and all(len(t) == 10 for t in tasks)
    flat = [c for t in tasks for c in t]
    assert sorted(flat) == list(range(100))
    assert flat == s.class_order  # task t owns the t-th block of the order


def test_remap_makes_output_i_the_ith_class_of_the_order():
    s = Scenario.from_seed(10, 5, 7, list("abcdefghij"))
    y = torch.tensor(s.class_order)
    assert s.remap(y).tolist() == list(range(10))
    assert s.ordered_names == [s.class_names[c] for c in s.class_order]
    assert list(s.task_outputs(2)) == [4, 5]
    assert s.seen(2) == 6


def test_num_tasks_must_divide_classes():
    with pytest.raises(ValueError, match="does not divide"):
        Scenario.from_seed(10, 3, 0, list("abcdefghij"))
