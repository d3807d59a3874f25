import pytest
import torch
import torch.nn.functional as F

from cilab.losses import CLASSIFICATION_LOSSES, DISTILLATION_LOSSES, Criterion


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 10, generator=g) * 3
    z_old = torch.randn(6, 10, generator=g) * 3
    y = torch.tensor([4, 5, 0, 4, 5, 1])  # 0, 1 are exemplar labels of old classes
    return z, z_old, y


def test_bce_bce_equals_icarl_single_bce(batch):
    z, z_old, y = batch
    n_old, n_seen = 4, 6
    total = Criterion("bce", "bce", n_old, n_seen)(z, y, z_old)
    target = F.one_hot(y, 10).float()
    target[:, :n_old] = torch.sigmoid(z_old[:, :n_old])
    icarl = F.binary_cross_entropy_with_logits(z, target)  # mean over all B x O
    torch.testing.assert_close(total, icarl)


def test_without_distillation_bce_covers_every_output(batch):
    z, _, y = batch
    loss = Criterion("bce", "none", 4, 6)(z, y, None)
    torch.testing.assert_close(loss, F.binary_cross_entropy_with_logits(z, F.one_hot(y, 10).float()))
    # the first task never distills even with a distillation loss configured
    first = Criterion("bce", "bce", 0, 2)
    assert not first.distills


def test_ce_is_softmax_over_seen_outputs(batch):
    z, _, y = batch
    got = CLASSIFICATION_LOSSES["ce"](z, y, 4, 6)
    p = z[:, :6].softmax(1)
    torch.testing.assert_close(got, -p[torch.arange(6), y].log().mean())


def test_mse_classification_against_direct_computation(batch):
    z, _, y = batch
    got = CLASSIFICATION_LOSSES["mse"](z, y, 4, 6)
    p = torch.exp(z[:, :6]) / torch.exp(z[:, :6]).sum(1, keepdim=True)
    direct = sum(((p[b] - F.one_hot(y[b], 6).float()) ** 2).sum() for b in range(6)) / 6
    torch.testing.assert_close(got, direct)


def test_mse_distillation_against_direct_computation(batch):
    z, z_old, _ = batch
    got = DISTILLATION_LOSSES["mse"](z, z_old, 4)
    p, q = z[:, :4].softmax(1), z_old[:, :4].softmax(1)
    torch.testing.assert_close(got, ((p - q) ** 2).sum(1).mean())
    assert DISTILLATION_LOSSES["mse"](z, z, 4).item() == pytest.approx(0.0)


def test_bce_distillation_only_touches_old_outputs(batch):
    z, z_old, _ = batch
    got = DISTILLATION_LOSSES["bce"](z, z_old, 4)
    elem = F.binary_cross_entropy_with_logits(z[:, :4], torch.sigmoid(z_old[:, :4]), reduction="none")
    torch.testing.assert_close(got, elem.sum() / z.numel())
    z2 = z.clone()
    z2[:, 4:] += 5  # new outputs do not matter
    torch.testing.assert_close(DISTILLATION_LOSSES["bce"](z2, z_old, 4), got)
    assert DISTILLATION_LOSSES["none"](z, z_old, 4).item() == 0.0
