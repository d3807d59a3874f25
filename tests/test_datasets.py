import pickle

import numpy as np
import pytest
import torch

from cilab.config import DataConfig
from cilab.data import DatasetError, load_dataset
from helpers import write_fake_cifar100


def test_digits_are_the_sklearn_images_scaled_to_0_255_and_upsampled_4x():
    from sklearn.datasets import load_digits as sk_digits

    ds = load_digits_cached()
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape[1:] == (3, 32, 32)
    assert ds.num_classes == 10 and (len(ds.y_train), len(ds.y_test)) == (1347, 450)  # 75 / 25 of 1797
    assert torch.equal(ds.x_train[:, 0], ds.x_train[:, 2])  # grey -> 3 equal channels
    d = sk_digits()
    # stratified: each digit's quarter of its 174..183 images is in the test split, +-1 for rounding
    share = np.bincount(d.target, minlength=10) / 4
    assert np.abs(torch.bincount(ds.y_test, minlength=10).numpy() - share).max() <= 1
    # every training image, shrunk back by 4x4 averaging, is its sklearn image x 255/16, with its label:
    # a shuffled label, a transposed image or a 0..16 scale would not match
    sk = torch.tensor(d.images * 255.0 / 16.0, dtype=torch.float32)
    small = torch.nn.functional.avg_pool2d(ds.x_train[:, :1].float(), 4)[:, 0]
    dist = torch.cdist(small.flatten(1), sk.flatten(1))  # train image i -> nearest sklearn image
    nearest = dist.argmin(1)
    # the blur of upsampling then averaging leaves up to 28% of the norm; the labels must all agree
    assert (dist.min(1).values < 0.3 * sk.flatten(1).norm(dim=1)[nearest]).all()
    assert torch.equal(torch.as_tensor(d.target)[nearest], ds.y_train)


def test_mean_std_are_the_training_pixels_population_statistics(tmp_path):
    # train: half the images all 0, half all 255 -> mean 0.5, std 0.5 (in 0..1); test images ignored
    x = np.zeros((40, 8, 8), np.uint8)
    x[::2] = 255
    path = _write_npz(tmp_path / "d.npz", x_train=x, x_test=np.full((8, 8, 8), 255, np.uint8))
    mean, std = load_dataset(DataConfig(name="npz", path=str(path))).mean_std()
    torch.testing.assert_close(mean, torch.full((3,), 0.5))
    # torch's std is the sample std (n-1) over 40 x 32 x 32 pixels: 0.5 * sqrt(40960 / 40959)
    torch.testing.assert_close(std, torch.full((3,), 0.5 * (40960 / 40959) ** 0.5))


_DIGITS = {}


def load_digits_cached():
    if "d" not in _DIGITS:
        _DIGITS["d"] = load_dataset(DataConfig(name="digits"))
    return _DIGITS["d"]


def _write_npz(path, **over):
    rng = np.random.default_rng(0)
    arrays = dict(
        x_train=rng.integers(0, 256, (40, 28, 28), dtype=np.uint8), y_train=np.repeat(np.arange(4), 10),
        x_test=rng.integers(0, 256, (8, 28, 28), dtype=np.uint8), y_test=np.repeat(np.arange(4), 2),
    )
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return path


def test_npz_grey_any_size_becomes_3x32x32_image_by_image(tmp_path):
    # image i is constant 5 * i with label i % 4; the last one is a left-white / right-black 28x28 edge
    x = np.repeat((5 * np.arange(40, dtype=np.uint8))[:, None, None], 28, 1).repeat(28, 2)
    x[39] = 0
    x[39, :, :14] = 255
    path = _write_npz(tmp_path / "d.npz", x_train=x, y_train=np.arange(40) % 4)
    ds = load_dataset(DataConfig(name="npz", path=str(path)))
    assert ds.x_train.shape == (40, 3, 32, 32) and ds.x_test.shape == (8, 3, 32, 32)
    assert ds.num_classes == 4 and ds.y_train.tolist() == [i % 4 for i in range(40)]
    for i in range(39):  # a constant image stays that constant through the resize, in its place
        assert ds.x_train[i].eq(5 * i).all(), i
    edge = ds.x_train[39, 0]
    # 28 -> 32 columns: the edge at 14/28 lands at 16/32; a pixel or two of blur either side
    assert edge[:, :14].eq(255).all() and edge[:, 18:].eq(0).all() and edge[:, 14:18].float().mean() > 50
    assert edge.eq(edge[0]).all()  # every row the same: not transposed


