"""N ResNets as one grouped network (models/grouped.py): the same outputs and SGD steps as N separate ones."""

import copy

import torch
import torch.nn.functional as F

from cilab.models import ResNetCifar
from cilab.models.grouped import GroupedResNetCifar


def _models(n: int) -> list[ResNetCifar]:
    out = []
    for i in range(n):
        torch.manual_seed(i)
        m = ResNetCifar(1, 10)  # one block a stage: ResNet-8, shortcuts that pad and stride included
        with torch.no_grad():  # a head and batch-norm affine parameters that differ from their inits
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
        out.append(m)
    return out


def _fused_input(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(xs, dim=1)  # model i reads channels 3i..3i+2


def test_fused_models_compute_what_each_computes_alone():
    models = _models(3)
    fused = GroupedResNetCifar.fuse(models)
    xs = [torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(10 + i)) for i in range(3)]
    for train in (True, False):  # batch statistics of each model's own 5 images, and running statistics
        fused.train(train)
        out = fused(_fused_input(xs), with_features=True)
        assert out.logits.shape == (5, 3, 10) and out.features.shape == (5, 3, 64)
        for i, m in enumerate(models):
            m.train(train)
            alone = m(xs[i], with_features=True)
            torch.testing.assert_close(out.logits[:, i], alone.logits, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(out.features[:, i], alone.features, rtol=1e-4, atol=1e-5)
    # unfuse is fuse's inverse, running statistics included
    for i, m in enumerate(models):
        torch.testing.assert_close(fused.unfuse(i), m.state_dict())


def test_one_sgd_step_of_the_fused_network_is_one_step_of_each_model():
    models = _models(2)
    fused = GroupedResNetCifar.fuse(copy.deepcopy(models))
    sgd = dict(lr=0.5, momentum=0.9, weight_decay=1e-3)
    opts = [torch.optim.SGD(m.parameters(), **sgd) for m in models]
    fused_opt = torch.optim.SGD(fused.parameters(), **sgd)
    for step in range(2):  # the second step uses the momentum buffers
        g = torch.Generator().manual_seed(step)
        xs = [torch.randn(4, 3, 32, 32, generator=g) for _ in models]
        ys = [torch.randint(0, 10, (4,), generator=g) for _ in models]
        for m, opt, x, y in zip(models, opts, xs, ys):
            opt.zero_grad()
            F.cross_entropy(m(x), y).backward()
            opt.step()
        # the sum of the models' mean losses: model i's parameters get model i's gradient only
        logits = fused(_fused_input(xs))
        loss = sum(F.cross_entropy(logits[:, i], y) for i, y in enumerate(ys))
        fused_opt.zero_grad()
        loss.backward()
        fused_opt.step()
    for i, m in enumerate(models):
        torch.testing.assert_close(fused.unfuse(i), m.state_dict(), rtol=1e-4, atol=1e-5)


def test_fuse_refuses_what_it_would_compute_differently():
    import pytest

    with pytest.raises(ValueError, match="one architecture"):
        GroupedResNetCifar.fuse([ResNetCifar(1, 10), ResNetCifar(2, 10)])
    with pytest.raises(ValueError, match="one architecture"):
        GroupedResNetCifar.fuse([ResNetCifar(1, 10), ResNetCifar(1, 5)])
    with pytest.raises(ValueError, match="last ReLU"):
        GroupedResNetCifar.fuse([ResNetCifar(1, 10, last_relu=False)] * 2)
