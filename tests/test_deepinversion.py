"""DeepInversion exemplars: every loss term against hand-worked values, synthesis on a real teacher."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cilab.config import ConfigError, build_config
from cilab.memory import EXEMPLAR_BUILDERS, BuildContext
from cilab.memory.deepinversion import (BNStatsHook, DeepInversion, chunks, competition, l2, make_student,
                                        total_variation)
from cilab.models import create_model

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


def test_total_variation_hand_value():
    """Yin et al.'s R_TV: the L2 norms of the right, down, diagonal and anti-diagonal difference maps,
    each over the whole batch, summed (not squared, not averaged over the images)."""
    img = torch.tensor([[0.0, 1.0], [3.0, 5.0]])
    # right: 0-1, 3-5 -> sqrt(1 + 4); down: 0-3, 1-5 -> 5; diagonal: 0-5 -> 5; anti-diagonal: 3-1 -> 2
    one = math.sqrt(5) + 5 + 5 + 2
    assert total_variation(img[None, None]).item() == pytest.approx(one, rel=1e-6)
    # two copies: every map has twice the squares, each norm grows by sqrt(2) (a mean would stay, a sum double)
    assert total_variation(img.expand(2, 1, 2, 2)).item() == pytest.approx(math.sqrt(2) * one, rel=1e-6)
    # a second, flat channel adds zero differences; a flat image has no variation at all
    assert total_variation(torch.stack([img, torch.full((2, 2), 7.0)])[None]).item() == pytest.approx(one, rel=1e-6)
    assert total_variation(torch.full((2, 3, 8, 8), 0.7)).item() == 0.0
    # 1 x 3 image [0, 2, 6] (one row): right diffs -2, -4 -> sqrt(20); no down or diagonal neighbours
    assert total_variation(torch.tensor([[[[0.0, 2.0, 6.0]]]])).item() == pytest.approx(math.sqrt(20), rel=1e-6)


def test_l2_hand_value():
    img = torch.tensor([[0.0, 1.0], [3.0, 5.0]])  # 0 + 1 + 9 + 25 = 35
    assert l2(img[None, None]).item() == pytest.approx(math.sqrt(35), rel=1e-6)
    assert l2(img.expand(2, 1, 2, 2)).item() == pytest.approx(math.sqrt(70), rel=1e-6)  # the norm of the batch


def _kl(a, b):
    return sum(ai * math.log(ai / bi) for ai, bi in zip(a, b))


def test_competition_hand_values():
    """R_A = 1 - clamp(JS, 0, 1), JS = batch mean of 1/2 KL(M||P) + 1/2 KL(M||Q) on softmax(z/3),
    P, Q and M clamped to [0.01, 0.99] (Yin et al.'s code, the study's generator)."""
    # row 0: student uniform; teacher logits 3 ln 8, 0, 0 -> softmax(z/3) = 0.8, 0.1, 0.1 (no clamp)
    # row 1: teacher logits 3 ln 198, 0, 0 -> 0.99, 0.005, 0.005; M is taken before the clamp,
    #        then Q is clamped to 0.99, 0.01, 0.01
    z_s = torch.zeros(2, 3)
    z_t = torch.tensor([[3 * math.log(8), 0.0, 0.0], [3 * math.log(198), 0.0, 0.0]])
    p = [1 / 3, 1 / 3, 1 / 3]
    q0, m0 = [0.8, 0.1, 0.1], [(1 / 3 + 0.8) / 2, (1 / 3 + 0.1) / 2, (1 / 3 + 0.1) / 2]
    q1, m1 = [0.99, 0.01, 0.01], [(1 / 3 + 0.99) / 2, (1 / 3 + 0.005) / 2, (1 / 3 + 0.005) / 2]
    js = 0.5 * (0.5 * _kl(m0, p) + 0.5 * _kl(m0, q0)) + 0.5 * (0.5 * _kl(m1, p) + 0.5 * _kl(m1, q1))
    r_a, got_js = competition(z_t, z_s)
    assert got_js.item() == pytest.approx(js, rel=1e-5)
    assert r_a.item() == pytest.approx(1 - js, rel=1e-6)
    # equal distributions: JS 0, R_A 1 (the maximum: minimising R_A seeks disagreement)
    same = competition(z_t, z_t.clone())
    assert same[1].item() == pytest.approx(0.0, abs=1e-7) and same[0].item() == pytest.approx(1.0, abs=1e-7)
    # confident disagreement over 10 classes: P = (0.99, 0.01, ...), Q = (0.01, 0.99, 0.01, ...),
    # M = (0.5, 0.5, 0.01 x 8) after the clamp: JS = 1/2 ln(0.5/0.99) + 1/2 ln(0.5/0.01) > 1, R_A = 0
    z_a, z_b = 60 * torch.eye(10)[:1], 60 * torch.eye(10)[1:2]
    r_a, got_js = competition(z_a, z_b)
    assert got_js.item() == pytest.approx(0.5 * math.log(0.5 / 0.99) + 0.5 * math.log(50), rel=1e-4)
    assert r_a.item() == 0.0
    # the temperature divides the logits: T = 1 on z equals T = 3 on 3 z
    assert competition(z_t, z_s, temperature=1.0)[1].item() == pytest.approx(
        competition(3 * z_t, 3 * z_s)[1].item(), rel=1e-6)


def test_competition_in_the_papers_form_is_the_unclamped_jensen_shannon_divergence():
    """memory.deepinversion.js=paper: JS = batch mean of 1/2 KL(P||M) + 1/2 KL(Q||M), no clamp; R_A = 1 - JS."""
    # student uniform; teacher softmax(z/3) = 0.8, 0.1, 0.1 and 0.99, 0.005, 0.005 (no clamp now)
    z_s = torch.zeros(2, 3)
    z_t = torch.tensor([[3 * math.log(8), 0.0, 0.0], [3 * math.log(198), 0.0, 0.0]])
    p = [1 / 3, 1 / 3, 1 / 3]
    js = 0.0
    for q in ([0.8, 0.1, 0.1], [0.99, 0.005, 0.005]):
        m = [(a + b) / 2 for a, b in zip(p, q)]
        js += 0.5 * (0.5 * _kl(p, m) + 0.5 * _kl(q, m))
    r_a, got_js = competition(z_t, z_s, form="paper")
    assert got_js.item() == pytest.approx(js, rel=1e-5) and r_a.item() == pytest.approx(1 - js, rel=1e-6)
    assert got_js.item() != pytest.approx(competition(z_t, z_s)[1].item(), rel=1e-2)  # the code's form differs
    # confident disagreement over 10 classes: ln 2, the divergence's maximum, where the code's form gives R_A = 0
    z_a, z_b = 60 * torch.eye(10)[:1], 60 * torch.eye(10)[1:2]
    r_a, got_js = competition(z_a, z_b, form="paper")
    assert got_js.item() == pytest.approx(math.log(2), rel=1e-5) and r_a.item() == pytest.approx(1 - math.log(2))
    assert competition(z_a, z_b)[0].item() == 0.0


def test_the_competition_form_is_a_checked_setting_that_reaches_the_loss(digits_teacher):
    from cilab.config import ConfigError

    with pytest.raises(ConfigError, match="'memory.deepinversion.js' is 'exact', which is not one of: code, paper"):
        build_config("icarl-di-noise", ["memory.deepinversion.js=exact"])
    net, norm, _ = digits_teacher
    y = torch.arange(3).repeat(4)
    x0, _, _ = noise_start(norm, 12, 0)
    got = {}
    for form in ("code", "paper"):
        cfg = build_config("icarl-di-noise", [f"memory.deepinversion.js={form}"]).memory.deepinversion
        assert cfg.adaptive  # the study's adaptive generator (noise starts)
        student = make_student(net, torch.Generator().manual_seed(0))
        with DeepInversion(net, cfg, 3, student) as di:
            got[form] = di.terms(x0, y)["js"].item()
        expected = competition(net(x0)[:, :3], student(x0)[:, :3], form=form)[1].item()
        assert got[form] == pytest.approx(expected, rel=1e-5), form
    assert got["code"] != pytest.approx(got["paper"], rel=1e-3)


def test_student_is_a_fresh_seeded_frozen_network_in_training_mode():
    """The study's student: "another ResNet32 (randomly initialized)", used with BatchNorm on the
    batch's statistics. A fresh ResNet-32 in eval mode (running statistics 0 / 1) predicts one class
    for every image with near certainty, which made the competition term fight the cross-entropy."""
    from cilab.data import load_dataset
    from cilab.data.loader import Normalizer

    teacher = create_model(build_config(None, []).model, 10).eval()  # resnet32, the study's network
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    s1 = make_student(teacher, torch.Generator().manual_seed(3))
    s2 = make_student(teacher, torch.Generator().manual_seed(3))
    s3 = make_student(teacher, torch.Generator().manual_seed(4))
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k])  # the teacher is untouched
    assert teacher.training is False
    sd1, sd2, sd3 = s1.state_dict(), s2.state_dict(), s3.state_dict()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert not torch.equal(sd1["conv1.weight"], sd3["conv1.weight"])
    assert not torch.equal(sd1["conv1.weight"], before["conv1.weight"])
    assert not torch.equal(sd1["head.weight"], before["head.weight"])
    std = sd1["layers.0.conv1.weight"].std().item()  # Kaiming fan-out: sqrt(2 / (16 * 9))
    assert std == pytest.approx(math.sqrt(2 / (16 * 9)), rel=0.1)
    assert not any(p.requires_grad for p in s1.parameters())

    data = load_dataset(build_config(None, ["data.name=digits"]).data)
    x = Normalizer(*data.mean_std())(data.x_test[:48])
    with torch.no_grad():
        z = s1(x)
        # training mode: an image's output depends on the batch it is in (BatchNorm on batch statistics)
        assert not torch.allclose(s1(x[:8]), z[:8], atol=1e-4)
    for k, v in s1.state_dict().items():  # and the forwards left its running statistics alone
        assert torch.equal(v, sd1[k]), k
    pmax = (z / 3).softmax(1).max(1).values  # the temperature of the competition term
    assert pmax.mean().item() < 0.5, pmax.mean()  # not one class with certainty (eval mode: ~0.9-1.0)


class Recorder(nn.Module):
    """A BatchNorm network (DeepInversion needs one) that keeps a copy of every input it sees."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.head = nn.Linear(3, 4)
        self.seen: list[torch.Tensor] = []

    def forward(self, x):
        self.seen.append(x.detach().clone())
        return self.head(self.bn(x).mean(dim=(2, 3)))


