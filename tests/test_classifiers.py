import pytest
import torch

from cilab.classifiers import FitData, build_classifier
from cilab.config import EvalConfig


# Features for the exemplar classifiers, on data whose right answer is known. They see
# L2-normalised features, so the data are built as directions: a point (u, v, 1) of the
# plane z = 1 is the direction of the sphere it projects to, and a line of that plane is
# a great circle, so linear boundaries and their error rates survive the normalisation.


def overlapping_gaussians(n_per_class: int, seed: int, a: float = 0.1, sigma: float = 0.1):
    """Two classes at u = -a and u = +a, isotropic noise sigma in (u, v), z = 1.

    Equal priors and covariances: the best possible rule is the nearest class mean,
    u < 0 or u > 0, right with probability Phi(a / sigma) = Phi(1) = 84.13%.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat_interleave(n_per_class)
    x = torch.ones(len(y), 3)
    x[:, 0] = (2 * y - 1) * a + sigma * torch.randn(len(y), generator=g)
    x[:, 1] = sigma * torch.randn(len(y), generator=g)
    return x, y


def bimodal(n_per_class: int, seed: int, sigma: float = 0.3):
    """Class 0 around e1 for half its points and e2 for the other half, class 1 around (e1+e2)/sqrt 2.

    The mean of class 0 lies (after normalising) on class 1's centre, so nearest-mean is at
    chance; a linear rule can cut off only one of class 0's modes: at most about 75%;
    local rules (kNN, an RBF SVM, an MLP) can follow both modes.
    """
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(2).repeat_interleave(n_per_class)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5 ** 0.5, 0.5 ** 0.5, 0.0]])
    mode = torch.where(y == 0, torch.arange(len(y)) % 2, torch.full_like(y, 2))
    return centres[mode] + sigma * torch.randn(len(y), 3, generator=g), y


def fit_predict(name, train, test, **settings) -> float:
    """Accuracy of classifier ``name`` (eval.<name>.<key> = value for each setting) fitted on ``train``."""
    cfg = EvalConfig()
    for key, value in settings.items():
        setattr(getattr(cfg, name), key, value)
    clf = build_classifier(name, cfg)
    clf.fit(FitData(train[0], train[1], torch.nn.Identity(), 2, seed=0))
    pred = clf.predict(test[0])
    assert pred.dtype == torch.int64 and pred.shape == test[1].shape
    return (pred == test[1]).float().mean().item()


BAYES = 0.8413  # Phi(1)


@pytest.mark.parametrize("name", ["nme", "knn", "svm", "mlp"])
def test_on_overlapping_classes_each_classifier_lands_near_the_best_possible_rate(name):
    # 20 exemplars per class (as in a small memory), 1000 test points per class (+-1.2% sampling noise).
    # Above Bayes + 3 points would mean the test data leaked into the fit; below Bayes - 8 a broken rule.
    acc = fit_predict(name, overlapping_gaussians(20, seed=0), overlapping_gaussians(1000, seed=1))
    assert BAYES - 0.08 < acc < BAYES + 0.03, f"{name}: {acc:.3f}"


def test_nme_is_the_best_rule_for_equal_gaussians_and_1nn_is_noisier_than_5nn():
    train, test = overlapping_gaussians(20, seed=0), overlapping_gaussians(1000, seed=1)
    nme, knn5, knn1 = fit_predict("nme", train, test), fit_predict("knn", train, test), fit_predict("knn", train, test, k=1)
    assert nme > BAYES - 0.03  # the plug-in Bayes rule here
    assert knn1 < knn5 <= nme + 0.01  # one neighbour follows the noise of single exemplars (0.80 vs 0.82 vs 0.83)


def test_on_a_two_mode_class_nme_and_a_linear_svm_fail_where_local_rules_succeed():
    train, test = bimodal(20, seed=0), bimodal(1000, seed=1)
    acc = {name: fit_predict(name, train, test) for name in ("nme", "knn", "svm", "mlp")}
    assert abs(acc["nme"] - 0.5) < 0.05, acc  # chance: both class means point the same way
    for name in ("knn", "svm", "mlp"):  # RBF kernel (the study's), 5 neighbours, a hidden layer
        assert acc[name] > 0.78, acc
    linear = fit_predict("svm", train, test, kernel="linear")
    assert linear < 0.77 and acc["svm"] > linear + 0.05, (linear, acc)  # eval.svm.kernel is honoured


def test_nme_means_are_the_normalised_means_of_normalised_features_and_flips_count():
    # Hand-worked: class 0 has one exemplar, feature (3, 4) -> unit (0.6, 0.8), whose mirror
    # image has feature (0, 2) -> (0, 1); class 1: (5, 0) and mirror (2, 0) -> (1, 0) twice.
    # With flips: mean of class 0 = (0.3, 0.9) / |.| = (0.3162, 0.9487); without: (0.6, 0.8).
    feats, flips = torch.tensor([[3.0, 4.0], [5.0, 0.0]]), torch.tensor([[0.0, 2.0], [2.0, 0.0]])
    labels = torch.tensor([0, 1])
    nme = build_classifier("nme", EvalConfig())
    nme.fit(FitData(feats, labels, torch.nn.Identity(), 2, flipped_features=flips))
    torch.testing.assert_close(nme.means, torch.tensor([[0.1 ** 0.5, 0.9 ** 0.5], [1.0, 0.0]]))
    # A test feature at 30 degrees: nearer (0.6, 0.8) at 53.1 degrees than (1, 0) at 0 degrees,
    # but nearer (1, 0) than the flip-aware mean at 71.6 degrees (midpoints 26.6 and 35.8).
    x = torch.tensor([[3 ** 0.5, 1.0]])
    assert nme.predict(x).tolist() == [1]
    plain = build_classifier("nme", EvalConfig())
    plain.fit(FitData(feats, labels, torch.nn.Identity(), 2))
    torch.testing.assert_close(plain.means, torch.tensor([[0.6, 0.8], [1.0, 0.0]]))
    assert plain.predict(x).tolist() == [0]


def _head_preferring_an_unseen_class():
    head = torch.nn.Linear(3, 5)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 9.0]))  # output 4 is a class not seen yet
    return head


def test_fc_argmax_over_all_outputs_by_default_as_the_study():
    clf = build_classifier("fc", EvalConfig())
    clf.fit(FitData(torch.empty(0, 3), torch.empty(0, dtype=torch.long), _head_preferring_an_unseen_class(), 4))
    assert clf.predict(torch.randn(7, 3)).tolist() == [4] * 7  # the unseen class wins: an error, as in the study
    assert clf.may_predict_unseen and clf.settings() == {"scope": "all"}


def test_fc_scope_seen_restricts_the_argmax_to_the_seen_outputs():
    cfg = EvalConfig(fc_scope="seen")
    clf = build_classifier("fc", cfg)
    clf.fit(FitData(torch.empty(0, 3), torch.empty(0, dtype=torch.long), _head_preferring_an_unseen_class(), 4))
    assert clf.predict(torch.randn(7, 3)).tolist() == [1] * 7
    assert not clf.may_predict_unseen and clf.settings() == {"scope": "seen"}


@pytest.mark.parametrize("name, floor", [("nme", 0.85), ("knn", 0.9), ("svm", 0.9), ("mlp", 0.9)])
def test_exemplar_classifiers_on_digits_features(name, floor):
    """Fitted on 20 'exemplars' per class of the 64-d digit vectors, tested on the rest."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32), torch.tensor(d.target)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    ex = torch.cat([torch.nonzero(y == c).flatten()[:20] for c in range(10)])
    rest = torch.ones(len(y), dtype=torch.bool)
    rest[ex] = False
    clf = build_classifier(name, EvalConfig())
    clf.fit(FitData(x[ex], y[ex], torch.nn.Identity(), 10, seed=0))
    acc = (clf.predict(x[rest]) == y[rest]).float().mean().item()
    assert acc >= floor, f"{name}: {acc:.3f}"


def test_classifier_parameters_come_from_their_config():
    cfg = EvalConfig()
    cfg.knn.k = 1
    cfg.svm.C = 0.5
    cfg.mlp.hidden = 7
    assert build_classifier("knn", cfg).make(0).n_neighbors == 1
    assert build_classifier("svm", cfg).make(0).C == 0.5
    assert build_classifier("mlp", cfg).make(0).hidden_layer_sizes == (7,)
    assert build_classifier("fc", cfg).cfg == "all"
