"""The study's five loss pairs (issue 14, item 2) and the loss options (issue 20).

Every expected value is worked out by hand in the comments and written as a
closed form; none is computed with the functions under test. The logits are
chosen so that sigmoids and softmaxes are small fractions:

    sigmoid(0) = 1/2, sigmoid(ln 3) = 3/4, sigmoid(ln 2) = 2/3
    BCEWithLogits(x, t) = -t ln s - (1 - t) ln(1 - s), s = sigmoid(x), so
      x = 0:    ln 2             (any t)
      x = ln 3: ln 4 - t ln 3
      x = ln 2: ln 3 - t ln 2
"""

import math

import numpy as np
import pytest
import torch

from cilab.config import ConfigError, build_config
from cilab.losses import Criterion

L2, L3, L5, L7 = (math.log(v) for v in (2, 3, 5, 7))

# B = 2, O = 4 outputs, n_old = 2 (outputs 0, 1), new slice [2, 3), output 3 unseen.
N_OLD, N_SEEN = 2, 3
Z = torch.tensor([[0.0, 0.0, L3, 0.0],  # softmax: exp = 1, 1, 3, 1 -> /6
                  [L3, 0.0, 0.0, L2]])  # softmax: exp = 3, 1, 1, 2 -> /7
Z_OLD = torch.tensor([[L3, 0.0, 0.0, 0.0],  # softmax 3, 1, 1, 1 -> /6; sigmoid 3/4, 1/2, ...
                      [0.0, 0.0, 0.0, 0.0]])  # softmax 1/4 each; sigmoid 1/2 each
Y = torch.tensor([2, 0])  # a new-class image and an exemplar of old class 0
# The first task: n_old = 0, n_seen = 2 (outputs 2, 3 not seen yet).
Y_FIRST = torch.tensor([1, 0])


def terms(clf, dist, n_old=N_OLD, n_seen=N_SEEN, y=Y, **opts):
    crit = Criterion(clf, dist, n_old, n_seen, **opts)
    c, d = crit.terms(Z.clone(), y, Z_OLD.clone())
    total = crit(Z.clone(), y, Z_OLD.clone())
    torch.testing.assert_close(total, c + d)
    return c.item(), d.item()


def close(got, want):
    assert got == pytest.approx(want, rel=1e-5, abs=1e-7)


# ---------------------------------------------------------------- hand-worked values, later task


def test_bce_bce_is_icarls_single_mean_over_all_outputs():
    # targets: row 0 [3/4, 1/2 | 1 | 0], row 1 [1/2, 1/2 | 0 | 0]
    # classification, outputs [2, 4): row 0: (ln 4 - ln 3) + ln 2, row 1: ln 2 + ln 3 -> 4 ln 2, / (B*O = 8)
    # distillation, outputs [0, 2): row 0: ln 2 + ln 2, row 1: (ln 4 - ln 3 / 2) + ln 2, / 8
    c, d = terms("bce", "bce")
    close(c, 4 * L2 / 8)
    close(d, (5 * L2 - L3 / 2) / 8)


def test_ce_mse():
    # CE over all 4 outputs: row 0 -ln(3/6), row 1 -ln(3/7)
    # distillation: softmax over all 4, first 2 outputs, mean over B x n_old = 4:
    #   row 0: p = 1/6, 1/6; q = 3/6, 1/6 -> (1/3)^2, 0
    #   row 1: p = 3/7, 1/7; q = 1/4, 1/4 -> (5/28)^2, (3/28)^2
    c, d = terms("ce", "mse")
    close(c, (L2 + (L7 - L3)) / 2)
    close(d, (1 / 9 + 25 / 784 + 9 / 784) / 4)


def test_bce_mse():
    # BCE on the new slice [2, 3) only, mean over B x 1: row 0 x = ln 3, t = 1; row 1 x = 0
    # distillation: sigmoids of outputs [0, 2), mean over B x 2:
    #   row 0: 1/2 - 3/4, 1/2 - 1/2; row 1: 3/4 - 1/2, 1/2 - 1/2
    c, d = terms("bce", "mse")
    close(c, ((2 * L2 - L3) + L2) / 2)
    close(d, (1 / 16 + 1 / 16) / 4)


def test_mse_mse():
    # softmax over all 4 outputs, new slice [2, 3), mean over B x 1:
    #   row 0: (3/6 - 1)^2, row 1: (1/7 - 0)^2
    # distillation as in BCE-MSE (sigmoid)
    c, d = terms("mse", "mse")
    close(c, (1 / 4 + 1 / 49) / 2)
    close(d, 1 / 32)