@pytest.mark.parametrize("layout", ["channels_last", "channels_first"])
def test_npz_colour_channels_keep_their_order(tmp_path, layout):
    x = np.zeros((40, 32, 32, 3), np.uint8)
    x[..., 0], x[..., 1], x[..., 2] = 10, 200, 30
    x[:, 0, 5, :] = 99  # one marked pixel: row 0, column 5
    if layout == "channels_first":
        x = x.transpose(0, 3, 1, 2).copy()
    ds = load_dataset(DataConfig(name="npz", path=str(_write_npz(tmp_path / "c.npz", x_train=x))))
    img = ds.x_train[0]
    assert img[0, 1, 1] == 10 and img[1, 1, 1] == 200 and img[2, 1, 1] == 30
    assert img[:, 0, 5].tolist() == [99, 99, 99] and img[:, 5, 0].tolist() == [10, 200, 30]


@pytest.mark.parametrize("over, message", [
    (dict(y_test=None), "lacks the arrays \\['y_test'\\]"),
    (dict(x_train=np.zeros((40, 28, 28), np.float32)), "store images as uint8"),
    (dict(y_train=np.zeros(39, np.int64)), "has 40 images but y_train has 39"),
    (dict(y_test=np.array([0, 1, 2, 3, 4, 4, 4, 4])), "never appear in y_train"),
    (dict(x_train=np.zeros((40, 5), np.uint8)), "expected N x H x W"),
])
def test_npz_problems_are_named(tmp_path, over, message):
    path = _write_npz(tmp_path / "bad.npz", **over)
    with pytest.raises(DatasetError, match=message):
        load_dataset(DataConfig(name="npz", path=str(path)))


def test_cifar100_from_torchvision_on_disk_format(tmp_path, monkeypatch):
    write_fake_cifar100(tmp_path, monkeypatch=monkeypatch)
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path), download=False))
    assert ds.x_train.shape == (2000, 3, 32, 32) and ds.x_test.shape == (1000, 3, 32, 32)
    assert ds.num_classes == 100 and ds.class_names[3] == "class3"
    # CIFAR's rows are 1024 red, 1024 green, 1024 blue values, each row by row: image i is
    # row i reshaped to 3 x 32 x 32, with label fine_labels[i] (20 per class, in class order)
    for split, x, y in (("train", ds.x_train, ds.y_train), ("test", ds.x_test, ds.y_test)):
        entry = pickle.loads((tmp_path / "cifar-100-python" / split).read_bytes())
        for i in (0, 1, 777, len(y) - 1):
            assert torch.equal(x[i], torch.from_numpy(entry["data"][i].reshape(3, 32, 32))), (split, i)
            assert y[i] == entry["fine_labels"][i]
    assert ds.y_train.tolist() == np.repeat(np.arange(100), 20).tolist()


def test_cifar100_missing_without_download_says_where(tmp_path):
    with pytest.raises(DatasetError, match="not found in .*cifar-100-python.*data.download=true"):
        load_dataset(DataConfig(name="cifar100", root=str(tmp_path), download=False))


def test_cifar100_corrupt_file_is_refused(tmp_path, monkeypatch):
    folder = write_fake_cifar100(tmp_path, monkeypatch=monkeypatch)
    (folder / "train").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="corrupted"):
        load_dataset(DataConfig(name="cifar100", root=str(tmp_path), download=False))
