"""Methods as plugins (issue 16): the API, ER / WA / EWC, first-task schedules and B50 splits.

Tiny runs on the bundled digits (10 classes) on the CPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cilab import experiment
from cilab.config import ConfigError, build_config, task_train_config
from cilab.data import Scenario
from cilab.methods import METHODS, TaskContext
from cilab.methods.ewc import EWC, EWCArgs
from cilab.methods.wa import WAArgs, WeightAligning
from helpers import interrupted_and_resumed

# ResNet-20 wherever the depth does not matter: the suite must stay short on CI's two cores
TINY = ["data.name=digits", "scenario.num_tasks=5", "train.epochs=1", "train.milestones=[]", "train.batch_size=64",
        "model.name=resnet20"]
MEM = ["memory.size=40"]
ROOT = Path(__file__).resolve().parents[1]


def _numbers(m: dict) -> dict:
    return {c: (m[c]["accuracy"], m[c]["accuracy_matrix"]) for c in m["classifiers"]} | {
        "train_images": m["train_images"], "memory_total": m["memory_total"]}


# -- the API ------------------------------------------------------------------------------


def test_every_method_of_the_study_and_the_new_ones_is_a_registered_plugin():
    assert {"finetune", "joint", "lwf", "icarl", "er", "wa", "ewc"} <= set(METHODS)


def test_method_args_are_checked_like_every_other_section():
    cfg = build_config("wa", ["method_args.T=3"])
    assert cfg.method_args == {"T": 3.0, "clip": True, "align_bias": False}  # completed with the defaults
    with pytest.raises(ConfigError, match="method wa has no setting 'method_args.temp'; its settings: T, clip"):
        build_config("wa", ["method_args.temp=3"])
    with pytest.raises(ConfigError, match="'method_args.T' must be a number"):
        build_config("wa", ["method_args.T=hot"])
    with pytest.raises(ConfigError, match="must be > 0"):
        build_config("wa", ["method_args.T=0"])
    with pytest.raises(ConfigError, match="method icarl has no setting 'method_args.T'; its settings: none"):
        build_config("icarl", ["method_args.T=2"])


def test_no_method_name_is_spelled_out_in_the_protocol():
    src = (ROOT / "src/cilab/experiment.py").read_text()
    for name in ("finetune", "joint", "lwf", "icarl", "\"er\"", "wa", "ewc"):
        assert f"'{name}'" not in src and f'"{name}"' not in src, name


# -- WA: weight aligning ------------------------------------------------------------------------


def _ctx(model, n_old, n_seen, **kw) -> TaskContext:
    return TaskContext(t=1, n_old=n_old, n_seen=n_seen, num_classes=kw.get("num_classes", 4), model=model,
                       memory=None, criterion=None, device=torch.device("cpu"), generator=torch.Generator(),
                       train_cfg=None, data=kw.get("data"), features=None, normalize=kw.get("normalize"),
                       train=None, new_model=None, log=print)


def test_weight_aligning_rescales_new_weights_to_the_old_mean_norm_by_hand():
    model = torch.nn.Module()
    model.head = torch.nn.Linear(2, 4)
    with torch.no_grad():
        model.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 3.0], [4.0, 0.0], [0.0, 0.0]]))
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 7.0]))
    # old rows 0-1 have norms 1 and 3 (mean 2); the new row 2 has norm 4; row 3 is a class not seen yet
    WeightAligning(WAArgs()).after_train(_ctx(model, n_old=2, n_seen=3))
    # gamma = 2 / 4 = 0.5: the new row [4, 0] becomes [2, 0]; the unseen row 3 and all biases stay
    assert model.head.weight.tolist() == [[1.0, 0.0], [0.0, 3.0], [2.0, 0.0], [0.0, 0.0]]
    assert model.head.bias.tolist() == [0.0, 0.0, 5.0, 7.0]
    WeightAligning(WAArgs(align_bias=True)).after_train(_ctx(model, n_old=1, n_seen=3))
    # old norm 1, new norms 3 and 2 (mean 2.5): gamma 0.4 on rows 1-2 and, with align_bias, biases 1-2
    assert torch.allclose(model.head.weight, torch.tensor([[1.0, 0.0], [0.0, 1.2], [0.8, 0.0], [0.0, 0.0]]))
    assert torch.allclose(model.head.bias, torch.tensor([0.0, 0.0, 2.0, 7.0]))


def test_wa_on_digits_leaves_equal_mean_norms_after_every_task(tmp_path):
    out = tmp_path / "wa"
    m = experiment.run(build_config("wa", TINY + MEM), out, progress=False)
    assert m["status"] == "complete"
    for t in range(1, 5):
        state = torch.load(out / "checkpoints" / f"task_{t + 1:02d}.pt", weights_only=True)
        w = state["model"]["head.weight"]
        n_old, n_seen = 2 * t, 2 * (t + 1)
        norms = w.norm(dim=1)
        assert torch.isclose(norms[:n_old].mean(), norms[n_old:n_seen].mean(), rtol=1e-5), t
        assert (w >= 0).all()  # clipped after every step


# -- EWC: the penalty -------------------------------------------------------------------------


def test_ewc_penalty_is_zero_at_the_anchor_and_grows_along_high_fisher_directions():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -2.0]]))
    ewc = EWC(EWCArgs(lambda_=10.0))
    ewc.anchors = [[torch.tensor([[1.0, -2.0]])]]
    ewc.fishers = [[torch.tensor([[4.0, 0.25]])]]
    assert ewc.penalty(model).item() == 0.0
    with torch.no_grad():
        model.weight.add_(torch.tensor([[0.5, 0.0]]))  # along the high-Fisher weight
    high = ewc.penalty(model).item()
    assert high == pytest.approx(10.0 / 2 * 4.0 * 0.25)  # lambda/2 * F * delta^2 = 5
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, -1.5]]))  # the same step along the low-Fisher weight
    assert ewc.penalty(model).item() == pytest.approx(10.0 / 2 * 0.25 * 0.25)
    ewc.anchors.append([torch.tensor([[0.0, 0.0]])])  # a second task's term adds up (per_task mode)
    ewc.fishers.append([torch.tensor([[1.0, 1.0]])])
    assert ewc.penalty(model).item() == pytest.approx(5 * (0.25 * 0.25) + 5 * (1.0 + 2.25))


def _fisher(x, y, **args):
    """EWC's Fisher of the model z = (w0 x, w1 x) (outputs 0 and 1 seen) on images x, labels y."""
    model = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[args.pop("w0", 0.0)], [0.0]]))
    ctx = _ctx(model, 0, 2, data=lambda lo, hi: (x, y), normalize=lambda v: v)
    ctx.generator.manual_seed(0)
    return EWC(EWCArgs(**args)).fisher(ctx)[0]