def test_ce_bce_study_feeds_softmax_probabilities_as_logits():
    # BCEWithLogits(x = p, t = q) = ln(1 + e^p) - q p, p/q = softmax over all 4 (first 2 outputs)
    #   row 0: p = 1/6, 1/6; q = 1/2, 1/6
    #   row 1: p = 3/7, 1/7; q = 1/4, 1/4
    def sp(x):
        return math.log1p(math.exp(x))

    want = (sp(1 / 6) - 1 / 12 + sp(1 / 6) - 1 / 36 + sp(3 / 7) - 3 / 28 + sp(1 / 7) - 1 / 28) / 4
    c, d = terms("ce", "bce")
    close(c, (L2 + (L7 - L3)) / 2)
    close(d, want)
    assert terms("ce", "bce", ce_bce_input="softmax") == (c, d)  # the default is the study's


def test_ce_bce_logits_option_is_icarls_bce_on_logits():
    # BCEWithLogits(z[:, :2], sigmoid(z_old[:, :2])), mean over B x 2:
    #   row 0: x = 0, 0 -> ln 2, ln 2; row 1: x = ln 3, t = 1/2 -> ln 4 - ln 3 / 2; x = 0 -> ln 2
    c, d = terms("ce", "bce", ce_bce_input="logits")
    close(c, (L2 + (L7 - L3)) / 2)
    close(d, (5 * L2 - L3 / 2) / 4)


# ---------------------------------------------------------------- the first task


@pytest.mark.parametrize("pair, want", [
    # BCE over all 4 outputs, mean over 8: row 0 (y=1): ln2 + ln2 + ln4 + ln2; row 1 (y=0): (ln4 - ln3) + ln2 + ln2 + ln3
    (("bce", "bce"), 9 * L2 / 8),
    # CE over the first task's 2 outputs: row 0 logits 0, 0 -> ln 2; row 1 ln 3, 0 -> -ln(3/4)
    (("ce", "mse"), (L2 + 2 * L2 - L3) / 2),
    (("ce", "bce"), (L2 + 2 * L2 - L3) / 2),
    # BCE on outputs [0, 2), mean over B x 2: row 0 ln 2, ln 2; row 1 (ln 4 - ln 3), ln 2
    (("bce", "mse"), (5 * L2 - L3) / 4),
    # softmax over ALL 4 outputs, first 2, mean over B x 2: row 0 (1/6)^2 + (1/6 - 1)^2; row 1 (3/7 - 1)^2 + (1/7)^2
    (("mse", "mse"), (1 / 36 + 25 / 36 + 16 / 49 + 1 / 49) / 4),
])
def test_first_task_classification_only(pair, want):
    c, d = terms(*pair, n_old=0, n_seen=2, y=Y_FIRST)
    close(c, want)
    assert d == 0.0
    assert not Criterion(*pair, 0, 2).distills


@pytest.mark.parametrize("clf, want", [
    # fine-tuning / joint (the study): BCE over all 4 outputs at every task, mean over 8
    #   row 0 (y=2): ln2 + ln2 + (ln4 - ln3) + ln2; row 1 (y=0): (ln4 - ln3) + ln2 + ln2 + ln3
    ("bce", (9 * L2 - L3) / 8),
    # not in the study: the ce / mse first-task rule on the seen outputs [0, 3)
    #   CE over 3 outputs: row 0 exp 1, 1, 3 -> -ln(3/5); row 1 exp 3, 1, 1 -> -ln(3/5)
    ("ce", L5 - L3),
    #   softmax over all 4, first 3, mean over B x 3: row 0 (1/6)^2 * 2 + (1/2)^2; row 1 (3/7 - 1)^2 + (1/7)^2 * 2
    ("mse", (2 / 36 + 1 / 4 + 16 / 49 + 2 / 49) / 6),
])
def test_without_distillation_every_task_uses_the_first_task_rule(clf, want):
    c, d = terms(clf, "none")
    close(c, want)
    assert d == 0.0


# ---------------------------------------------------------------- loss.unseen_outputs (issue 20)