def _offsets(seen, x0, jitter):
    """The (dy, dx) by which each seen input is x0 rolled (x0's pixels are distinct, so it is unique)."""
    out = []
    for s in seen:
        hits = [(dy, dx) for dy in range(-jitter, jitter + 1) for dx in range(-jitter, jitter + 1)
                if torch.allclose(torch.roll(x0, shifts=(dy, dx), dims=(2, 3)), s, atol=1e-5, rtol=0)]
        assert len(hits) == 1, hits  # every input is x0 shifted by at most `jitter` pixels, and only one way
        out.append(hits[0])
    return out


def test_each_step_sees_the_images_rolled_by_a_seeded_jitter():
    net = Recorder().eval().requires_grad_(False)
    x0 = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1])
    lo, hi = torch.full((1, 3, 1, 1), -100.0), torch.full((1, 3, 1, 1), 100.0)

    def run(seed, jitter):
        cfg = build_config(None, ["memory.deepinversion.lr=1.0e-9", f"memory.deepinversion.jitter={jitter}"])
        net.seen.clear()
        with DeepInversion(net, cfg.memory.deepinversion, 4) as di:
            di.optimise(x0, y, 40, lo, hi, torch.Generator().manual_seed(seed))
        assert len(net.seen) == 40  # one forward per step
        return _offsets(net.seen, x0, 2)

    a, b, c = run(0, 2), run(0, 2), run(1, 2)
    assert a == b and a != c  # from the run's generator: seeded
    assert {dy for dy, _ in a} == {-2, -1, 0, 1, 2} and {dx for _, dx in a} == {-2, -1, 0, 1, 2}
    assert set(run(0, 1)) <= {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}
    assert set(run(0, 0)) == {(0, 0)}  # jitter 0: the images as they are


