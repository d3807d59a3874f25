"""BiC, DER and DER++ (issue 18), and the two API additions they need:
per-sample tensors beside the training images (DER++'s stored logits) and
``Method.load_model`` (DER's grown network on resume).

Tiny runs on the bundled digits (10 classes), ResNet-20, on the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from cilab import experiment
from cilab.config import build_config
from cilab.data.loader import BatchLoader, Normalizer
from cilab.methods import TaskContext
from cilab.methods.bic import BiC, fit_affine
from cilab.methods.derpp import DERpp, DERppArgs
from cilab.models import Outputs
from helpers import eager_and_graphed, interrupted_and_resumed

SMALL = ["data.name=digits", "train.epochs=1", "train.milestones=[]", "train.batch_size=128",
         "model.name=resnet20", "memory.size=40", "eval.classifiers=[fc,nme]"]
B0 = SMALL + ["scenario.num_tasks=2"]  # 2 tasks of 5 digits (the shared 2-core machine is slow: keep runs short)
B50 = SMALL + ["scenario.num_tasks=3", "scenario.first_task_classes=4"]  # 4 digits, then 2 tasks of 3


def _ckpt(out, t):
    return torch.load(out / "checkpoints" / f"task_{t:02d}.pt", map_location="cpu", weights_only=False)


# -- the API: per-sample tensors --------------------------------------------------------------


def test_per_sample_tensors_are_batched_with_their_images():
    # image i is filled with the value i, its label is i and its per-sample row is (10 i, 10 i + 1):
    # whatever the shuffle, every batch row must still belong to its image
    n = 20
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 3, 4, 4).contiguous()
    y = torch.arange(n)
    rows = torch.stack([10.0 * y, 10.0 * y + 1], dim=1)
    loader = BatchLoader(x, y, 6, Normalizer(torch.zeros(3), torch.ones(3) / 255), augment=False,
                         generator=torch.Generator().manual_seed(1), per_sample=(rows,))
    seen = []
    for xb, yb, rb in loader:
        assert torch.equal(xb[:, 0, 0, 0], yb.float())
        assert torch.equal(rb, torch.stack([10.0 * yb, 10.0 * yb + 1], dim=1))
        seen += yb.tolist()
    assert sorted(seen) == list(range(n)) and seen != list(range(n))  # all of them, shuffled


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(12, 3)

    def forward(self, x, with_features=False):
        f = x.flatten(1)
        z = self.head(f)
        return Outputs(z, f) if with_features else z


def test_a_graphed_step_copies_the_per_sample_tensors_in_like_the_images():
    def loss(x, y, out, old, target):  # a loss that needs each image's own row
        return (out.logits - target).pow(2).mean()

    torch.manual_seed(0)
    eager, graphed, backend = eager_and_graphed([_Tiny(), _Tiny()], loss)
    g = torch.Generator().manual_seed(2)
    for i in range(4):
        x, y = torch.randn(8, 3, 2, 2, generator=g), torch.randint(0, 3, (8,), generator=g)
        target = torch.randn(8, 3, generator=g)  # different every batch: a stale copy would show
        assert torch.equal(eager(x, y, target), graphed(x, y, target)), i
    assert backend.captures == 1 and backend.replays == 3


# -- BiC ----------------------------------------------------------------------------------------


def test_bic_stage_2_recovers_a_known_bias_on_the_new_logits():
    # Labels drawn from softmax(z*); the new classes' logits are seen as 2 z* + 1, so the
    # maximum-likelihood correction is alpha = 1/2, beta = -1/2 (up to sampling noise).
    g = torch.Generator().manual_seed(0)
    z_true = 2 * torch.randn(8000, 4, generator=g)
    y = torch.multinomial(torch.softmax(z_true, dim=1), 1, generator=g).squeeze(1)
    new = torch.tensor([False, False, True, True])
    z_seen = torch.where(new, 2 * z_true + 1, z_true)
    alpha, beta = fit_affine(z_seen, y, new, steps=800, lr=0.02)
    assert alpha == pytest.approx(0.5, abs=0.05) and beta == pytest.approx(-0.5, abs=0.1)


def _rows(x):
    return sorted(hash(r.numpy().tobytes()) for r in x.cpu())


def test_bic_bias_changes_only_in_stage_2_and_only_from_held_out_data(monkeypatch, tmp_path):
    trained, stage2, around = [], [], []
    real_train, real_fit = experiment.Protocol.train_on, BiC.fit_bias
    full = []
    real_data = BiC.training_data

    def spy_data(self, ctx):
        full.append(super(BiC, self).training_data(ctx))
        return real_data(self, ctx)

    def spy_train(self, ctx, x, y, *a, **k):
        head = self.model.head
        before = (head.alpha.clone(), head.beta.clone())
        trained.append((x, y))
        images = real_train(self, ctx, x, y, *a, **k)
        around.append((before, (head.alpha.clone(), head.beta.clone())))
        return images

    def spy_fit(self, ctx, x, y):
        stage2.append((x, y))
        return real_fit(self, ctx, x, y)

    monkeypatch.setattr(BiC, "training_data", spy_data)
    monkeypatch.setattr(experiment.Protocol, "train_on", spy_train)
    monkeypatch.setattr(BiC, "fit_bias", spy_fit)
    out = tmp_path / "bic"
    m = experiment.run(build_config("bic", B0), out, progress=False)
    assert m["status"] == "complete" and len(stage2) == 1  # stage 2 from the second task on
    for before, after in around:  # stage 1 never moves alpha or beta
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    for t, ((xv, yv), (xt, yt), (xf, yf)) in enumerate(zip(stage2, trained[1:], full[1:]), 1):
        # held out: 10% of each old class's exemplars (40 / 5 = 8 per class: 1), as many per new class
        assert torch.bincount(yv, minlength=10).tolist() == [1] * 10
        # stage 1 trains on the rest, stage 2 on the held-out part: together the task's data, no image in both
        assert _rows(torch.cat([xt, xv])) == _rows(xf) and len(xt) + len(xv) == len(xf)
    first, second = _ckpt(out, 1)["model"], _ckpt(out, 2)["model"]
    assert torch.equal(first["head.alpha"], torch.ones(10)) and torch.equal(first["head.beta"], torch.zeros(10))
    # after task 2: the old classes uncorrected, the 5 new ones share the (alpha, beta) stage 2 fitted
    assert torch.equal(second["head.alpha"][:5], torch.ones(5)) and torch.equal(second["head.beta"][:5], torch.zeros(5))
    a, b = second["head.alpha"][5:], second["head.beta"][5:]
    assert (a == a[0]).all() and (b == b[0]).all() and (a[0], b[0]) != (1.0, 0.0)


# -- DER ----------------------------------------------------------------------------------------


def test_der_grows_and_keeps_old_extractors_bit_for_bit(monkeypatch, tmp_path):
    optimised = []
    real_train = experiment.Protocol.train_on

    def spy_train(self, ctx, x, y, *a, **k):
        ids = {id(p) for p in self.method.parameters(ctx)}
        optimised.append({n for n, p in self.model.named_parameters() if id(p) in ids})
        return real_train(self, ctx, x, y, *a, **k)

    monkeypatch.setattr(experiment.Protocol, "train_on", spy_train)
    out = tmp_path / "der"
    m = experiment.run(build_config("der", B0), out, progress=False)
    assert m["status"] == "complete"
    states = [_ckpt(out, t)["model"] for t in range(1, 3)]
    for t, state in enumerate(states):
        assert 1 + max(int(k.split(".")[1]) for k in state if k.startswith("extractors.")) == t + 1
        assert state["head.weight"].shape == (10, 64 * (t + 1))  # one 64-d extractor per task
        if t:
            assert state["aux_head.weight"].shape == (5 + 1, 64)  # 5 new classes + "old"
        for k, v in states[t - 1].items():
            if k.startswith("extractors.") and int(k.split(".")[1]) < t:
                assert torch.equal(state[k], v), (t, k)  # weights and batch-norm statistics, bit for bit
    for t, names in enumerate(optimised):  # only the newest extractor and the classifiers train
        assert {n.split(".")[1] for n in names if n.startswith("extractors.")} == {str(t)}
        assert {"head.weight", "head.bias"} <= names and (t == 0) == ("aux_head.weight" not in names)

    # the report (t-SNE, exemplar grid) rebuilds the grown network from the checkpoint, as a resume does
    from cilab.evaluation import extract_features
    from cilab.checkpoint_figures import RunState
    from cilab.aggregate import load_run

    st = RunState(load_run(out), "cpu", {})
    model, memory = st.load(2)
    assert len(model.extractors) == 2 and torch.equal(model.state_dict()["head.weight"], states[1]["head.weight"])
    assert sorted(memory) == list(range(10))
    x = st.x_train[:8]
    grown = experiment.METHODS["der"]().build_model(build_config("der", B0).model, 10)
    experiment.METHODS["der"]().load_model(grown, states[1])  # the resume's way, on its own
    assert torch.equal(extract_features(model, x, st.normalizer, 8), extract_features(grown.eval(), x, st.normalizer, 8))


# -- DER++ ----------------------------------------------------------------------------------------


def test_derpp_loss_by_hand():
    # two images, both with logits (0, 0): CE = log 2 each. The first is new, the
    # second replayed with stored logits (1, -1): MSE = ((0-1)^2 + (0+1)^2) / 2 = 1.
    ctx = TaskContext(t=1, n_old=1, n_seen=2, num_classes=2, model=None, memory=None, criterion=None,
                      device=torch.device("cpu"), generator=None, train_cfg=None, data=None, features=None,
                      normalize=None, train=None, new_model=None, log=print)
    z = torch.zeros(2, 2)
    stored = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, -1.0]])
    loss = DERpp(DERppArgs(alpha=0.3, beta=0.5)).loss(None, torch.tensor([1, 0]), Outputs(z, None), None, ctx, stored)
    assert loss.item() == pytest.approx(math.log(2) + 0.3 * 1.0 + 0.5 * math.log(2))
    # no replayed image in the batch: the CE of the new ones only (no division by zero)
    only_new = DERpp(DERppArgs(alpha=0.3, beta=0.5)).loss(None, torch.tensor([1, 0]), Outputs(z, None), None, ctx,
                                                          torch.zeros(2, 3))
    assert only_new.item() == pytest.approx(math.log(2))


def test_derpp_cross_entropy_over_the_seen_outputs_or_all_of_them_by_hand():
    # 4 outputs, 2 seen, all logits 0: over the seen outputs CE = log 2, over all 4 (the authors'
    # code, which also pushes down the classes to come) CE = log 4. The replayed image's stored
    # logits (1, -1, 0, 0): MSE over all outputs either way, (1 + 1) / 4 = 0.5.
    ctx = TaskContext(t=1, n_old=1, n_seen=2, num_classes=4, model=None, memory=None, criterion=None,
                      device=torch.device("cpu"), generator=None, train_cfg=None, data=None, features=None,
                      normalize=None, train=None, new_model=None, log=print)
    z, y = torch.zeros(2, 4), torch.tensor([1, 0])
    stored = torch.tensor([[0.0, 0, 0, 0, 0], [1.0, 1, -1, 0, 0]])
    seen = DERpp(DERppArgs(alpha=0.3, beta=0.5)).loss(None, y, Outputs(z, None), None, ctx, stored)
    assert seen.item() == pytest.approx(math.log(2) + 0.3 * 0.5 + 0.5 * math.log(2))
    every = DERpp(DERppArgs(alpha=0.3, beta=0.5, ce_outputs="all")).loss(None, y, Outputs(z, None), None, ctx, stored)
    assert every.item() == pytest.approx(math.log(4) + 0.3 * 0.5 + 0.5 * math.log(4))


def test_derpp_stored_logits_follow_the_exemplars_and_reach_the_loss(monkeypatch, tmp_path):
    batches = []
    real_loss = DERpp.loss

    def spy_loss(self, x, y, out, old, ctx, stored=None):
        batches.append((ctx.t, y.cpu(), stored.cpu()))  # the checkpoints it is compared with are on the CPU
        return real_loss(self, x, y, out, old, ctx, stored)

    monkeypatch.setattr(DERpp, "loss", spy_loss)
    out = tmp_path / "derpp"
    experiment.run(build_config("derpp", B0), out, progress=False)
    for t in range(1, 2):
        before, after = _ckpt(out, t), _ckpt(out, t + 1)
        for c, imgs in after["memory"]["per_class"].items():
            logits = after["method"]["logits"][c]
            assert len(logits) == len(imgs)
            if c in before["memory"]["per_class"]:  # an old class, cut to its first m: so are its logits
                m = len(imgs)
                assert torch.equal(imgs, before["memory"]["per_class"][c][:m])
                assert torch.equal(logits, before["method"]["logits"][c][:m])
    # in training, a replayed image's row is [1, stored logits of its class], a new one's all zero
    stored_by_task = {1: _ckpt(out, 1)["method"]["logits"]}
    for t, y, stored in batches:
        replay = stored[:, 0] == 1
        assert torch.equal(replay, y < 5 * t)
        assert not stored[~replay].any()
        for yi, row in zip(y[replay].tolist(), stored[replay]):
            assert any(torch.equal(row[1:], s) for s in stored_by_task[t][yi])


def test_derpp_stores_training_mode_logits_and_leaves_batchnorm_as_trained():
    """store_logits=train: with every new exemplar in one batch, the stored logits are the network's
    training-mode output on all of them together (BatchNorm's batch statistics do not depend on the
    order), computed here on a copy; the running statistics are those before; eval mode differs."""
    import copy

    from cilab.memory import ExemplarMemory

    class BNNet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten())
            self.head = torch.nn.Linear(4 * 4 * 4, 6)

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    model = BNNet()
    with torch.no_grad():
        model.body[1].running_mean.fill_(3.0)  # running statistics far from any batch's, as after a short training
    g = torch.Generator().manual_seed(1)
    imgs = {4: torch.randint(0, 256, (3, 3, 6, 6), dtype=torch.uint8, generator=g),
            5: torch.randint(0, 256, (5, 3, 6, 6), dtype=torch.uint8, generator=g)}
    memory = ExemplarMemory(100)
    memory.per_class = dict(imgs)
    normalize = lambda x: (x.float() - 128) / 64  # noqa: E731
    reference = copy.deepcopy(model).train()
    expected = reference(normalize(torch.cat([imgs[4], imgs[5]]))).detach()
    before = {n: b.clone() for n, b in model.named_buffers()}

    def ctx_for(m):
        return TaskContext(t=2, n_old=4, n_seen=6, num_classes=6, model=m, memory=memory, criterion=None,
                           device=torch.device("cpu"), generator=None,
                           train_cfg=build_config("derpp", ["train.batch_size=32"]).train, data=None,
                           features=lambda x: m.eval().body(normalize(x)), normalize=normalize, train=None,
                           new_model=None, log=print)

    method = DERpp(DERppArgs())
    model.eval()
    method.after_memory(ctx_for(model))
    assert torch.allclose(method.logits[4], expected[:3], atol=1e-6)
    assert torch.allclose(method.logits[5], expected[3:], atol=1e-6)
    for n, b in model.named_buffers():
        assert torch.equal(b, before[n]), n
    assert not model.training  # left as it was (ctx.features leaves it in eval mode too)
    with torch.no_grad():
        eval_logits = model.eval()(normalize(imgs[4]))
    assert not torch.allclose(method.logits[4], eval_logits, atol=1e-3)  # the old behaviour stored these
    old = DERpp(DERppArgs(store_logits="eval"))
    old.after_memory(ctx_for(model))
    assert torch.allclose(old.logits[4], eval_logits, atol=1e-6)

    # batches of 4: the exemplars interleaved by their rank in their class, class 4's (a0 a1 a2)
    # and class 5's (b0..b4) as a0 b0 a1 b1 | a2 b2 b3 b4, each batch on its own statistics
    a, b = normalize(imgs[4]), normalize(imgs[5])
    first = reference(torch.stack([a[0], b[0], a[1], b[1]])).detach()
    second = reference(torch.stack([a[2], b[2], b[3], b[4]])).detach()
    small = DERpp(DERppArgs())
    ctx = ctx_for(model)
    ctx.train_cfg = build_config("derpp", ["train.batch_size=4"]).train
    small.after_memory(ctx)
    assert torch.allclose(small.logits[4], torch.stack([first[0], first[2], second[0]]), atol=1e-6)
    assert torch.allclose(small.logits[5], torch.stack([first[1], first[3], second[1], second[2], second[3]]),
                          atol=1e-6)


def test_derpp_after_one_epoch_a_task_trains_on_with_training_mode_logits_and_diverges_with_eval_mode(tmp_path):
    """Digits, 1 epoch a task: BatchNorm's running statistics lag, eval-mode logits of the exemplars
    reach ~6e5 while the network's training logits stay below ~70, and the MSE to them blew up to
    NaN in task 3 (seeds 0 and 1). The paper's training-mode logits keep the run finite."""
    from cilab.trainer import NonFiniteLossError

    short = ["data.name=digits", "scenario.num_tasks=5", "model.name=resnet20", "train.epochs=1",
             "train.milestones=[]", "train.batch_size=64", "memory.size=40"]
    m = experiment.run(build_config("derpp", short), tmp_path / "train", progress=False)
    assert m["status"] == "complete" and len(m["fc"]["accuracy"]) == 5
    with pytest.raises(NonFiniteLossError):
        experiment.run(build_config("derpp", short + ["method_args.store_logits=eval"]), tmp_path / "eval",
                       progress=False)


