import hashlib
import pickle

import numpy as np
import pytest
import torch

from cilab.config import DataConfig
from cilab.data import DatasetError, load_dataset


def test_digits_are_uint8_3x32x32_with_stats_from_train():
    ds = load_dataset(DataConfig(name="digits"))
    assert ds.x_train.dtype == torch.uint8 and ds.x_train.shape[1:] == (3, 32, 32)
    assert ds.num_classes == 10 and len(ds.y_train) + len(ds.y_test) == 1797
    assert torch.equal(ds.x_train[:, 0], ds.x_train[:, 2])  # grey -> 3 equal channels
    mean, std = ds.mean_std()
    torch.testing.assert_close(mean, ds.x_train.float().div(255).mean(dim=(0, 2, 3)))
    assert (std > 0).all()


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


def test_npz_grey_any_size_becomes_3x32x32(tmp_path):
    ds = load_dataset(DataConfig(name="npz", path=str(_write_npz(tmp_path / "d.npz"))))
    assert ds.x_train.shape == (40, 3, 32, 32) and ds.x_test.shape == (8, 3, 32, 32)
    assert ds.num_classes == 4


def test_npz_colour_channels_last(tmp_path):
    x = np.zeros((40, 32, 32, 3), np.uint8)
    x[..., 1] = 200
    ds = load_dataset(DataConfig(name="npz", path=str(_write_npz(tmp_path / "c.npz", x_train=x))))
    assert ds.x_train[:, 1].eq(200).all() and ds.x_train[:, 0].eq(0).all()


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


def write_fake_cifar100(root, n_train=20, n_test=10, monkeypatch=None):
    """A small file set in torchvision's on-disk CIFAR-100 format; its md5s patched in."""
    from torchvision.datasets import CIFAR100

    folder = root / CIFAR100.base_folder
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = [f"class{i}" for i in range(100)]
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {"data": rng.integers(0, 256, (n * 100, 3072), dtype=np.uint8),
                 "fine_labels": np.repeat(np.arange(100), n).tolist(), "coarse_labels": [0] * (n * 100)}
        (folder / split).write_bytes(pickle.dumps(entry))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names}))
    md5 = lambda f: hashlib.md5((folder / f).read_bytes()).hexdigest()  # noqa: E731
    if monkeypatch is not None:
        monkeypatch.setattr(CIFAR100, "train_list", [["train", md5("train")]])
        monkeypatch.setattr(CIFAR100, "test_list", [["test", md5("test")]])
        monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5("meta")})
    return folder


def test_cifar100_from_torchvision_on_disk_format(tmp_path, monkeypatch):
    write_fake_cifar100(tmp_path, monkeypatch=monkeypatch)
    ds = load_dataset(DataConfig(name="cifar100", root=str(tmp_path), download=False))
    assert ds.x_train.shape == (2000, 3, 32, 32) and ds.x_test.shape == (1000, 3, 32, 32)
    assert ds.num_classes == 100 and ds.class_names[3] == "class3"


def test_cifar100_missing_without_download_says_where(tmp_path):
    with pytest.raises(DatasetError, match="not found in .*cifar-100-python.*data.download=true"):
        load_dataset(DataConfig(name="cifar100", root=str(tmp_path), download=False))


def test_cifar100_corrupt_file_is_refused(tmp_path, monkeypatch):
    folder = write_fake_cifar100(tmp_path, monkeypatch=monkeypatch)
    (folder / "train").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="corrupted"):
        load_dataset(DataConfig(name="cifar100", root=str(tmp_path), download=False))