@pytest.mark.parametrize("estimator", ["per_sample", "batch"])
def test_ewc_fisher_of_identical_images_is_their_squared_gradient_by_hand(estimator):
    # Logits (w0*x, w1*x) at w = 0, x = 1, label 0: p = (1/2, 1/2), so
    # d(-log p_0)/dw0 = (p_0 - 1) x = -1/2 and d/dw1 = p_1 x = +1/2: squared 1/4
    # each. Every image (and so every batch of them) has this gradient: the Fisher is 1/4
    # whichever way it is estimated (a batch gradient times |b| would give 1/2).
    fisher = _fisher(torch.ones(4, 1), torch.zeros(4, dtype=torch.int64), fisher_batch=2,
                     fisher_estimator=estimator)
    assert torch.allclose(fisher, torch.tensor([[0.25], [0.25]]))


def test_ewc_fisher_is_per_image_and_the_batch_estimate_loses_what_cancels_in_a_batch():
    # Images x = +1 and x = -1, label 0, at w = 0: gradients (-x/2, +x/2), each squared 1/4, so the
    # empirical Fisher (the mean of the squared per-image gradients) is 1/4. In one batch of both,
    # the gradients cancel: the batch estimate is 0.
    x, y = torch.tensor([[1.0], [-1.0], [1.0], [-1.0]]), torch.zeros(4, dtype=torch.int64)
    assert torch.allclose(_fisher(x, y, fisher_batch=2), torch.tensor([[0.25], [0.25]]))  # per_sample: the default
    assert torch.allclose(_fisher(x, y, fisher_batch=2, fisher_estimator="batch"), torch.zeros(2, 1))
    # per-image gradients do not depend on how the images are chunked
    assert torch.allclose(_fisher(x, y, fisher_batch=3), torch.tensor([[0.25], [0.25]]))


