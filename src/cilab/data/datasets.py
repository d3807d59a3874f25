"""Datasets as whole uint8 tensors N x 3 x S x S (plus int64 labels); S = 32 except for image folders.

Every dataset is loaded once, in full, and later moved to the training device;
batches are cut from it there (see loader.py), so there is no per-image Python.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import Registry

DATASETS: Registry = Registry("dataset")


class DatasetError(RuntimeError):
    """The data cannot be loaded; the message says what to do."""


class DatasetNotHere(DatasetError):
    """A downloadable dataset not on this machine, asked for with data.download=false (a dry run's
    check asks so: a plan fetches nothing)."""

    def __init__(self, message: str, title: str, folder: Path):
        super().__init__(message)
        self.title, self.folder = title, folder


@dataclass
class Dataset:
    x_train: torch.Tensor  # uint8 N x 3 x S x S (S = 32, or data.image_size for image folders)
    y_train: torch.Tensor  # int64 N, labels 0..C-1
    x_test: torch.Tensor
    y_test: torch.Tensor
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device) -> "Dataset":
        return Dataset(
            self.x_train.to(device), self.y_train.to(device), self.x_test.to(device), self.y_test.to(device),
            self.class_names,
        )

    def mean_std(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and std in [0, 1] units, from the training split only."""
        if self.x_train.numel() > MEAN_STD_CHUNK:
            return _chunked_mean_std(self.x_train)
        x = self.x_train.float().div_(255)
        return x.mean(dim=(0, 2, 3)), x.std(dim=(0, 2, 3)).clamp_min(1e-3)


# Above this many uint8 values (CIFAR's 150M stay below it) the statistics are
# summed in chunks: a float copy of ImageNet-100 at 224 px would take 76 GB.
MEAN_STD_CHUNK = 1 << 28


