"""Collage exemplars: four training images of a class combined into one exemplar.

The study's first attempt at artificial exemplars (section 5.1): "combine four
images in a collage which will constitute a unique exemplar sample ... The
intuition behind this proposal is try to make images which could give more
information about the class they represent letting the network extracting more
features." Three variants are registered as ``memory.kind``:

- ``collage-resized``: the 2x2 mosaic of the four full images (64x64), resized
  back to 32x32 ("each group is exploited to make a single collage exemplar
  which is resized to have an image size of 32x32");
- ``collage-random-crop``: a random 16x16 patch of each image, tiled 2x2, to
  avoid the loss of resolution of the resize ("we tried to make the collage
  exemplars combining random 16x16 patches of the selected images");
- ``collage-center-crop``: the central 16x16 patch of each image, tiled 2x2
  ("the central area of the image is systematically selected").

Common to all three: "4*m images for each new class are randomly selected, with
the constrain that no image is repeated among the collages, to maximize
generalization. [...] the chosen images are sequentially grouped four by four".
A class with fewer than 4*m images gets floor(N/4) collages: the study "got
only 1250" instead of 2000 on its first task (5000 images, 4 per collage), and
says so; we log it.

Quadrant order, for every variant: image 0 top-left, 1 top-right, 2 bottom-left,
3 bottom-right. Every random draw (the images, the patch offsets) comes from
the run's seeded generator, so the same seed gives the same collages. The
collages of a class are in random order, so when the memory later cuts a class
to its first m' exemplars it keeps a random subset (there is no herding order
to respect here).

Everything is batched tensor work on the device: the only Python loop is over
the new classes of the task.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .selection import EXEMPLAR_BUILDERS, BuildContext

IMAGES_PER_COLLAGE = 4  # a 2x2 mosaic

# groups (G x 4 x C x H x W, uint8) and the generator -> G x C x H x W uint8 collages
CollageFn = Callable[[torch.Tensor, "torch.Generator | None"], torch.Tensor]


def choose_groups(n: int, k: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None) -> torch.Tensor:
    """Indices (k x 4) of 4*k distinct images among n, drawn at random, grouped four by four in order.

    Section 5.1: the images are "randomly selected, with the constrain that no
    image is repeated among the collages" and "sequentially grouped four by
    four". Needs 4*k <= n.
    """
    if IMAGES_PER_COLLAGE * k > n:
        raise ValueError(f"{k} collages need {IMAGES_PER_COLLAGE * k} distinct images, only {n} given")
    if device is None and generator is not None:
        device = generator.device  # a CUDA generator draws CUDA indices
    perm = torch.randperm(n, generator=generator, device=device)
    return perm[: IMAGES_PER_COLLAGE * k].view(k, IMAGES_PER_COLLAGE)


def tile_2x2(quads: torch.Tensor) -> torch.Tensor:
    """G x 4 x C x h x w -> G x C x 2h x 2w: quadrants 0 1 on top, 2 3 below."""
    g, four, c, h, w = quads.shape
    assert four == IMAGES_PER_COLLAGE
    # [g, row, col, c, y, x] -> [g, c, row, y, col, x] -> out[g, c, row*h + y, col*w + x]
    return quads.view(g, 2, 2, c, h, w).permute(0, 3, 1, 4, 2, 5).reshape(g, c, 2 * h, 2 * w)


def crop(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Per-image crops: N x C x H x W, offsets (N,) -> N x C x height x width, one gather, no loop."""
    n, c = images.shape[:2]
    dev = images.device
    rows = (top[:, None] + torch.arange(height, device=dev))[:, None, :, None]  # N x 1 x h x 1
    cols = (left[:, None] + torch.arange(width, device=dev))[:, None, None, :]  # N x 1 x 1 x w
    return images[torch.arange(n, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows, cols]


def collage_resized(groups: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The 2x2 mosaic of the full images (2H x 2W), resized to H x W.

    Bilinear with antialiasing (a 2x reduction without it would just drop
    every other pixel), rounded back to uint8 so it is stored and augmented
    like real images.
    """
    h, w = groups.shape[-2:]
    mosaic = tile_2x2(groups).float()
    small = F.interpolate(mosaic, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return small.round().clamp_(0, 255).to(torch.uint8)


def collage_random_crop(groups: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A uniformly random (H/2 x W/2) patch of each image (16x16 for CIFAR), tiled 2x2."""
    g, four, c, h, w = groups.shape
    ph, pw = h // 2, w // 2
    flat = groups.reshape(g * four, c, h, w)
    top = torch.randint(0, h - ph + 1, (g * four,), generator=generator, device=groups.device)
    left = torch.randint(0, w - pw + 1, (g * four,), generator=generator, device=groups.device)
    return tile_2x2(crop(flat, top, left, ph, pw).view(g, four, c, ph, pw))


def collage_center_crop(groups: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The central (H/2 x W/2) patch of each image (rows/cols 8..24 for 32x32), tiled 2x2."""
    h, w = groups.shape[-2:]
    ph, pw = h // 2, w // 2
    top, left = (h - ph) // 2, (w - pw) // 2
    return tile_2x2(groups[..., top: top + ph, left: left + pw])


COLLAGES: dict[str, CollageFn] = {
    "collage-resized": collage_resized,
    "collage-random-crop": collage_random_crop,
    "collage-center-crop": collage_center_crop,
}


def build_collages(ctx: BuildContext, class_images: dict[int, torch.Tensor], m: int,
                   make: CollageFn, name: str = "collage") -> dict[int, torch.Tensor]:
    """Up to m collages per new class, each from 4 distinct images of that class.

    The images of all classes are chosen first (one ``randperm`` per class),
    then all collages of the task are made in one batched call of ``make``.
    Classes with fewer than 4*m images get floor(N/4) collages, reported in
    one log line.
    """
    labels = sorted(class_images)
    if not labels:
        return {}
    groups, counts, short = [], [], []
    for c in labels:  # the one Python loop: over the classes of the task
        imgs = class_images[c]
        k = max(0, min(m, len(imgs) // IMAGES_PER_COLLAGE))
        idx = choose_groups(len(imgs), k, ctx.generator, imgs.device)
        groups.append(imgs[idx])  # k x 4 x C x H x W
        counts.append(k)
        if k < m:
            short.append(f"class {c}: {len(imgs)} images -> {k}")
    if short:
        # Section 5.1: 5000 images in the first task gave "only 1250" collages instead of 2000.
        ctx.log(f"memory {name}: m={m} collages per class need {IMAGES_PER_COLLAGE * m} distinct images; "
                f"fewer collages for {len(short)} class(es) ({'; '.join(short)})")
    allg = torch.cat(groups)
    out = make(allg, ctx.generator) if len(allg) else allg[:, 0]
    return dict(zip(labels, out.split(counts)))


def _register(name: str, make: CollageFn) -> None:
    def build(ctx: BuildContext, class_images: dict[int, torch.Tensor], m: int) -> dict[int, torch.Tensor]:
        return build_collages(ctx, class_images, m, make, name)

    build.__name__ = "build_" + name.replace("-", "_")
    build.__doc__ = f"``memory.kind: {name}`` (study section 5.1): {make.__doc__.splitlines()[0]}"
    EXEMPLAR_BUILDERS.register(name)(build)


for _name, _make in COLLAGES.items():
    _register(_name, _make)