@pytest.mark.parametrize("estimator", ["per_sample", "batch"])
def test_ewc_fisher_of_a_frozen_parameter_is_zero(estimator):
    # the bias is frozen: no gradient, no penalty on it; the weight's Fisher is 1/4 as above
    model = torch.nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.zero_(), model.bias.zero_()
    model.bias.requires_grad_(False)
    x, y = torch.ones(4, 1), torch.zeros(4, dtype=torch.int64)
    ctx = _ctx(model, 0, 2, data=lambda lo, hi: (x, y), normalize=lambda v: v)
    weight, bias = EWC(EWCArgs(fisher_batch=2, fisher_estimator=estimator)).fisher(ctx)
    assert torch.allclose(weight, torch.tensor([[0.25], [0.25]]))
    assert torch.equal(bias, torch.zeros(2))


def test_ewc_fisher_with_labels_drawn_from_the_model_is_the_papers_expectation():
    # w0 = ln 3, x = 1: p = (3/4, 1/4). Label 0 gives gradients (p_0 - 1, p_1) = (-1/4, 1/4), squared
    # 1/16; label 1 gives (p_0, p_1 - 1) = (3/4, -3/4), squared 9/16. With the data's labels (all 0)
    # the Fisher is 1/16; with labels drawn from the model it is, in expectation,
    # 3/4 * 1/16 + 1/4 * 9/16 = 3/16 (4,000 images: standard deviation 0.0034).
    import math

    x, y = torch.ones(4000, 1), torch.zeros(4000, dtype=torch.int64)
    data = _fisher(x, y, w0=math.log(3), fisher_batch=500)
    assert torch.allclose(data, torch.full((2, 1), 1 / 16))
    drawn = _fisher(x, y, w0=math.log(3), fisher_batch=500, fisher_labels="model")
    assert drawn[0, 0].item() == pytest.approx(3 / 16, abs=0.015)
    assert drawn[1, 0].item() == pytest.approx(drawn[0, 0].item())  # the two gradients mirror each other


# -- trains_on: what the default training_data returns -----------------------------------------


def test_trains_on_seen_makes_the_default_training_data_every_class_so_far(tmp_path):
    """A plugin that only declares ``trains_on = "seen"`` trains, as joint does, on every class seen
    so far: the declaration bench.study_images prices a run by is the one training reads. 4 classes of
    10 training images in 2 tasks, 1 epoch, no memory: 20 + 20 images "current", 20 + 40 "seen"."""
    from cilab.methods.base import Method, register
    from helpers import small_npz

    @register("test-seen-plugin")
    class SeenPlugin(Method):
        trains_on = "seen"

    data = ["data.name=npz", f"data.path={small_npz(tmp_path / 'four.npz')}", "scenario.num_tasks=2",
            "train.epochs=1", "train.milestones=[]", "train.batch_size=8", "model.name=resnet20",
            "eval.classifiers=[fc]", "memory.size=0", "train.val_split=0.0", "train.keep_best=false"]
    try:
        seen = experiment.run(build_config("finetune", data + ["method=test-seen-plugin"]), tmp_path / "s",
                              progress=False)
    finally:
        METHODS._items.pop("test-seen-plugin")
    current = experiment.run(build_config("finetune", data), tmp_path / "c", progress=False)
    joint = experiment.run(build_config("finetune", data + ["method=joint"]), tmp_path / "j", progress=False)
    assert current["train_images"] == 20 + 20
    assert seen["train_images"] == joint["train_images"] == 20 + 40


def test_an_unknown_trains_on_is_refused_when_the_method_is_defined():
    from cilab.methods.base import Method, register

    with pytest.raises(TypeError, match="trains_on = 'all'.*'current' or 'seen'"):
        @register("test-bad-trains-on")
        class Bad(Method):
            trains_on = "all"
    assert "test-bad-trains-on" not in METHODS


# -- joint: a fresh network per task ---------------------------------------------------------------


def test_joint_starts_every_task_from_a_fresh_network_unless_warm_start(monkeypatch, tmp_path):
    two = ["data.name=digits", "scenario.num_tasks=2", "train.epochs=1", "train.milestones=[]", "train.batch_size=64",
           "model.name=resnet20"]
    starts, ends = [], []  # the weights each training starts from / each task ends with, in call order
    real_train, real_task = experiment.train_task, experiment.Protocol.run_task

    def spy_train(model, *a, **k):
        starts.append({n: p.detach().clone() for n, p in model.named_parameters()})
        return real_train(model, *a, **k)

    def spy_task(self, t):
        real_task(self, t)
        ends.append({n: p.detach().clone() for n, p in self.model.named_parameters()})

    monkeypatch.setattr(experiment, "train_task", spy_train)
    monkeypatch.setattr(experiment.Protocol, "run_task", spy_task)
    experiment.run(build_config("joint", two), tmp_path / "a", progress=False)
    experiment.run(build_config("joint", two + ["train.first_task.lr=0.5"]), tmp_path / "b", progress=False)
    experiment.run(build_config("joint", two + ["method_args.warm_start=true"]), tmp_path / "c", progress=False)
    assert not torch.equal(ends[0]["head.weight"], ends[2]["head.weight"])  # task 1 trained differently in b
    for n in starts[1]:
        assert torch.equal(starts[1][n], starts[3][n]), n  # ... yet task 2 starts from the same fresh draw
    assert any(not torch.equal(starts[1][n], starts[0][n]) for n in starts[1])  # a new draw, not task 1's start
    assert any(not torch.equal(starts[1][n], ends[0][n]) for n in starts[1])  # nor task 1's result
    for n, p in starts[5].items():
        assert torch.equal(p, ends[4][n]), n  # warm start: task 2 begins where task 1 ended


