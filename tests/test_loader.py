import torch

from cilab.data import BatchLoader, augment_batch
from cilab.data.loader import Normalizer


def _images(n=3, c=3, h=32, w=32):
    return torch.arange(n * c * h * w, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(n, c, h, w)


def test_crop_with_known_offset_reproduces_pixels():
    x = _images()
    offsets = torch.tensor([[0, 0], [4, 4], [7, 2]])
    flips = torch.tensor([False, False, False])
    out = augment_batch(x, offsets=offsets, flips=flips)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for i, (dy, dx) in enumerate(offsets.tolist()):
        assert torch.equal(out[i], padded[i, :, dy: dy + 32, dx: dx + 32])
    assert torch.equal(out[1], x[1])  # offset 4,4 is the identity
    # offset (0, 0): the top-left 4 rows/cols are the zero padding
    assert out[0, :, :4, :].eq(0).all() and out[0, :, :, :4].eq(0).all()
    assert torch.equal(out[0, :, 4:, 4:], x[0, :, :28, :28])


def test_flip_mirrors_columns():
    x = _images()
    out = augment_batch(x, offsets=torch.full((3, 2), 4), flips=torch.tensor([True, False, True]))
    assert torch.equal(out[0], x[0].flip(-1))
    assert torch.equal(out[1], x[1])
    assert torch.equal(out[2], x[2].flip(-1))
    # crop and flip together: flip of the cropped window
    out = augment_batch(x, offsets=torch.tensor([[2, 6]] * 3), flips=torch.tensor([True] * 3))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    assert torch.equal(out[0], padded[0, :, 2:34, 6:38].flip(-1))


def test_random_augmentation_is_seeded_and_varied():
    x = _images(64)
    a = augment_batch(x, torch.Generator().manual_seed(0))
    b = augment_batch(x, torch.Generator().manual_seed(0))
    c = augment_batch(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)


def test_loader_without_augmentation_returns_normalised_originals():
    x = _images(10)
    y = torch.arange(10)
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.25, 0.3])
    loader = BatchLoader(x, y, 4, Normalizer(mean, std), augment=False, generator=torch.Generator().manual_seed(0))
    batches = list(loader)
    assert [len(b[1]) for b in batches] == [4, 4, 2] and len(loader) == 3
    xs = torch.cat([b[0] for b in batches])
    ys = torch.cat([b[1] for b in batches])
    assert sorted(ys.tolist()) == list(range(10))  # an epoch is a permutation
    expected = (x[ys].float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    torch.testing.assert_close(xs, expected)


def test_loader_shuffle_is_seeded():
    x, y = _images(20), torch.arange(20)
    n = Normalizer(torch.zeros(3), torch.ones(3))
    order = lambda seed: torch.cat([b for _, b in BatchLoader(x, y, 8, n, True, torch.Generator().manual_seed(seed))])  # noqa: E731
    assert torch.equal(order(0), order(0)) and not torch.equal(order(0), order(1))
