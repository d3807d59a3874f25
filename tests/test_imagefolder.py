"""data.name=imagefolder: layout, decoding, cache, errors before work, and a ResNet-18 run end to end."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cilab.config import ConfigError, DataConfig, build_config
from cilab.data import DatasetError, load_dataset
from cilab.data import imagefolder


def write_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def make_folder(root, n_classes=3, n_train=2, n_val=1, size=8, seed=0):
    """root/train/cNN/*.png, root/val/cNN/*.png; class k is the solid colour (10k, 255-10k, 7k) plus noise 0..3."""
    rng = np.random.default_rng(seed)
    for k in range(n_classes):
        for split, n in (("train", n_train), ("val", n_val)):
            for i in range(n):
                img = np.empty((size, size, 3), np.int64)
                img[:] = (10 * k, 255 - 10 * k, 7 * k)
                img = np.clip(img + rng.integers(0, 4, img.shape), 0, 255)
                write_png(root / split / f"c{k:02d}" / f"{i}.png", img)
    return root


def cfg_for(root, tmp_path, **kw):
    return DataConfig(name="imagefolder", path=str(root), root=str(tmp_path / "cache"), **kw)


def test_layout_labels_and_pixels(tmp_path):
    root = make_folder(tmp_path / "imgs", n_classes=3, n_train=2, n_val=1)
    # a file of another kind and a hidden folder are not images of a class
    (root / "train" / "c00" / "boxes.txt").write_text("x")
    ds = load_dataset(cfg_for(root, tmp_path, image_size=8))
    assert ds.class_names == ["c00", "c01", "c02"]
    assert ds.x_train.shape == (6, 3, 8, 8) and ds.x_test.shape == (3, 3, 8, 8)
    assert ds.y_train.tolist() == [0, 0, 1, 1, 2, 2] and ds.y_test.tolist() == [0, 1, 2]
    # class 2's green channel is 235 + noise in 0..3; at its own size the PNG comes back exactly
    g = ds.x_train[4, 1]
    assert int(g.min()) >= 235 and int(g.max()) <= 238


def test_images_in_subfolders_of_a_class_are_found(tmp_path):
    # Tiny-ImageNet keeps train/<wnid>/images/*.JPEG
    root = make_folder(tmp_path / "imgs", n_classes=2)
    write_png(root / "train" / "c01" / "images" / "deep.png", np.zeros((8, 8, 3)))
    ds = load_dataset(cfg_for(root, tmp_path, image_size=8))
    assert ds.y_train.tolist() == [0, 0, 1, 1, 1]


def test_center_crop_keeps_the_middle_and_squash_keeps_everything(tmp_path):
    # 96 x 32: red | green | blue thirds. The centre square is exactly the green third.
    img = np.zeros((32, 96, 3), np.uint8)
    img[:, :32, 0] = 255
    img[:, 32:64, 1] = 255
    img[:, 64:, 2] = 255
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        write_png(root / split / "a" / "x.png", img)
    crop = load_dataset(cfg_for(root, tmp_path, image_size=12, cache=False))
    assert crop.x_train[0].permute(1, 2, 0).reshape(-1, 3).unique(dim=0).tolist() == [[0, 255, 0]]
    squash = load_dataset(cfg_for(root, tmp_path, image_size=12, resize="squash", cache=False))
    row = squash.x_train[0, :, 6]  # 3 x 12: the thirds are 4 columns each
    assert row[:, 0].tolist() == [255, 0, 0] and row[:, 6].tolist() == [0, 255, 0] and row[:, 11].tolist() == [0, 0, 255]


def test_grey_and_rgba_images_become_rgb(tmp_path):
    root = tmp_path / "imgs"
    for split in ("train", "val"):
        (root / split / "g").mkdir(parents=True)
        Image.new("L", (8, 8), 77).save(root / split / "g" / "grey.png")
        Image.new("RGBA", (8, 8), (1, 2, 3, 0)).save(root / split / "g" / "rgba.png")
    ds = load_dataset(cfg_for(root, tmp_path, image_size=8))
    assert ds.x_train[0, :, 0, 0].tolist() == [77, 77, 77] and ds.x_train[1, :, 0, 0].tolist() == [1, 2, 3]


def test_second_load_comes_from_the_cache_and_a_changed_file_is_decoded_again(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "imgs", n_classes=2)
    cfg = cfg_for(root, tmp_path, image_size=8)
    first = load_dataset(cfg)
    files = list((tmp_path / "cache" / "imagefolder").glob("*.pt"))
    assert len(files) == 1 and files[0].name.startswith("imgs-8px-")
    state = torch.load(files[0], weights_only=True)  # data, never code
    assert torch.equal(state["x_train"], first.x_train)

    def no_decoding(*a, **k):
        raise AssertionError("decoded although the cache is valid")

    monkeypatch.setattr(imagefolder, "decode_all", no_decoding)
    again = load_dataset(cfg)
    assert torch.equal(again.x_train, first.x_train) and again.class_names == first.class_names
    monkeypatch.undo()

    # rewrite one image (same size, new content): the key changes with its mtime
    target = root / "train" / "c01" / "0.png"
    write_png(target, np.full((8, 8, 3), 3))
    st = target.stat()
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = load_dataset(cfg)
    assert changed.x_train[2].eq(3).all()
    assert len(list((tmp_path / "cache" / "imagefolder").glob("*.pt"))) == 2


@pytest.mark.parametrize("breakage, message", [
    (lambda r: (r / "val").rename(r / "validation"), "has no val/ subfolder"),
    (lambda r: [p.rename(r / "train" / f"{p.parent.name}{p.name}") for p in list((r / "train").glob("*/*.png"))]
     and [d.rmdir() for d in (r / "train").iterdir() if d.is_dir()], "has no class subfolders"),
    (lambda r: (r / "train" / "c01" / "1.png").write_bytes(b"not a png"), r"cannot read image '.*c01/1\.png'"),
    (lambda r: [p.unlink() for p in (r / "val" / "c02").iterdir()] and (r / "val" / "c02").rmdir(),
     r"different classes: only in train/: c02; only in val/: none"),
    (lambda r: [p.unlink() for p in (r / "train" / "c00").iterdir()], r"class folder '.*train/c00' holds no images"),
])
def test_bad_folders_are_refused_in_one_line_naming_the_problem(tmp_path, breakage, message):
    root = make_folder(tmp_path / "imgs", n_classes=3)
    breakage(root)
    with pytest.raises(DatasetError, match=message) as err:
        load_dataset(cfg_for(root, tmp_path, image_size=8))
    assert "\n" not in str(err.value)