# -- schedules and splits --------------------------------------------------------------------------


def test_first_task_schedule_applies_to_task_1_only():
    cfg = build_config("icarl", ["train.first_task.epochs=100", "train.first_task.milestones=[60,80]"]).train
    first, later = task_train_config(cfg, 0), task_train_config(cfg, 1)
    assert (first.epochs, first.milestones, first.lr) == (100, [60, 80], 2.0)
    assert (later.epochs, later.milestones, later.lr) == (70, [49, 63], 2.0)
    with pytest.raises(ConfigError, match="'train.first_task.milestones' has 90, outside 1..79"):
        build_config("icarl", ["train.first_task.epochs=80", "train.first_task.milestones=[90]"])


def test_b50_split_gives_a_large_first_task_and_even_ones_after():
    sc = Scenario.from_seed(100, 11, 0, [str(i) for i in range(100)], first_task_classes=50)
    assert sc.bounds == [0, 50] + list(range(55, 101, 5))
    assert [len(t) for t in sc.tasks] == [50] + [5] * 10
    assert sc.task_of(torch.tensor([0, 49, 50, 54, 55, 99])).tolist() == [0, 0, 1, 1, 2, 10]
    with pytest.raises(ValueError, match="must split them evenly"):
        Scenario.from_seed(100, 8, 0, [str(i) for i in range(100)], first_task_classes=50)


@pytest.mark.parametrize("method", ["er", "wa", "ewc"])
def test_new_methods_run_b50_style_splits_with_the_first_task_trained_longer(method, tmp_path):
    over = ["data.name=digits", "scenario.num_tasks=4", "scenario.first_task_classes=4", "train.epochs=1",
            "train.milestones=[]", "train.batch_size=64", "train.first_task.epochs=2", "model.name=resnet20"]
    over += MEM if METHODS[method].uses_memory else []
    m = experiment.run(build_config(method, over), tmp_path / method, progress=False)
    assert m["classes_seen"] == [4, 6, 8, 10]
    assert [len(t) for t in m["tasks"]] == [4, 2, 2, 2]
    # images trained on: 2 epochs of the first task's images, then 1 epoch of each later task's (+ exemplars)
    from cilab.data import load_dataset

    data = load_dataset(build_config(method, over).data)
    per_output = torch.bincount(Scenario.from_seed(10, 4, 0, data.class_names, 4).remap(data.y_train), minlength=10)
    expected = 2 * int(per_output[:4].sum()) + sum(int(per_output[lo:lo + 2].sum()) for lo in (4, 6, 8))
    expected += sum(m["memory_total"][:-1])  # exemplars of the tasks before, one epoch each
    assert m["train_images"] == expected
    # the last task's accuracy row has one entry per task, the first covering 4 classes
    assert len(m[m["classifiers"][0]]["accuracy_matrix"][-1]) == 4


# -- resume -----------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["er", "wa", "ewc", "joint"])
def test_resume_after_an_interrupt_equals_the_uninterrupted_run(method, tmp_path, monkeypatch):
    over = TINY + (MEM if METHODS[method].uses_memory else [])
    cfg = build_config(method, over)
    whole, resumed = interrupted_and_resumed(cfg, tmp_path, monkeypatch)
    assert _numbers(resumed) == _numbers(whole)


# -- the page for the next method ---------------------------------------------------------------