@pytest.mark.parametrize("pair, want", [
    # outputs cut to [0, 3): BCE-BCE normalised by B * n_seen = 6
    #   classification [2, 3): row 0 (ln 4 - ln 3), row 1 ln 2; distillation as above over [0, 2)
    (("bce", "bce"), (3 * L2 - L3, 5 * L2 - L3 / 2, 6)),
    # CE over 3 outputs (both rows -ln(3/5)); distillation softmax over 3:
    #   row 0 p = 1/5, 1/5; q = 3/5, 1/5; row 1 p = 3/5, 1/5; q = 1/3, 1/3
    (("ce", "mse"), (2 * (L5 - L3), 4 / 25 + 16 / 225 + 4 / 225, 2)),
    # BCE-MSE already stays inside [0, n_seen): unchanged
    (("bce", "mse"), ((3 * L2 - L3), 1 / 16 + 1 / 16, 2)),
    # softmax over 3, new slice: row 0 (3/5 - 1)^2, row 1 (1/5)^2
    (("mse", "mse"), (4 / 25 + 1 / 25, 1 / 16 + 1 / 16, 2)),
])
def test_unseen_outputs_ignore_computes_the_loss_on_the_seen_outputs(pair, want):
    c_sum, d_sum, norm = want
    c, d = terms(*pair, unseen_outputs="ignore")
    close(c, c_sum / norm)
    close(d, d_sum / (norm if pair == ("bce", "bce") else 4))


def test_unseen_outputs_ignore_on_the_first_task():
    # BCE-BCE on outputs [0, 2), mean over B x 2: row 0 ln 2, ln 2; row 1 (ln 4 - ln 3), ln 2
    c, _ = terms("bce", "bce", n_old=0, n_seen=2, y=Y_FIRST, unseen_outputs="ignore")
    close(c, (5 * L2 - L3) / 4)


def _logit_grad(crit, y=Y):
    z = Z.clone().requires_grad_()
    crit(z, y, Z_OLD.clone()).backward()
    return z.grad


@pytest.mark.parametrize("pair", [("bce", "bce"), ("ce", "mse"), ("bce", "mse"), ("mse", "mse"), ("ce", "bce"),
                                  ("bce", "none"), ("ce", "none"), ("mse", "none")])
def test_ignore_gives_unseen_outputs_no_gradient_and_train_is_the_study(pair):
    ignored = _logit_grad(Criterion(*pair, N_OLD, N_SEEN, unseen_outputs="ignore"))
    assert torch.all(ignored[:, N_SEEN:] == 0) and ignored[:, :N_SEEN].abs().sum() > 0
    trained = _logit_grad(Criterion(*pair, N_OLD, N_SEEN))
    # the study trains the unseen output wherever a term spans all O outputs (BCE over
    # [n_old, O) or [0, O), any softmax over all O); BCE-MSE's terms and the first-task
    # CE over [0, n_seen) never reach it
    spans_all = pair not in {("bce", "mse"), ("ce", "none")}
    assert bool(torch.all(trained[:, N_SEEN:] != 0)) == spans_all
    if pair[0] == "bce" and spans_all:  # BCE's target 0 pushes it down in every row
        assert torch.all(trained[:, N_SEEN:] > 0)


# ---------------------------------------------------------------- gradient ratio against the study


def _np_softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _np_sigmoid(x):
    return 1 / (1 + np.exp(-x))


def _np_bce_logits(x, t):
    return np.logaddexp(0, x) - t * x


def study_terms(pair, z, y, z_old, n_old, n_seen):
    """The study's notebooks' formulas, written out independently in numpy (float64)."""
    b, o = z.shape
    onehot = np.eye(o)[y]
    new = slice(n_old, n_seen)
    p, q = _np_softmax(z), _np_softmax(z_old)
    ce = -np.mean(np.log(p[np.arange(b), y]))
    sigmoid_mse = np.mean((_np_sigmoid(z[:, :n_old]) - _np_sigmoid(z_old[:, :n_old])) ** 2)
    if pair == "bce-bce":
        t = onehot.copy()
        t[:, :n_old] = _np_sigmoid(z_old[:, :n_old])
        elem = _np_bce_logits(z, t)
        return elem[:, n_old:].sum() / (b * o), elem[:, :n_old].sum() / (b * o)
    if pair == "ce-mse":
        return ce, np.mean((p[:, :n_old] - q[:, :n_old]) ** 2)
    if pair == "bce-mse":
        return np.mean(_np_bce_logits(z[:, new], onehot[:, new])), sigmoid_mse
    if pair == "mse-mse":
        return np.mean((p[:, new] - onehot[:, new]) ** 2), sigmoid_mse
    if pair == "ce-bce":
        return ce, np.mean(_np_bce_logits(p[:, :n_old], q[:, :n_old]))
    raise ValueError(pair)