def _chunked_mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (unbiased) std per channel from float64 sums of x and x^2 over chunks of images."""
    per_image = x[0].numel() if len(x) else 1
    step = max(1, MEAN_STD_CHUNK // (4 * per_image))
    total = torch.zeros(x.shape[1], dtype=torch.float64)
    squares = torch.zeros(x.shape[1], dtype=torch.float64)
    for i in range(0, len(x), step):
        chunk = x[i: i + step].to(torch.float64).div_(255)
        total += chunk.sum(dim=(0, 2, 3))
        squares += chunk.square().sum(dim=(0, 2, 3))
    n = x.numel() // x.shape[1]
    mean = total / n
    var = (squares - n * mean.square()) / max(n - 1, 1)
    return mean.float(), var.clamp_min(0).sqrt().float().clamp_min(1e-3)


def load_dataset(cfg) -> Dataset:
    """``cfg`` is the ``data`` section of the config."""
    ds = DATASETS[cfg.name](cfg)
    check_arrays(ds.x_train, ds.y_train, ds.x_test, ds.y_test, cfg.name, getattr(cfg, "image_size", 32))
    return ds


def check_arrays(x_train, y_train, x_test, y_test, source: str, size: int = 32) -> None:
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != (3, size, size):
            raise DatasetError(f"{source}: x_{split} became {tuple(x.shape)} {x.dtype}, expected N x 3 x {size} x {size} uint8")
        if y.shape != (x.shape[0],):
            raise DatasetError(f"{source}: y_{split} has {tuple(y.shape)} labels for {x.shape[0]} images")
        # An empty test split would "evaluate" to 0% after every task and an
        # empty training split fails deep in the first task: refuse both here.
        if x.shape[0] == 0:
            raise DatasetError(f"{source}: x_{split} holds no images; both splits need images (the {split} split "
                               f"is used to {'train' if split == 'train' else 'measure every accuracy'})")


def _to_nchw32(x: np.ndarray, what: str) -> torch.Tensor:
    """Grey or colour images (N,H,W | N,H,W,C | N,C,H,W; C in 1,3) -> uint8 N x 3 x 32 x 32.

    A 4-d array is channels-first when axis 1 holds 1 or 3 channels, else
    channels-last when the last axis does; for an error message, the smaller
    of the two axes is taken for the channels (images are larger than 4 pixels).
    """
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4:
        if x.shape[1] not in (1, 3) and (x.shape[-1] in (1, 3) or x.shape[-1] < x.shape[1]):
            x = x.transpose(0, 3, 1, 2)
            layout = "N x H x W x C, channels last"
        else:
            layout = "N x C x H x W, channels first"
        if x.shape[1] not in (1, 3):
            hint = "; drop the alpha channel, e.g. x[..., :3]" if x.shape[1] == 4 else ""
            raise DatasetError(f"{what} has {x.shape[1]} channels (read as {layout}); expected 1 (grey) or 3 "
                               f"(colour){hint}")
    else:
        raise DatasetError(f"{what} has shape {x.shape}; expected N x H x W (grey), N x H x W x C or N x C x H x W")
    if x.shape[2] == 0 or x.shape[3] == 0:
        raise DatasetError(f"{what} holds images of {x.shape[2]} x {x.shape[3]} pixels; images need at least 1 x 1")
    t = torch.from_numpy(np.ascontiguousarray(x))
    if t.shape[1] == 1:
        t = t.expand(-1, 3, -1, -1)
    if tuple(t.shape[2:]) != (32, 32):
        t = F.interpolate(t.float(), size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        t = t.round().clamp_(0, 255).to(torch.uint8)
    return t.contiguous()


@DATASETS.register("digits")
def load_digits(cfg) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images), upsampled to 32x32, 3 channels.

    A fixed stratified 75/25 split (independent of the run seed, so every run
    tests on the same images).
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    images = (d.images * (255.0 / 16.0)).round().astype(np.uint8)  # values 0..16 -> 0..255
    x_tr, x_te, y_tr, y_te = train_test_split(images, d.target, test_size=0.25, stratify=d.target, random_state=0)
    return Dataset(
        _to_nchw32(x_tr, "digits"), torch.as_tensor(y_tr, dtype=torch.int64),
        _to_nchw32(x_te, "digits"), torch.as_tensor(y_te, dtype=torch.int64),
        [str(i) for i in range(10)],
    )


@DATASETS.register("cifar100")
def load_cifar100(cfg) -> Dataset:
    """CIFAR-100 through torchvision (its on-disk format and integrity check)."""
    from torchvision.datasets import CIFAR100

    return _torchvision_cifar(CIFAR100, "CIFAR-100", cfg)


def _refuse_object_array(arrays, key: str, path: Path) -> None:
    """Refuse an array of Python objects, read from its .npy header before any data.

    Such an array can only be read by unpickling, which can run code: cilab
    never does (``np.load(allow_pickle=False)``), and numpy's own error
    suggests allow_pickle=True, which is not the way out here.
    """
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with arrays.zip.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version in readers:
                has_object = readers[version](f)[2].hasobject
            else:  # a newer header format: ask numpy, which refuses object arrays (allow_pickle=False)
                arrays[key]
                has_object = False
    except ValueError as e:
        has_object = "allow_pickle" in str(e)
        if not has_object:
            return  # a damaged header: np.load's own checks report it
    except (KeyError, OSError):
        return
    if has_object:
        raise DatasetError(f"'{path}': {key} is an array of Python objects (dtype=object), which only unpickling "
                           "could read, and cilab never unpickles data files; save it as a numeric array, e.g. "
                           "np.asarray(x, dtype=np.uint8) for images, np.int64 for labels")


@DATASETS.register("cifar10")
def load_cifar10(cfg) -> Dataset:
    """CIFAR-10 through torchvision, like CIFAR-100 (same checks and messages).

    Its files, like CIFAR-100's, are Python pickles in the dataset's own
    format, read by torchvision only after its md5 check against the
    published files: the one place cilab reads a pickle, and only the
    dataset's own.
    """
    from torchvision.datasets import CIFAR10

    return _torchvision_cifar(CIFAR10, "CIFAR-10", cfg)


def _torchvision_cifar(tv_class, title: str, cfg) -> Dataset:
    root = Path(os.path.expanduser(cfg.root))
    folder = root / tv_class.base_folder
    if not cfg.download and not folder.exists():
        raise DatasetNotHere(
            f"{title} not found in {folder}. Either allow the download (data.download=true, needs internet), "
            f"or put the extracted '{tv_class.base_folder}' folder (from {tv_class.url}) into {root}, "
            "or point data.root at the folder that holds it.", title, folder)
    try:
        train = tv_class(str(root), train=True, download=cfg.download)
        test = tv_class(str(root), train=False, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted."
        raise DatasetError(
            f"{title} in {folder} is missing or corrupted ({e}). Delete {folder} and download again "
            f"(data.download=true), or replace it with an intact copy of {tv_class.filename}."
        ) from e
    except (OSError, pickle.UnpicklingError) as e:  # network down, unreadable file
        raise DatasetError(
            f"could not get {title} into {root}: {e}. Without internet, put the extracted "
            f"'{tv_class.base_folder}' folder into {root} and set data.download=false."
        ) from e
    return Dataset(
        torch.from_numpy(train.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(train.targets),
        torch.from_numpy(test.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(test.targets),
        list(train.classes),
    )


@DATASETS.register("npz")
def load_npz(cfg) -> Dataset:
    """A user's own arrays: x_train, y_train, x_test, y_test (optional class_names).

    Images are uint8, grey (N,H,W) or colour (N,H,W,3 or N,3,H,W); other sizes
    than 32x32 are resized. Labels are integers 0..C-1, every test label must
    appear in training.
    """
    path = Path(os.path.expanduser(cfg.path or ""))
    if not path.is_file():
        raise DatasetError(f"npz file '{path}' not found; set data.path to an existing .npz file")
    try:
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read '{path}' as an npz file: {e}") from e
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays.files]
    if missing:
        raise DatasetError(f"'{path}' lacks the arrays {missing}; it has {arrays.files}. Save with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)")
    for key in arrays.files:
        _refuse_object_array(arrays, key, path)
    out = {}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8:
            raise DatasetError(f"'{path}': x_{split} is {x.dtype}; store images as uint8 0..255 (e.g. (x * 255).round().astype(np.uint8))")
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DatasetError(f"'{path}': y_{split} must be a 1-d integer array, got shape {y.shape} {y.dtype}")
        if len(y) != len(x):
            raise DatasetError(f"'{path}': x_{split} has {len(x)} images but y_{split} has {len(y)} labels")
        if len(x) == 0:
            raise DatasetError(f"'{path}': x_{split} holds no images; both splits need images (the {split} split "
                               f"is used to {'train' if split == 'train' else 'measure every accuracy'})")
        out[split] = (_to_nchw32(x, f"'{path}': x_{split}"), torch.as_tensor(y.astype(np.int64)))
    train_classes = np.unique(arrays["y_train"])
    num_classes = int(train_classes.max()) + 1
    if not np.array_equal(train_classes, np.arange(num_classes)):
        raise DatasetError(f"'{path}': y_train must use every label 0..{num_classes - 1}; it has {train_classes.tolist()}")
    extra = np.setdiff1d(np.unique(arrays["y_test"]), train_classes)
    if len(extra):
        raise DatasetError(f"'{path}': y_test has labels {extra.tolist()} that never appear in y_train")
    if "class_names" in arrays.files and len(arrays["class_names"]) == num_classes:
        names = [str(n) for n in arrays["class_names"]]
    else:
        names = [str(i) for i in range(num_classes)]
    return Dataset(*out["train"], *out["test"], names)
