"""ResNet-18 (He et al. 2016, table 1): four stages of two basic blocks, 64/128/256/512 channels.

Two stems, as the CIL literature uses them:
- ``imagenet``: the paper's 7x7 convolution with stride 2 and a 3x3 max-pool,
  a total downsampling of 32 (ImageNet-100 at 224 px ends on 7x7 maps);
- ``cifar``: one 3x3 convolution with stride 1 and no max-pool, the variant
  PyCIL and most CIFAR code use for 32x32 input, where the ImageNet stem
  would shrink the image to 8x8 before the first block.

``model.name=resnet18`` picks the CIFAR stem for images of at most 32x32 and
the ImageNet stem for larger ones; ``resnet18-cifar`` and
``resnet18-imagenet`` fix the stem whatever the size. Shortcuts that change
shape are a strided 1x1 convolution with batch norm (the paper's "option B",
as torchvision), unlike ResNet-32's parameter-free option A. Like every cilab
backbone it splits into ``features(x)`` (512-d, after global average pooling)
and ``head`` (a linear layer), so every classifier and memory builder works
on it unchanged; ``stages(x)`` gives its four stages' maps (PODNet).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .resnet import MODELS, StagedResNet

WIDTHS = (64, 128, 256, 512)
CIFAR_STEM_MAX_SIZE = 32  # resnet18 (auto): the CIFAR stem up to this size, the ImageNet stem above


class ProjectionBlock(nn.Module):
    """Two 3x3 convolutions; a 1x1 convolution + BN on the shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int, relu: bool = True):
        super().__init__()
        self.relu = relu  # False: the block's output is the residual sum, unrectified (model.last_relu)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out = out + self.shortcut(x)
        return F.relu(out) if self.relu else out


class ResNet18(StagedResNet):
    def __init__(self, num_classes: int, stem: str = "cifar", last_relu: bool = True):
        super().__init__()
        if stem == "cifar":
            self.stem = nn.Sequential(nn.Conv2d(3, WIDTHS[0], 3, 1, 1, bias=False), nn.BatchNorm2d(WIDTHS[0]), nn.ReLU())
        elif stem == "imagenet":
            self.stem = nn.Sequential(nn.Conv2d(3, WIDTHS[0], 7, 2, 3, bias=False), nn.BatchNorm2d(WIDTHS[0]), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        else:
            raise ValueError(f"ResNet-18 stem '{stem}' is not one of: cifar, imagenet")
        self.stem_kind = stem
        layers, cin = [], WIDTHS[0]
        for i, w in enumerate(WIDTHS):
            for j in range(2):
                layers.append(ProjectionBlock(cin, w, 2 if (i > 0 and j == 0) else 1))
                cin = w
        layers[-1].relu = last_relu  # off for LUCIR's and PODNet's cosine heads: signed features
        self.layers = nn.Sequential(*layers)
        self.stage_ends = [2 * (i + 1) for i in range(len(WIDTHS))]
        self.add_head(cin, num_classes)

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        return self.stem(x)


@MODELS.register("resnet18")
def resnet18(num_classes: int, image_size: int = 32, last_relu: bool = True) -> ResNet18:
    return ResNet18(num_classes, "cifar" if image_size <= CIFAR_STEM_MAX_SIZE else "imagenet", last_relu)


@MODELS.register("resnet18-cifar")
def resnet18_cifar(num_classes: int, image_size: int = 32, last_relu: bool = True) -> ResNet18:
    return ResNet18(num_classes, "cifar", last_relu)


@MODELS.register("resnet18-imagenet")
def resnet18_imagenet(num_classes: int, image_size: int = 32, last_relu: bool = True) -> ResNet18:
    return ResNet18(num_classes, "imagenet", last_relu)


# The smallest input whose last stage still sees one pixel of image rather
# than of padding: the backbone's total downsampling (3 stride-2 stages, x4
# more in the ImageNet stem).
resnet18.min_image_size = resnet18_cifar.min_image_size = 8
resnet18_imagenet.min_image_size = 32
