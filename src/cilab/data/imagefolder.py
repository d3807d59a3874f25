"""Image folders in the ImageNet layout: ``DIR/train/<class>/*.jpg`` and ``DIR/val/<class>/*.jpg``.

``data.name=imagefolder data.path=DIR`` covers ImageNet-100, Tiny-ImageNet (its
val/ rearranged into class folders) and any user's own photos. Class folders
may hold their images in subfolders (Tiny-ImageNet's ``train/<wnid>/images/``);
files with other extensions (``boxes.txt``, ``.DS_Store``) are ignored. Class
labels are the folder names in sorted order; the seeded class order and the
task split then work as for CIFAR-100. The val split is the test split.

Every image is decoded once with Pillow into the uint8 N x 3 x S x S tensors
the loader keeps, S = ``data.image_size``:
- ``data.resize=center-crop`` (default): the central square of the image
  (side = its shorter side) resized to S x S, so the aspect ratio is kept
  (as the center crop of ImageNet evaluation; what is outside the square is lost);
- ``data.resize=squash``: the whole image resized to S x S, the aspect ratio
  distorted (as the downsampled ImageNet of Chrabaszcz et al. 2017).
Both resize with Pillow's antialiased bilinear filter.

The decoded tensors are cached (``data.cache``) in ``data.root/imagefolder/``
as a torch file that loads with ``weights_only=True``, under a name keyed by the
folder's path, the image size, the resize mode, and every image's path, size
and modification time: a second run on unchanged files starts at once, and
any change (a file added, removed or rewritten) decodes again.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .datasets import DATASETS, Dataset, DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = (("train", "train"), ("test", "val"))  # (cilab's split, the folder that holds it)
CACHE_VERSION = 1  # bump when the decoding changes, so old caches are not read
SHOW_PROGRESS_FROM = 5000  # images; fewer decode in seconds and need no bar


def scan(root: Path) -> tuple[list[str], dict[str, list[tuple[Path, int]]]]:
    """Class names (sorted) and, per split, the (file, label) pairs in a fixed order.

    Refuses, naming the folder, a layout it cannot read: no train/ or val/, a
    split without class subfolders, a class folder without images, train and
    val with different classes.
    """
    if not root.is_dir():
        raise DatasetError(f"image folder '{root}' not found; set data.path to a folder that holds train/<class>/ and val/<class>/")
    classes: dict[str, list[str]] = {}
    for _, folder_name in SPLITS:
        folder = root / folder_name
        if not folder.is_dir():
            raise DatasetError(f"image folder '{root}' has no {folder_name}/ subfolder; expected "
                               f"{root / 'train'}/<class>/*.jpg and {root / 'val'}/<class>/*.jpg")
        names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
        if not names:
            raise DatasetError(f"'{folder}' has no class subfolders; put each class's images into {folder}/<class name>/")
        classes[folder_name] = names
    train, val = set(classes["train"]), set(classes["val"])
    if train != val:
        only_train, only_val = sorted(train - val), sorted(val - train)
        raise DatasetError(
            f"train/ and val/ of '{root}' have different classes: only in train/: {_few(only_train)}; "
            f"only in val/: {_few(only_val)}. Both need the same class folders."
        )
    names = classes["train"]
    files: dict[str, list[tuple[Path, int]]] = {}
    for split, folder_name in SPLITS:
        pairs = []
        for label, name in enumerate(names):
            found = _images_under(root / folder_name / name)
            if not found:
                raise DatasetError(f"class folder '{root / folder_name / name}' holds no images "
                                   f"(looked for {', '.join(IMAGE_EXTENSIONS)})")
            pairs += [(f, label) for f in found]
        files[split] = pairs
    return names, files


def _few(items: list[str], n: int = 5) -> str:
    return "none" if not items else ", ".join(items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _images_under(folder: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out += [Path(dirpath) / f for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")]
    return sorted(out)


def cache_key(root: Path, files: dict[str, list[tuple[Path, int]]], image_size: int, resize: str) -> str:
    """Hex digest of everything the decoded tensors depend on."""
    h = hashlib.sha256()
    h.update(json.dumps([CACHE_VERSION, str(root.resolve()), image_size, resize]).encode())
    for split, pairs in files.items():
        h.update(split.encode())
        for path, label in pairs:
            st = path.stat()
            h.update(f"{path.relative_to(root)}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def decode_image(path: Path, size: int, resize: str) -> np.ndarray:
    """One image file -> uint8 S x S x 3 (RGB). Grey, palette and RGBA images become RGB."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size (fast)
        im = im.convert("RGB")
        if resize == "center-crop":
            # crop first: resize(box=...) would let the filter read pixels outside the square
            w, h = im.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            im = im.crop((left, top, left + side, top + side))
        return np.array(im.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def decode_all(pairs: list[tuple[Path, int]], size: int, resize: str, desc: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode every file into one uint8 N x 3 x S x S tensor, in threads (Pillow decodes outside the GIL)."""
    from PIL import Image
    from tqdm.auto import tqdm

    x = torch.empty((len(pairs), 3, size, size), dtype=torch.uint8)
    y = torch.tensor([label for _, label in pairs], dtype=torch.int64)

    def one(i: int) -> None:
        path = pairs[i][0]
        try:
            x[i] = torch.from_numpy(decode_image(path, size, resize)).permute(2, 0, 1)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DatasetError(f"cannot read image '{path}' ({type(e).__name__}: {e}); "
                               "replace or delete the file, then run again") from None

    pool = ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1))
    try:
        with tqdm(total=len(pairs), desc=desc, unit="img", leave=False, disable=len(pairs) < SHOW_PROGRESS_FROM) as bar:
            for _ in pool.map(one, range(len(pairs))):  # the first failure is raised here, by name
                bar.update()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # a bad file stops the decoding of the rest
    return x, y


def cache_path(cfg, root: Path, key: str) -> Path:
    return Path(os.path.expanduser(cfg.root)) / "imagefolder" / f"{root.resolve().name}-{cfg.image_size}px-{key[:16]}.pt"


def _read_cache(path: Path, key: str) -> Dataset | None:
    """The cached dataset, or None when absent, unreadable or made for other files."""
    if not path.is_file():
        return None
    try:
        # mmap: a cache of many GB is paged in as it is used, not read twice
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if state.get("key") != key:
            return None
        return Dataset(state["x_train"], state["y_train"], state["x_test"], state["y_test"],
                       [str(n) for n in state["class_names"]])
    except Exception as e:  # a damaged cache is only a slower start: decode again and rewrite it
        warnings.warn(f"ignoring the unreadable image cache {path} ({type(e).__name__}: {e}); decoding again",
                      RuntimeWarning, stacklevel=3)
        return None


def _write_cache(path: Path, key: str, ds: Dataset) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "x_train": ds.x_train, "y_train": ds.y_train, "x_test": ds.x_test,
                    "y_test": ds.y_test, "class_names": list(ds.class_names)}, tmp)
        os.replace(tmp, path)  # atomic: a killed run never leaves half a cache under the real name
    except OSError as e:  # a read-only data.root costs the next run's speed, not this run
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not write the image cache {path} ({e}); the next run decodes again. "
                      "Point data.root at a writable folder, or set data.cache=false.", RuntimeWarning, stacklevel=3)


@DATASETS.register("imagefolder")
def load_imagefolder(cfg) -> Dataset:
    """``cfg.path``/train/<class>/ and /val/<class>/ -> a Dataset of S x S images (see the module doc)."""
    root = Path(os.path.expanduser(cfg.path or ""))
    names, files = scan(root)
    key = cache_key(root, files, cfg.image_size, cfg.resize)
    path = cache_path(cfg, root, key)
    if cfg.cache:
        cached = _read_cache(path, key)
        if cached is not None:
            return cached
    x_train, y_train = decode_all(files["train"], cfg.image_size, cfg.resize, f"decoding {root / 'train'}")
    x_test, y_test = decode_all(files["test"], cfg.image_size, cfg.resize, f"decoding {root / 'val'}")
    ds = Dataset(x_train, y_train, x_test, y_test, names)
    if cfg.cache:
        _write_cache(path, key, ds)
    return ds