def test_chunks_are_a_fixed_size_not_the_free_memory():
    # the study: 2000, 1000 and 660 images (K = 2000, tasks 1-3) in 3, 2 and 1 chunks
    assert chunks(2000, 667) == (3, 667)
    assert chunks(1000, 667) == (2, 500)
    assert chunks(660, 667) == (1, 660)
    assert chunks(10, 4) == (3, 4)
    assert build_config(None, []).memory.deepinversion.batch_size == 667
    with pytest.raises(ConfigError, match="memory.deepinversion.batch_size"):
        build_config(None, ["memory.deepinversion.batch_size=0"])
    with pytest.raises(ConfigError, match="memory.deepinversion.jitter"):
        build_config(None, ["memory.deepinversion.jitter=-1"])


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
    """A TinyNet trained on digits until it recognises every class's real TEST images (>= 80% each):
    only of such a teacher can we ask that it recognise what it dreamt."""
    from cilab.data import load_dataset
    from cilab.data.loader import Normalizer

    data = load_dataset(build_config(None, ["data.name=digits"]).data)
    norm = Normalizer(*data.mean_std())
    torch.manual_seed(0)
    net = TinyNet()
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    x, y = norm(data.x_train), data.y_train
    g = torch.Generator().manual_seed(0)
    for epoch in range(6):  # batches of 32: ~250 steps (at batch 128 the digits tasks are too short)
        for group in opt.param_groups:  # a lower rate for the last two epochs settles the weights
            group["lr"] = 0.01 if epoch < 4 else 0.002
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 32):
            idx = perm[i: i + 32]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval().requires_grad_(False)
    pred = net(norm(data.x_test)).argmax(1)
    per_class = [(pred[data.y_test == c] == c).float().mean().item() for c in range(10)]
    assert min(per_class) >= 0.8, per_class
    return net, norm, data