def test_the_documented_example_method_runs_on_digits(tmp_path):
    spec = importlib.util.spec_from_file_location("example_method", ROOT / "docs" / "example_method.py")
    module = importlib.util.module_from_spec(spec)
    if "prob-match" not in METHODS:
        spec.loader.exec_module(module)
    m = experiment.run(build_config(None, TINY + ["method=prob-match", "method_args.weight=2", "memory.size=0",
                                                  "eval.classifiers=[fc]", "train.lr=0.1"]),
                       tmp_path / "lm", progress=False)
    assert m["method"] == "prob-match" and m["method_args"] == {"weight": 2.0}
    assert m["status"] == "complete" and len(m["fc"]["accuracy"]) == 5
    # its loss by hand: CE ln 3 over 3 zero logits; softmax over the 2 old outputs (1/2, 1/2) against
    # the old model's (3/4, 1/4): squared distance 1/8, times weight 2
    import math
    from types import SimpleNamespace

    from cilab.models import Outputs

    method = METHODS["prob-match"](METHODS["prob-match"].Args(weight=2.0))
    z, z_old = torch.zeros(1, 4), torch.tensor([[math.log(3), 0.0, 5.0, 5.0]])
    ctx = SimpleNamespace(n_old=2, n_seen=3)
    got = method.loss(None, torch.tensor([2]), Outputs(z, None), Outputs(z_old, None), ctx).item()
    assert got == pytest.approx(math.log(3) + 0.25, rel=1e-6)


def test_ce_with_kd_of_wa_and_bic_by_hand():
    import math

    from cilab.losses import ce_with_kd

    z, y = torch.zeros(1, 4), torch.tensor([2])  # 3 seen outputs of 4, all logits 0: CE = ln 3
    z_old = torch.tensor([[2 * math.log(3), 0.0, 9.0, 9.0]])  # softmax(z_old[:, :2] / 2) = (3/4, 1/4)
    # KD = -(3/4 ln 1/2 + 1/4 ln 1/2) = ln 2; lambda = n_old / n_seen = 2/3
    assert ce_with_kd(z, y, None, 2, 3, 2.0).item() == pytest.approx(math.log(3))
    assert ce_with_kd(z, y, z_old, 2, 3, 2.0).item() == pytest.approx(math.log(3) / 3 + 2 * math.log(2) / 3)


# -- the loss section: read by the methods that say so, refused for the others ------------------


class _RecordingCriterion:
    """Stands in for the ``loss`` section's criterion: records that a method's loss called it."""

    distills = True

    def __init__(self):
        self.calls = 0

    def __call__(self, logits, y, old_logits):
        self.calls += 1
        return logits.float().sum() * 0.0


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_reads_the_loss_section_unless_it_says_it_has_its_own(name):
    from cilab.config import build_config

    method = METHODS[name](METHODS[name].Args())
    model = method.build_model(build_config(name).model, 4)
    x = torch.randn(4, 3, 32, 32)
    # the first task (no old model), then a later one with the old model's outputs, where a
    # method might call the criterion only to distill
    for t, n_old, y, old in ((0, 0, torch.tensor([0, 1, 0, 1]), None),
                             (1, 2, torch.tensor([2, 3, 2, 3]), model(x, with_features=True))):
        ctx = _ctx(model, n_old, n_old + 2)
        ctx.t, ctx.criterion = t, _RecordingCriterion()
        if t and getattr(model, "aux_head", 0) is None:  # DER grows its auxiliary head in before_task
            model.aux_head = torch.nn.Linear(model.dims[-1], 2 + 1)  # the new classes + one for all old
        method.loss(x, y, model(x, with_features=True), old, ctx)
        assert ctx.criterion.calls == (0 if method.own_loss else 1), f"task {t}: own_loss says the opposite"


@pytest.mark.parametrize("name", sorted(n for n in METHODS if METHODS[n].own_loss))
def test_a_loss_setting_for_a_method_with_its_own_loss_is_refused(name):
    with pytest.raises(ConfigError, match=f"method {name} has a loss of its own .* drop loss.classification"):
        build_config(name, ["loss.classification=mse"])


def test_a_method_with_its_own_loss_runs_whatever_the_loss_section_says():
    # the defaults' loss.distillation=bce: no "set loss.distillation=none" for a method that never reads it
    for name in ("er", "ewc", "der", "derpp"):
        assert build_config(None, [f"method={name}"] + (["memory.size=0", "eval.classifiers=[fc]"] if name == "ewc" else MEM)).method == name


def test_the_loss_section_is_still_set_for_the_methods_that_read_it():
    assert build_config("wa").loss.classification == "bce"  # inherited from icarl's preset, unused, not refused
    assert build_config("icarl", ["loss.classification=mse", "loss.distillation=mse"]).loss.distillation == "mse"
