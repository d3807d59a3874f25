"""Data kept in host memory: staged batches equal on-device batches; chunked statistics equal direct ones."""

import pytest
import torch

from cilab.data import BatchLoader, Dataset
from cilab.data import datasets as datasets_module
from cilab.data.loader import Normalizer, data_placement, place


def batches(stage, n=37, batch=8):
    x = torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y = torch.arange(n)
    norm = Normalizer(torch.full((3,), 0.5), torch.full((3,), 0.25))
    loader = BatchLoader(x, y, batch, norm, augment=True, generator=torch.Generator().manual_seed(1), stage=stage)
    return [(xb.clone(), yb.clone()) for xb, yb in loader] + [(xb, yb) for xb, yb in loader], x, norm


def test_staged_host_batches_equal_device_batches():
    plain, x, norm = batches(stage=False)
    staged, _, _ = batches(stage=True)
    assert len(plain) == len(staged) == 2 * 5  # 37 images in batches of 8, two epochs
    for (xa, ya), (xb, yb) in zip(plain, staged):
        assert torch.equal(ya, yb) and torch.equal(xa, xb)
    # every image of an epoch appears once, and the last batch is the short one
    assert sorted(torch.cat([yb for _, yb in staged[:5]]).tolist()) == list(range(37))
    assert len(staged[4][1]) == 37 - 4 * 8


def test_staged_batches_hold_the_right_images():
    # without augmentation a batch is the normalised images of its labels (y = index here)
    x = torch.randint(0, 256, (10, 3, 4, 4), dtype=torch.uint8)
    norm = Normalizer(torch.zeros(3), torch.ones(3))
    loader = BatchLoader(x, torch.arange(10), 3, norm, augment=False, generator=torch.Generator().manual_seed(0),
                         stage=True)
    for xb, yb in loader:
        torch.testing.assert_close(xb, x[yb].float() / 255)


def test_placement_on_cpu():
    cpu = torch.device("cpu")
    assert data_placement(10**12, cpu, "auto") == "device"  # no GPU: host memory is the device's
    assert data_placement(1, cpu, "host") == "host"
    x = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    assert place(x, cpu, "host") is x and place(x, cpu, "device").device == cpu


def test_chunked_mean_std_equals_the_direct_formula(monkeypatch):
    x = torch.randint(0, 256, (50, 3, 6, 6), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    x[:, 2] = 9  # a constant channel: std 0, clamped to 1e-3 as before
    ds = Dataset(x, torch.zeros(50, dtype=torch.int64), x[:1], torch.zeros(1, dtype=torch.int64), ["a"])
    direct = ds.mean_std()
    monkeypatch.setattr(datasets_module, "MEAN_STD_CHUNK", 4 * 3 * 6 * 6 * 7)  # chunks of 7 images, 50 = 7*7 + 1
    chunked = ds.mean_std()
    xf = x.double() / 255
    torch.testing.assert_close(chunked[0], xf.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(chunked[1], xf.std(dim=(0, 2, 3)).float().clamp_min(1e-3))
    torch.testing.assert_close(chunked[0], direct[0])
    torch.testing.assert_close(chunked[1], direct[1])
    assert chunked[0][2].item() == pytest.approx(9 / 255) and chunked[1][2].item() == pytest.approx(1e-3)