def make_ctx(teacher, seed, overrides, log=None, preset=None):
    net, norm, _ = teacher
    cfg = build_config(preset, ["memory.kind=deepinversion", *overrides])
    return BuildContext(cfg=cfg.memory, model=net,
                        features=lambda x: F.normalize(net.features(norm(x)), dim=1),
                        normalizer=norm, generator=torch.Generator().manual_seed(seed), num_classes=10,
                        log=log or (lambda msg: None))


def class_images(teacher, classes):
    _, _, data = teacher
    return {c: data.x_train[data.y_train == c] for c in classes}


def noise_start(norm, n, seed):
    lo, hi = norm.shift, 255 * norm.scale + norm.shift
    x0 = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return torch.minimum(torch.maximum(x0, lo), hi), lo, hi


def test_fifty_iterations_lower_every_loss_and_the_total(digits_teacher):
    net, norm, _ = digits_teacher
    cfg = build_config("icarl-di-noise").memory.deepinversion
    y = torch.arange(3).repeat(6)
    x0, lo, hi = noise_start(norm, 18, 0)
    with DeepInversion(net, cfg, 3, make_student(net, torch.Generator().manual_seed(0))) as di:
        start = {k: v.item() for k, v in di.terms(x0, y).items()}
        # only the seen outputs 0..2 compete (those of later classes are untrained in the protocol)
        assert start["ce"] == pytest.approx(F.cross_entropy(net(x0)[:, :3], y).item(), rel=1e-5)
        x = di.optimise(x0, y, 50, lo, hi, torch.Generator().manual_seed(0))
        end = {k: v.item() for k, v in di.terms(x, y).items()}
    assert set(start) == {"ce", "tv", "l2", "feature", "competition", "js", "total"}
    # from chance (ln 3 ~ 1.1 or worse) to each image its class at p > 0.9 (geometric mean); it reached
    # 0.002 on a CPU and 0.016 on an H100, whose teacher trained in bf16
    assert end["total"] < start["total"] and end["ce"] < 0.1 < 1.0 < start["ce"], (start, end)
    assert end["feature"] < start["feature"] and end["tv"] < start["tv"] and end["l2"] < start["l2"], (start, end)
    assert end["competition"] < start["competition"], (start, end)  # the images found disagreement
    assert ((x >= lo - 1e-6) & (x <= hi + 1e-6)).all()  # clipped to what uint8 can hold


