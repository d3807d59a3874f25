"""CIFAR-10 through torchvision, from a small file set in its on-disk format (never downloaded)."""

import hashlib
import pickle

import numpy as np
import pytest

from cilab.config import DataConfig
from cilab.data import DatasetError, load_dataset


def write_fake_cifar10(root, monkeypatch, per_batch=6):
    """torchvision's cifar-10-batches-py: five data batches, a test batch, batches.meta; md5s patched in.

    The files are pickles because that is CIFAR's own format; torchvision reads
    them only after their md5 check (here: of these files).
    """
    from torchvision.datasets import CIFAR10

    folder = root / CIFAR10.base_folder
    folder.mkdir(parents=True)
    names = [f"data_batch_{i}" for i in range(1, 6)]
    for b, name in enumerate(names + ["test_batch"]):
        data = np.zeros((per_batch, 3072), np.uint8)
        data[:, :1024] = 10 * b + np.arange(per_batch)[:, None]  # red plane: batch and index
        data[:, 1024:2048] = 200  # green plane
        (folder / name).write_bytes(pickle.dumps({"data": data, "labels": [i % 10 for i in range(per_batch)]}))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"name{i}" for i in range(10)]}))
    md5 = lambda f: hashlib.md5((folder / f).read_bytes()).hexdigest()  # noqa: E731
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5(n)] for n in names])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5("test_batch")]])
    monkeypatch.setattr(CIFAR10, "meta", {**CIFAR10.meta, "md5": md5("batches.meta")})
    return folder


def test_cifar10_reads_the_on_disk_format(tmp_path, monkeypatch):
    write_fake_cifar10(tmp_path, monkeypatch)
    ds = load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    assert ds.class_names[4] == "name4" and ds.num_classes == 10
    # row-major 3072 = 3 planes of 32x32: image 2 of data_batch_2 (b=1) is red 12, green 200, blue 0
    assert ds.x_train[8, :, 5, 7].tolist() == [12, 200, 0]
    assert ds.y_train[:7].tolist() == [0, 1, 2, 3, 4, 5, 0]


def test_cifar10_missing_without_download_says_where(tmp_path):
    with pytest.raises(DatasetError, match="CIFAR-10 not found in .*cifar-10-batches-py.*data.download=true"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))


def test_cifar10_corrupt_file_is_refused(tmp_path, monkeypatch):
    folder = write_fake_cifar10(tmp_path, monkeypatch)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="CIFAR-10 in .* is missing or corrupted"):
        load_dataset(DataConfig(name="cifar10", root=str(tmp_path), download=False))
