"""DeepInversion exemplars: every loss term against a direct computation, synthesis on a real teacher."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cilab.config import build_config
from cilab.memory import EXEMPLAR_BUILDERS, BuildContext
from cilab.memory.deepinversion import (BNStatsHook, DeepInversion, js_divergence, l2, make_student,
                                        total_variation)
from cilab.models import create_model

LN2 = math.log(2.0)


# -- loss terms against direct computations ------------------------------------------------


def test_bn_hooks_read_the_statistics_of_each_layers_input():
    torch.manual_seed(0)
    net = create_model(build_config(None, ["model.name=resnet20"]).model, 10)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:  # running statistics that differ from the defaults, so the distance is not trivial
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    net.double()
    hooks = [BNStatsHook(bn) for bn in bns]
    with torch.no_grad():
        out_hooked = net(x)
        for h in hooks:
            h.remove()
        # The BN inputs, by running the layers by hand, in execution order.
        inputs = []
        h = net.conv1(x)
        inputs.append(h)
        h = F.relu(net.bn1(h))
        for blk in net.layers:
            a = blk.conv1(h)
            inputs.append(a)
            inputs.append(blk.conv2(F.relu(blk.bn1(a))))
            h = blk(h)
        torch.testing.assert_close(net.head(h.mean(dim=(2, 3))), out_hooked)  # the hooks change nothing
    assert len(inputs) == len(hooks) == 19
    for hook, bn, a in zip(hooks, bns, inputs):
        n = a.shape[0] * a.shape[2] * a.shape[3]
        mean = a.sum(dim=(0, 2, 3)) / n
        var = ((a - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3)) / n  # biased
        torch.testing.assert_close(hook.mean, mean.float())
        torch.testing.assert_close(hook.var, var.float())
        want = (math.sqrt(((mean - bn.running_mean) ** 2).sum()) + math.sqrt(((var - bn.running_var) ** 2).sum()))
        assert hook.distance().item() == pytest.approx(want, rel=1e-5)


def test_feature_term_is_the_sum_over_all_bn_layers():
    torch.manual_seed(1)
    net = create_model(build_config(None, ["model.name=resnet20"]).model, 10).eval().requires_grad_(False)
    x = torch.randn(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    cfg = build_config(None, []).memory.deepinversion
    with DeepInversion(net, cfg, 10) as di:
        terms = di.terms(x, y)
        parts = sum(h.distance() for h in di.hooks)
        assert len(di.hooks) == 19
    torch.testing.assert_close(terms["feature"], parts)
    torch.testing.assert_close(terms["ce"], F.cross_entropy(net(x), y))
    want = (terms["ce"] + cfg.alpha_tv * terms["tv"] + cfg.alpha_l2 * terms["l2"] + cfg.alpha_f * terms["feature"])
    torch.testing.assert_close(terms["total"], want)
    assert not net.bn1._forward_hooks  # closing removed the hooks


def test_total_variation_and_l2_against_loops():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 5, 4, generator=g, dtype=torch.float64)
    tv, sq = 0.0, 0.0
    for b in range(3):
        for c in range(3):
            for i in range(5):
                for j in range(4):
                    if i + 1 < 5:
                        tv += abs(x[b, c, i + 1, j] - x[b, c, i, j]).item()
                    if j + 1 < 4:
                        tv += abs(x[b, c, i, j + 1] - x[b, c, i, j]).item()
                    sq += x[b, c, i, j].item() ** 2
    assert total_variation(x).item() == pytest.approx(tv / 3, rel=1e-12)
    assert l2(x).item() == pytest.approx(sq / 3, rel=1e-12)
    assert total_variation(torch.full((2, 3, 8, 8), 0.7)).item() == 0.0  # flat images have no variation


def test_js_divergence_properties_and_reference():
    from scipy.spatial.distance import jensenshannon  # sqrt(JS), natural log

    g = torch.Generator().manual_seed(0)
    a, b = 3 * torch.randn(50, 7, generator=g), 3 * torch.randn(50, 7, generator=g)
    js = js_divergence(a, b)
    assert js.shape == (50,)
    torch.testing.assert_close(js, js_divergence(b, a))  # symmetric
    assert (js >= 0).all() and (js <= LN2).all()
    ref = torch.tensor([jensenshannon(p, q) ** 2 for p, q in zip(a.softmax(1).double().numpy(),
                                                                  b.softmax(1).double().numpy())])
    torch.testing.assert_close(js.double(), ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(js_divergence(a, a), torch.zeros(50), atol=1e-6, rtol=0)  # equal: 0
    torch.testing.assert_close(js_divergence(a, a + 5.0), torch.zeros(50), atol=1e-6, rtol=0)  # same softmax
    # disjoint one-hot distributions: ln 2, exactly from log-probabilities, closely from logits
    onehot = torch.eye(4)
    assert js_divergence(onehot[:2].log(), onehot[2:].log()).tolist() == pytest.approx([LN2, LN2], abs=1e-6)
    assert js_divergence(60 * onehot[:2], 60 * onehot[2:]).tolist() == pytest.approx([LN2, LN2], abs=1e-6)


def test_student_is_fresh_seeded_and_frozen():
    teacher = create_model(build_config(None, ["model.name=resnet20"]).model, 10).eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s1 = make_student(teacher, torch.Generator().manual_seed(3))
    s2 = make_student(teacher, torch.Generator().manual_seed(3))
    s3 = make_student(teacher, torch.Generator().manual_seed(4))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])  # the teacher is untouched
    sd1, sd2, sd3 = s1.state_dict(), s2.state_dict(), s3.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not torch.equal(sd1["conv1.weight"], sd3["conv1.weight"])
    assert not torch.equal(sd1["conv1.weight"], before["conv1.weight"])
    assert not torch.equal(sd1["head.weight"], before["head.weight"])
    assert not s1.training and not any(p.requires_grad for p in s1.parameters())
    std = sd1["layers.0.conv1.weight"].std().item()  # Kaiming fan-out: sqrt(2 / (16 * 9))
    assert std == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.1)


# -- synthesis on a teacher trained on digits ----------------------------------------------


class TinyNet(nn.Module):
    """A small BN network, so the teacher trains in seconds on 2 CPU cores."""

    def __init__(self, n: int = 10):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, 1, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        )
        self.head = nn.Linear(32, n)

    def features(self, x):
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x):
        return self.head(self.features(x))


@pytest.fixture(scope="module")
def digits_teacher():
    from cilab.data import load_dataset
    from cilab.data.loader import Normalizer

    data = load_dataset(build_config(None, ["data.name=digits"]).data)
    norm = Normalizer(*data.mean_std())
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = norm(data.x_train), data.y_train
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 32):
            idx = perm[i: i + 32]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    acc = (net(norm(data.x_test)).argmax(1) == data.y_test).float().mean().item()
    assert acc > 0.5, acc  # a teacher that learnt something
    return net, norm, data


def make_ctx(teacher, seed, overrides, log=None):
    net, norm, _ = teacher
    cfg = build_config(None, ["memory.kind=deepinversion", *overrides])
    return BuildContext(cfg=cfg.memory, model=net,
                        features=lambda x: F.normalize(net.features(norm(x)), dim=1),
                        normalizer=norm, generator=torch.Generator().manual_seed(seed), num_classes=10,
                        log=log or (lambda msg: None))


def class_images(teacher, classes):
    _, _, data = teacher
    return {c: data.x_train[data.y_train == c] for c in classes}


def test_fifty_iterations_lower_every_loss_and_the_total(digits_teacher):
    net, norm, _ = digits_teacher
    cfg = build_config(None, ["memory.deepinversion.adaptive=true"]).memory.deepinversion
    y = torch.arange(3).repeat(6)
    x0 = torch.randn(18, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lo, hi = norm.shift, 255 * norm.scale + norm.shift
    x0 = torch.minimum(torch.maximum(x0, lo), hi)
    with DeepInversion(net, cfg, 3, make_student(net, torch.Generator().manual_seed(0))) as di:
        start = {k: v.item() for k, v in di.terms(x0, y).items()}
        # only the seen outputs 0..2 compete (those of later classes are untrained in the protocol)
        assert start["ce"] == pytest.approx(F.cross_entropy(net(x0)[:, :3], y).item(), rel=1e-5)
        x = di.optimise(x0, y, 50, lo, hi)
        end = {k: v.item() for k, v in di.terms(x, y).items()}
    assert set(start) == {"ce", "tv", "l2", "feature", "competition", "total"}
    assert end["total"] < 0.5 * start["total"], (start, end)
    assert end["ce"] < start["ce"] and end["feature"] < start["feature"] and end["tv"] < start["tv"]
    assert 1 - LN2 <= end["competition"] <= 1
    assert ((x >= lo - 1e-6) & (x <= hi + 1e-6)).all()  # clipped to what uint8 can hold


def test_synthesised_digits_are_recognised(digits_teacher):
    """Plain DeepInversion from noise, the study's weights: after 50 iterations (and the uint8
    conversion) the teacher sees the target class in at least 90% of the images of every class."""
    net, norm, _ = digits_teacher
    imgs = class_images(digits_teacher, [7, 8, 9])
    over = ["memory.deepinversion.init=noise", "memory.deepinversion.adaptive=false",
            "memory.deepinversion.iterations=50"]
    logs = []
    got = EXEMPLAR_BUILDERS["deepinversion"](make_ctx(digits_teacher, 7, over, logs.append), imgs, 8)
    assert sorted(got) == [7, 8, 9]
    for c, x in got.items():
        assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32)
        pred = net(norm(x)).argmax(1)
        assert (pred == c).float().mean().item() >= 0.9, (c, pred)
        assert len({bytes(im.numpy()) for im in x}) == 8  # the images of a class differ
    assert len(logs) == 1 and "deepinversion: 24 images of 3 classes" in logs[0] and "s;" in logs[0]


def test_same_seed_same_images(digits_teacher):
    """Noise, image order and the adaptive student all come from ctx.generator."""
    imgs = class_images(digits_teacher, [0, 1])
    over = ["memory.deepinversion.init=noise", "memory.deepinversion.adaptive=true",
            "memory.deepinversion.iterations=5"]
    a = EXEMPLAR_BUILDERS["deepinversion"](make_ctx(digits_teacher, 3, over), imgs, 4)
    b = EXEMPLAR_BUILDERS["deepinversion"](make_ctx(digits_teacher, 3, over), imgs, 4)
    c = EXEMPLAR_BUILDERS["deepinversion"](make_ctx(digits_teacher, 4, over), imgs, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(torch.equal(a[k], c[k]) for k in a)


def test_herding_start_in_chunks_keeps_the_herding_order(digits_teacher):
    """With a negligible step the images stay their start: the herding exemplars, in herding
    order, although the classes were interleaved and cut into chunks of 5."""
    imgs = class_images(digits_teacher, [0, 1, 2])
    over = ["memory.deepinversion.init=herding", "memory.deepinversion.lr=1.0e-9", "memory.deepinversion.iterations=2",
            "memory.deepinversion.batch_size=5", "memory.selection=herding"]
    got = EXEMPLAR_BUILDERS["deepinversion"](make_ctx(digits_teacher, 0, over), imgs, 6)
    want = EXEMPLAR_BUILDERS["real"](make_ctx(digits_teacher, 0, over), imgs, 6)
    assert all(torch.equal(got[c], want[c]) for c in imgs)


def test_random_start_uses_distinct_training_images_of_the_class(digits_teacher):
    imgs = class_images(digits_teacher, [3, 7])
    over = ["memory.deepinversion.init=random", "memory.deepinversion.lr=1.0e-9", "memory.deepinversion.iterations=1"]
    got = EXEMPLAR_BUILDERS["deepinversion"](make_ctx(digits_teacher, 0, over), imgs, 5)
    for c, x in got.items():
        assert x.shape == (5, 3, 32, 32)
        match = (x[:, None] == imgs[c][None]).flatten(2).all(2)  # 5 x N: equal to which training image
        assert match.any(1).all()
        assert len({int(i) for i in match.float().argmax(1)}) == 5  # without replacement


# -- presets and a whole run ----------------------------------------------------------------


@pytest.mark.parametrize("init,adaptive", [("noise", True), ("random", False), ("herding", False)])
def test_presets(init, adaptive):
    cfg = build_config(f"icarl-di-{init}")
    assert cfg.method == "icarl" and cfg.memory.kind == "deepinversion" and cfg.memory.size == 2000
    assert cfg.memory.deepinversion.init == init and cfg.memory.deepinversion.adaptive is adaptive


def test_end_to_end_deepinversion_run_on_digits(tmp_path):
    from cilab.experiment import run

    cfg = build_config("icarl-di-noise", ["data.name=digits", "scenario.num_tasks=5", "train.epochs=1",
                                          "train.milestones=[]", "train.batch_size=64", "model.name=resnet20",
                                          "memory.size=20", "memory.deepinversion.iterations=5"])
    logs = []
    metrics = run(cfg, tmp_path / "run", progress=False, log=logs.append)
    assert metrics["status"] == "complete" and len(metrics["nme"]["accuracy"]) == 5
    assert sum("deepinversion:" in line for line in logs) == 5  # one synthesis per task, timed
    ck = torch.load(tmp_path / "run/checkpoints/task_05.pt", weights_only=False)
    per_class = ck["memory"]["per_class"]
    assert sorted(per_class) == list(range(10))
    assert all(x.dtype == torch.uint8 and x.shape == (2, 3, 32, 32) for x in per_class.values())
