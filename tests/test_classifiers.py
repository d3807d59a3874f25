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