def _numeric_grad(f, z, h=1e-5):
    g = np.zeros_like(z)
    for idx in np.ndindex(*z.shape):
        zp, zm = z.copy(), z.copy()
        zp[idx] += h
        zm[idx] -= h
        g[idx] = (f(zp) - f(zm)) / (2 * h)
    return g


@pytest.mark.parametrize("pair", ["bce-bce", "ce-mse", "bce-mse", "mse-mse", "ce-bce"])
def test_distillation_to_classification_gradient_ratio_matches_the_study(pair):
    # B=8, O=20, 10 old classes, a task of 5: logits of a network that has
    # drifted a little from the old one (z = z_old + noise), as after a few steps.
    rng = np.random.default_rng(0)
    b, o, n_old, n_seen = 8, 20, 10, 15
    z_old = rng.normal(0, 1, (b, o))
    z = z_old + rng.normal(0, 1, (b, o))
    y = np.concatenate([rng.integers(n_old, n_seen, b - 2), rng.integers(0, n_old, 2)])  # 2 exemplars

    g_clf = _numeric_grad(lambda v: study_terms(pair, v, y, z_old, n_old, n_seen)[0], z)
    g_dist = _numeric_grad(lambda v: study_terms(pair, v, y, z_old, n_old, n_seen)[1], z)
    study_ratio = np.linalg.norm(g_dist) / np.linalg.norm(g_clf)

    crit = Criterion(*pair.split("-"), n_old, n_seen)
    zt = torch.tensor(z, dtype=torch.float32, requires_grad=True)
    c, d = crit.terms(zt, torch.tensor(y), torch.tensor(z_old, dtype=torch.float32))
    (gc,) = torch.autograd.grad(c, zt, retain_graph=True)
    (gd,) = torch.autograd.grad(d, zt)
    ratio = (gd.norm() / gc.norm()).item()
    assert ratio == pytest.approx(study_ratio, rel=0.10), f"{pair}: cilab {ratio:.4g}, study {study_ratio:.4g}"
    # and the gradients themselves, not just their ratio
    np.testing.assert_allclose(gc.numpy(), g_clf, rtol=1e-3, atol=1e-6)
    np.testing.assert_allclose(gd.numpy(), g_dist, rtol=1e-3, atol=1e-6)


# ---------------------------------------------------------------- configuration


def test_criterion_from_config_carries_the_options():
    cfg = build_config("icarl-ce-bce", ["loss.ce_bce_input=logits", "loss.unseen_outputs=ignore"])
    crit = Criterion.from_config(cfg.loss, N_OLD, N_SEEN)
    assert (crit.ce_bce_input, crit.unseen_outputs, crit.n_old, crit.n_seen) == ("logits", "ignore", 2, 3)
    study = build_config("icarl-ce-bce").loss
    assert (study.ce_bce_input, study.unseen_outputs) == ("softmax", "train")


@pytest.mark.parametrize("preset, overrides, message", [
    ("icarl", ["loss.unseen_outputs=drop"], "'loss.unseen_outputs' is 'drop', which is not one of: train, ignore"),
    ("icarl", ["loss.ce_bce_input=logit"], "Did you mean 'logits'"),
    ("icarl", ["loss.ce_bce_input=logits"], "loss.ce_bce_input=logits only applies to the ce-bce pair"),
    ("icarl", ["loss.classification=mse", "loss.distillation=bce"], "'mse-bce' is not one of the study's pairs"),
])
def test_bad_loss_settings_are_refused(preset, overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config(preset, overrides)


def test_the_study_presets_name_the_study_pairs():
    pairs = {p: (lambda c: (c.classification, c.distillation, c.ce_bce_input, c.unseen_outputs))(build_config(p).loss)
             for p in ("icarl", "icarl-ce-mse", "icarl-bce-mse", "icarl-mse-mse", "icarl-ce-bce", "lwf", "finetune")}
    assert pairs == {
        "icarl": ("bce", "bce", "softmax", "train"),
        "icarl-ce-mse": ("ce", "mse", "softmax", "train"),
        "icarl-bce-mse": ("bce", "mse", "softmax", "train"),
        "icarl-mse-mse": ("mse", "mse", "softmax", "train"),
        "icarl-ce-bce": ("ce", "bce", "softmax", "train"),
        "lwf": ("bce", "bce", "softmax", "train"),
        "finetune": ("bce", "none", "softmax", "train"),
    }
