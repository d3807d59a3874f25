"""Collage exemplars (the study, section 5.1): geometry, sources, counts, seeding, end to end.

Source images are made distinguishable: channel 0 of image i is the constant
tag i (unique across classes), channels 1 and 2 are random, so a 16x16 patch
fixes both the image it came from and where in that image it was cut.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from cilab.memory import EXEMPLAR_BUILDERS, BuildContext
from cilab.memory.collage import choose_groups, collage_center_crop, collage_random_crop, collage_resized, tile_2x2

KINDS = ["collage-resized", "collage-random-crop", "collage-center-crop"]
QUADRANTS = [(0, 0), (0, 1), (1, 0), (1, 1)]  # image 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right


def tagged_images(first_tag: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[:, 0] = torch.arange(first_tag, first_tag + n, dtype=torch.uint8)[:, None, None]
    return x


def two_classes(n0: int = 40, n1: int = 48) -> dict[int, torch.Tensor]:
    """Labels 3 and 7 (not 0..C-1, as after the first task), tags 0..n0-1 and 100..100+n1-1."""
    return {3: tagged_images(0, n0, seed=1), 7: tagged_images(100, n1, seed=2)}


def make_ctx(seed: int = 0, log: list | None = None) -> BuildContext:
    return BuildContext(cfg=None, model=None, features=None, normalizer=None,
                        generator=torch.Generator().manual_seed(seed), num_classes=10,
                        log=(log.append if log is not None else print))


def quadrant(c: torch.Tensor, q: int) -> torch.Tensor:
    """Quadrant q of one collage (C x 32 x 32) or of a batch (G x C x 32 x 32)."""
    r, col = QUADRANTS[q]
    return c[..., r * 16:(r + 1) * 16, col * 16:(col + 1) * 16]


def source_tags(collages: torch.Tensor) -> torch.Tensor:
    """G x 4 tags, read at the centre of each quadrant of channel 0 (exact even after the resize:
    the antialiasing filter there only sees pixels of that one constant-tag image)."""
    return torch.stack([collages[:, 0, r * 16 + 8, c * 16 + 8] for r, c in QUADRANTS], 1).long()


def by_tag(class_images: dict[int, torch.Tensor]) -> dict[int, tuple[int, torch.Tensor]]:
    return {int(img[0, 0, 0]): (c, img) for c, imgs in class_images.items() for img in imgs}


def test_tile_2x2_quadrant_order():
    quads = torch.arange(4, dtype=torch.uint8).view(1, 4, 1, 1, 1).expand(2, 4, 3, 5, 5).contiguous()
    out = tile_2x2(quads)
    assert out.shape == (2, 3, 10, 10)
    for q, (r, c) in enumerate(QUADRANTS):
        assert (out[:, :, r * 5:(r + 1) * 5, c * 5:(c + 1) * 5] == q).all()


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_sources_distinct_and_from_own_class(kind):
    imgs = two_classes()
    m = 6
    out = EXEMPLAR_BUILDERS[kind](make_ctx(0), imgs, m)
    assert sorted(out) == [3, 7]
    tags = by_tag(imgs)
    for c, coll in out.items():
        assert coll.dtype == torch.uint8 and coll.shape == (m, 3, 32, 32) and coll.device == imgs[c].device
        src = source_tags(coll).flatten().tolist()
        assert len(src) == 4 * m and len(set(src)) == 4 * m  # no image used twice
        assert all(tags[s][0] == c for s in src)  # only images of its own class


def test_center_crop_quadrants_are_the_centres_of_their_sources():
    imgs = two_classes()
    out = EXEMPLAR_BUILDERS["collage-center-crop"](make_ctx(0), imgs, 8)
    tags = by_tag(imgs)
    for coll in out.values():
        for g, srcs in enumerate(source_tags(coll).tolist()):
            for q, s in enumerate(srcs):
                assert torch.equal(quadrant(coll[g], q), tags[s][1][:, 8:24, 8:24])


def test_random_crop_quadrants_are_16x16_patches_of_their_sources():
    imgs = two_classes()
    out = EXEMPLAR_BUILDERS["collage-random-crop"](make_ctx(0), imgs, 8)
    tags = by_tag(imgs)
    offsets = []
    for coll in out.values():
        for g, srcs in enumerate(source_tags(coll).tolist()):
            for q, s in enumerate(srcs):
                patches = tags[s][1].unfold(1, 16, 1).unfold(2, 16, 1)  # 3 x 17 x 17 x 16 x 16: every offset
                hit = (patches == quadrant(coll[g], q)[:, None, None]).all(-1).all(-1).all(0)
                assert hit.sum() == 1  # exactly one offset (random content), inside the image
                offsets.append(tuple(hit.nonzero()[0].tolist()))
    # 64 patches: the offsets are spread over the image, not all at one place
    ys, xs = zip(*offsets)
    assert len(set(offsets)) > 20 and min(ys) < 8 < max(ys) and min(xs) < 8 < max(xs)


def test_resized_is_the_antialiased_resize_of_the_mosaic():
    imgs = two_classes()
    out = EXEMPLAR_BUILDERS["collage-resized"](make_ctx(0), imgs, 5)
    tags = by_tag(imgs)
    for coll in out.values():
        for g, srcs in enumerate(source_tags(coll).tolist()):
            a, b, c, d = (tags[s][1] for s in srcs)
            mosaic = torch.cat([torch.cat([a, b], 2), torch.cat([c, d], 2)], 1)  # 3 x 64 x 64
            expect = F.interpolate(mosaic[None].float(), size=(32, 32), mode="bilinear", antialias=True)
            assert torch.equal(coll[g], expect[0].round().clamp(0, 255).to(torch.uint8))
            # independent reference: PIL's bilinear (antialiased) downscale, to rounding
            pil = np.stack([np.asarray(Image.fromarray(ch.numpy()).resize((32, 32), Image.BILINEAR)) for ch in mosaic])
            assert (coll[g].int() - torch.from_numpy(pil).int()).abs().max() <= 1


@pytest.mark.parametrize("kind", KINDS)
def test_builder_follows_the_documented_procedure(kind):
    """One class: draw 4m distinct images with the generator, group in order, then collage."""
    imgs = tagged_images(0, 30, seed=3)
    got = EXEMPLAR_BUILDERS[kind](make_ctx(5), {0: imgs}, 4)[0]
    g = torch.Generator().manual_seed(5)
    idx = choose_groups(len(imgs), 4, g)
    assert idx.shape == (4, 4) and len(set(idx.flatten().tolist())) == 16
    make = {"collage-resized": collage_resized, "collage-random-crop": collage_random_crop,
            "collage-center-crop": collage_center_crop}[kind]
    assert torch.equal(got, make(imgs[idx], g))
    assert source_tags(got).tolist() == idx.tolist()  # image i of a group lands in quadrant i


@pytest.mark.parametrize("kind", KINDS)
def test_fewer_images_than_4m_gives_floor_n_over_4_and_says_so(kind):
    log: list[str] = []
    imgs = {0: tagged_images(0, 10, seed=1), 1: tagged_images(50, 50, seed=2), 2: tagged_images(150, 3, seed=3)}
    out = EXEMPLAR_BUILDERS[kind](make_ctx(0, log), imgs, 3)
    assert [len(out[c]) for c in (0, 1, 2)] == [2, 3, 0]
    assert out[2].shape == (0, 3, 32, 32) and out[2].dtype == torch.uint8
    assert len(source_tags(out[0]).unique()) == 8
    assert len(log) == 1
    line = log[0]
    assert kind in line and "class 0: 10 images -> 2" in line and "class 2: 3 images -> 0" in line
    assert "class 1" not in line


def test_no_log_line_when_images_suffice():
    log: list[str] = []
    out = EXEMPLAR_BUILDERS["collage-center-crop"](make_ctx(0, log), two_classes(), 10)
    assert [len(v) for v in out.values()] == [10, 10] and log == []


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_collages(kind):
    imgs = two_classes()
    a = EXEMPLAR_BUILDERS[kind](make_ctx(11), imgs, 6)
    b = EXEMPLAR_BUILDERS[kind](make_ctx(11), imgs, 6)
    c = EXEMPLAR_BUILDERS[kind](make_ctx(12), imgs, 6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_end_to_end_random_crop_on_digits(tmp_path):
    from cilab.config import build_config
    from cilab.data.datasets import load_dataset
    from cilab.experiment import run

    cfg = build_config("collage-random-crop", ["data.name=digits", "scenario.num_tasks=5", "train.epochs=1",
                                               "train.milestones=[]", "memory.size=40", "train.batch_size=64"])
    run(cfg, tmp_path / "run", progress=False)
    ck = torch.load(tmp_path / "run/checkpoints/task_05.pt", weights_only=False)
    per_class = ck["memory"]["per_class"]
    assert sorted(per_class) == list(range(10))
    assert all(x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32) for x in per_class.values())
    assert {len(x) for x in per_class.values()} == {4}  # balanced: m = 40 // 10
    assert sum(len(x) for x in per_class.values()) <= 40
    # Each quadrant is a 16x16 patch of a training image of its own class (output index i is
    # the i-th class of the seeded order). Searched at every offset of every image at once:
    # sum of squared differences = |patch|^2 - 2 <patch, quad> + |quad|^2, as float64
    # convolutions (exact on these integers), zero where the quadrant was cut.
    data = load_dataset(cfg.data)
    order = ck["class_order"]  # original label of output i
    for out_idx, coll in per_class.items():
        own = data.x_train[data.y_train == order[out_idx]].double()
        quads = torch.cat([quadrant(coll, q) for q in range(4)]).double()  # 4m x 3 x 16 x 16
        energy = F.conv2d(own.pow(2), torch.ones(1, 3, 16, 16, dtype=torch.float64))  # N x 1 x 17 x 17
        ssd = energy - 2 * F.conv2d(own, quads) + quads.pow(2).sum((1, 2, 3))[None, :, None, None]
        assert (ssd.amin((0, 2, 3)) == 0).all()