def test_competition_gradient_does_not_exceed_the_cross_entropys_at_the_start(digits_teacher):
    """From the noise start of all ten classes, with the preset's alpha_c = 10, the competition
    term's pull on the images is smaller than the cross-entropy's: it may diversify, not overrule.
    (A guard: on this small teacher the old eval-mode student passed it too; what broke item 1 is
    pinned by the student test, on the ResNet-32 the study uses.)"""
    net, norm, _ = digits_teacher
    cfg = build_config("icarl-di-noise").memory.deepinversion
    y = torch.arange(10).repeat(8)
    for seed in range(3):
        x0, _, _ = noise_start(norm, 80, seed)
        x0.requires_grad_(True)
        with DeepInversion(net, cfg, 10, make_student(net, torch.Generator().manual_seed(seed))) as di:
            t = di.terms(x0, y)
            g_ce, = torch.autograd.grad(t["ce"], x0, retain_graph=True)
            g_c, = torch.autograd.grad(cfg.alpha_c * t["competition"], x0)
        assert g_c.norm() <= g_ce.norm(), (seed, g_c.norm(), g_ce.norm())


def test_adaptive_synthesised_digits_are_recognised(digits_teacher):
    """Adaptive DeepInversion from noise as the icarl-di-noise preset runs it (weights, jitter, student),
    fewer iterations: the teacher sees the target class in at least 90% of the images of EVERY class."""
    net, norm, _ = digits_teacher
    imgs = class_images(digits_teacher, range(10))
    logs = []
    got = EXEMPLAR_BUILDERS["deepinversion"](
        make_ctx(digits_teacher, 7, ["memory.deepinversion.iterations=50"], logs.append, "icarl-di-noise"), imgs, 8)
    assert sorted(got) == list(range(10))
    for c, x in got.items():
        assert x.dtype == torch.uint8 and x.shape == (8, 3, 32, 32)
        pred = net(norm(x)).argmax(1)
        assert (pred == c).float().mean().item() >= 0.9, (c, pred)
        assert len({bytes(im.numpy()) for im in x}) == 8  # the images of a class differ
    assert len(logs) == 1 and "deepinversion: 80 images of 10 classes (init noise, adaptive" in logs[0]


def test_synthesised_digits_are_recognised(digits_teacher):
    """Plain DeepInversion from noise, the presets' weights: after 50 iterations (and the uint8
    conversion) the teacher sees the target class in at least 90% of the images of every class."""
    net, norm, _ = digits_teacher
    imgs = class_images(digits_teacher, [7, 8, 9])
    over = ["memory.deepinversion.init=noise", "memory.deepinversion.adaptive=false",
            "memory.deepinversion.iterations=50"]
    logs = []
    got = EXEMPLAR_BUILDERS["deepinversion"](make_ctx(digits_teacher, 7, over, logs.append, "icarl-di-noise"),
                                             imgs, 8)
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
    di = cfg.memory.deepinversion
    assert di.init == init and di.adaptive is adaptive
    # the weights the study's notebooks ran, not the text's (README: which and why)
    assert (di.alpha_tv, di.alpha_l2, di.alpha_f, di.alpha_c) == (2.0e-5, 3.0e-8, 1.0, 10.0)
    assert di.jitter == 2 and di.batch_size == 667
    default = build_config(None, []).memory.deepinversion  # the text's weights
    assert (default.alpha_tv, default.alpha_l2, default.alpha_f, default.alpha_c) == (2.5e-5, 1.0e-8, 5.0, 10.0)


def test_end_to_end_deepinversion_run_on_digits(tmp_path):
    from cilab.experiment import run

    cfg = build_config("icarl-di-noise", ["data.name=digits", "scenario.num_tasks=2", "train.epochs=1",
                                          "train.milestones=[]", "train.batch_size=64", "model.name=resnet20",
                                          "memory.size=20", "memory.deepinversion.iterations=5"])
    logs = []
    metrics = run(cfg, tmp_path / "run", progress=False, log=logs.append)
    assert metrics["status"] == "complete" and len(metrics["nme"]["accuracy"]) == 2
    assert sum("deepinversion:" in line for line in logs) == 2  # one synthesis per task, timed
    ck = torch.load(tmp_path / "run/checkpoints/task_02.pt", weights_only=False)
    per_class = ck["memory"]["per_class"]
    assert sorted(per_class) == list(range(10))
    assert all(x.dtype == torch.uint8 and x.shape == (2, 3, 32, 32) for x in per_class.values())