def test_a_bad_image_stops_the_run_before_the_run_folder_is_made(tmp_path):
    from cilab.experiment import run

    root = make_folder(tmp_path / "imgs", n_classes=2)
    (root / "val" / "c00" / "0.png").write_bytes(b"\x89PNG broken")
    cfg = build_config("finetune", ["data.name=imagefolder", f"data.path={root}", f"data.root={tmp_path / 'cache'}",
                                    "scenario.num_tasks=1", "train.epochs=1", "train.milestones=[]"])
    with pytest.raises(DatasetError, match=r"cannot read image '.*val/c00/0\.png'"):
        run(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("overrides, message", [
    (["data.name=imagefolder"], "data.name=imagefolder needs data.path"),
    (["data.name=imagefolder", "data.path=x", "data.image_size=16", "model.name=resnet18-imagenet"],
     r"model.name=resnet18-imagenet cannot take data.image_size=16: it needs images of at least 32x32"),
    (["data.name=imagefolder", "data.path=x", "data.image_size=2"], r"model.name=resnet32 cannot take data.image_size=2"),
    (["data.name=digits", "data.image_size=64"], r"data.image_size=64 only applies to data.name=imagefolder"),
    (["data.name=imagefolder", "data.path=x", "data.image_size=64", "memory.kind=deepinversion"],
     "memory.kind=deepinversion synthesises 32x32 images"),
    (["data.name=imagefolder", "data.path=x", "data.resize=stretch"], "'data.resize' is 'stretch'"),
    (["data.placement=gpu"], "'data.placement' is 'gpu'"),
])
def test_config_refuses_sizes_and_keys_before_loading(overrides, message):
    with pytest.raises(ConfigError, match=message):
        build_config("icarl", overrides)


def test_twenty_class_image_folder_with_resnet18_end_to_end(tmp_path):
    from cilab.experiment import run

    # 32x32 PNGs decoded to 16x16: ResNet-18 costs 40 times ResNet-32's arithmetic, and the
    # CPU tests must stay quick; the resize is part of what is tested
    root = make_folder(tmp_path / "imgs", n_classes=20, n_train=6, n_val=2, size=32)
    cfg = build_config("icarl", [
        "data.name=imagefolder", f"data.path={root}", f"data.root={tmp_path / 'cache'}", "data.image_size=16",
        "model.name=resnet18",
        "scenario.num_tasks=2", "train.epochs=1", "train.milestones=[]", "train.batch_size=32", "train.lr=0.1",
        "memory.size=40",
    ])
    metrics = run(cfg, tmp_path / "out", progress=False)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert saved["status"] == "complete" and saved["dataset"] == "imagefolder"
    assert saved["class_names"] == [f"c{k:02d}" for k in saved["class_order"]]
    for clf in ("nme", "fc"):
        assert len(saved[clf]["accuracy"]) == 2 and saved[clf]["final_accuracy"] == metrics[clf]["final_accuracy"]
    # the val images reached the right classes: every seen class has exactly its 2 val images
    conf = np.load(tmp_path / "out" / "confusion.npz")
    assert conf["nme_task01"].sum(axis=1).tolist() == [2] * 10
    assert conf["fc_task02"].sum(axis=1).tolist() == [2] * 20
    # iCaRL's memory: 40 exemplars over 20 classes = 2 per class, all 6 train images' classes kept
    assert saved["memory_per_class"] == [4, 2] and saved["memory_total"] == [40, 40]
