import pytest
import torch

from cilab.classifiers import FitData, build_classifier
from cilab.config import EvalConfig


def clusters(n_per_class: int, n_classes: int = 4, d: int = 16, seed: int = 0, spread: float = 0.05):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(n_classes, d, generator=g)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), d, generator=g)
    return x, y


def test_nme_on_synthetic_clusters():
    xe, ye = clusters(10, seed=0)  # exemplars
    xt, yt = clusters(50, seed=0)  # same centres, other noise draw is fine: same generator seed -> same centres
    g = torch.Generator().manual_seed(5)
    xt = xt + 0.05 * torch.randn(xt.shape, generator=g)
    clf = build_classifier("nme", EvalConfig())
    clf.fit(FitData(xe, ye, torch.nn.Identity(), 4))
    assert (clf.predict(xt) == yt).float().mean() == 1.0
    # the means are unit vectors of the exemplar means
    torch.testing.assert_close(clf.means.norm(dim=1), torch.ones(4))


def test_fc_uses_only_seen_outputs():
    head = torch.nn.Linear(3, 5)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(torch.tensor([0.0, 1.0, 0.0, 0.0, 9.0]))  # output 4 not seen yet
    clf = build_classifier("fc", EvalConfig())
    clf.fit(FitData(torch.empty(0, 3), torch.empty(0, dtype=torch.long), head, 4))
    assert clf.predict(torch.randn(7, 3)).tolist() == [1] * 7


@pytest.mark.parametrize("name", ["nme", "knn", "svm", "mlp"])
def test_exemplar_classifiers_near_perfect_on_separable_features(name):
    xe, ye = clusters(20, n_classes=5, seed=1)
    xt, yt = clusters(40, n_classes=5, seed=1)
    clf = build_classifier(name, EvalConfig())
    clf.fit(FitData(xe, ye, torch.nn.Identity(), 5, seed=0))
    pred = clf.predict(xt)
    assert pred.dtype == torch.int64 and pred.shape == yt.shape
    assert (pred == yt).float().mean() >= 0.99


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