# -- every method: B0 / B50 runs and exact resume ----------------------------------------------


@pytest.mark.parametrize("method", ["bic", "der", "derpp"])
def test_b50_run_resumes_exactly(method, tmp_path, monkeypatch):
    cfg = build_config(method, B50)
    whole, resumed = interrupted_and_resumed(cfg, tmp_path, monkeypatch)
    assert whole["classes_seen"] == [4, 7, 10] and whole["nme"]["accuracy"][0] > 40.0  # 4 digits are learnt
    for c in ("fc", "nme"):
        assert resumed[c]["accuracy"] == whole[c]["accuracy"], c
        assert resumed[c]["accuracy_matrix"] == whole[c]["accuracy_matrix"], c
    assert resumed["memory_total"] == whole["memory_total"]
    last_whole, last_cut = _ckpt(tmp_path / "whole", 3), _ckpt(tmp_path / "cut", 3)
    for k, v in last_whole["model"].items():
        assert torch.equal(v, last_cut["model"][k]), k


def test_presets_and_the_reproduce_group():
    from cilab.studyplan import load_groups

    runs = {(r["preset"], r.get("tag")): r["seeds"] for r in load_groups()["strong-baselines"]["runs"]}
    for name in ("bic", "der", "derpp"):
        assert runs[(name, None)] == [0, 1, 2]
    for name in ("bic", "der", "derpp"):
        cfg = build_config(name)
        assert (cfg.method, cfg.memory.size, cfg.train.lr, cfg.train.epochs) == (name, 2000, 0.1, 70)
