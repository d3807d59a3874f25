"""CIFAR ResNets (He et al. 2016, section 4.2): 3 stages of n basic blocks, 16/32/64 channels.

ResNet-32 is n=5 (6n+2 = 32 layers, ~0.46M parameters). Shortcuts that change
shape subsample and zero-pad the channels ("option A"), as in the original
CIFAR ResNets and iCaRL, so the parameter count stays that of the paper.
The study: "We consider the network up to the last layer as a feature
extractor ... an output of 64x1 which is given to the last fully connected
layer ... made of 100 outputs from the beginning".
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from typing import NamedTuple

from ..registry import Registry

MODELS: Registry = Registry("model")


class Outputs(NamedTuple):
    """What ``model(x, with_features=True)`` gives a loss: logits (B x O) and the features the head reads (B x D).

    Every backbone follows this contract (``features(x)``, ``head``,
    ``feature_dim`` and ``forward(x, with_features)``), so every classifier
    and memory builder, and every method but PODNet, works on any of them.
    cilab's own ResNets (``StagedResNet``) also give ``stages(x)`` and the
    ``return_stages`` flag, which PODNet needs.
    """

    logits: torch.Tensor
    features: torch.Tensor
    # The stage outputs (B x C x H x W each), only when the model's
    # ``return_stages`` is set (PODNet): empty by default, so the plain step
    # neither keeps nor passes them.
    stages: tuple = ()


class Backbone(nn.Module):
    """What every cilab network is: ``features(x)`` (N x feature_dim), ``head`` (a module), and
    ``forward(x, with_features=False)``: logits, or ``Outputs(logits, features)`` for the
    training step, whose losses may read the features. Subclass it and define ``features``
    and ``head``."""

    feature_dim: int

    def features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def add_head(self, feature_dim: int, num_classes: int) -> None:
        """The linear head on ``feature_dim`` features, then He initialisation of every convolution
        (fan-out, as in He et al. 2016): what cilab's ResNets do last in their constructors."""
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor, with_features: bool = False):
        f = self.features(x)
        z = self.head(f)
        return Outputs(z, f) if with_features else z


class BasicBlock(nn.Module):
    """Two 3x3 convolutions and an option-A shortcut (strided, zero-padded channels).

    ``groups`` = n side-by-side copies of the block in one module, for n fused
    networks (models/grouped.py): cin / cout are each copy's channels, every
    convolution is grouped, and each copy's shortcut pads its own channels.
    """

    def __init__(self, cin: int, cout: int, stride: int, relu: bool = True, groups: int = 1):
        super().__init__()
        self.relu = relu  # False: the block's output is the residual sum, unrectified (LUCIR's last block)
        self.conv1 = nn.Conv2d(groups * cin, groups * cout, 3, stride, 1, bias=False, groups=groups)
        self.bn1 = nn.BatchNorm2d(groups * cout)
        self.conv2 = nn.Conv2d(groups * cout, groups * cout, 3, 1, 1, bias=False, groups=groups)
        self.bn2 = nn.BatchNorm2d(groups * cout)
        self.pad = cout - cin
        self.stride, self.groups, self.cin = stride, groups, cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = x[:, :, :: self.stride, :: self.stride]
            pad = (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2)
            if self.groups == 1:
                shortcut = F.pad(shortcut, pad)
            else:  # pad each copy's channels, not the stack's ends
                b, _, h, w = shortcut.shape
                shortcut = F.pad(shortcut.reshape(b, self.groups, self.cin, h, w), pad).reshape(b, -1, h, w)
        out = out + shortcut  # out first: the sum keeps out's memory format (channels_last)
        return F.relu(out) if self.relu else out


class StagedResNet(Backbone):
    """A ResNet as cilab's ResNets are built: a stem, then ``layers`` (one flat
    nn.Sequential of blocks), whose stages end at ``stage_ends``, then global
    average pooling into ``feature_dim`` features and the head.

    ``stages(x)`` gives the output map of each stage (for PODNet's spatial
    distillation, t-SNE and feature plots); with ``return_stages`` set, the
    training forward ``model(x, with_features=True)`` returns them in
    ``Outputs.stages`` too. Off by default: the plain step keeps nothing extra.
    Subclasses define ``begin(x)`` (the stem) and set ``layers`` and ``stage_ends``.
    """

    return_stages: bool = False
    layers: nn.Sequential
    stage_ends: list[int]  # index one past the last block of each stage, into self.layers

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Images (normalised) -> feature vectors (the last stage's map, averaged over its positions)."""
        return self.layers(self.begin(x)).mean(dim=(2, 3))

    def stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images (normalised) -> the output map of each stage (B x C x H x W), first to last.

        The last map, averaged over its positions, is ``features(x)``.
        """
        x = self.begin(x)
        maps, start = [], 0
        for end in self.stage_ends:
            x = self.layers[start:end](x)
            maps.append(x)
            start = end
        return maps

    def forward(self, x: torch.Tensor, with_features: bool = False):
        if self.return_stages and with_features:
            maps = self.stages(x)
            f = maps[-1].mean(dim=(2, 3))
            return Outputs(self.head(f), f, tuple(maps))
        return super().forward(x, with_features)


class ResNetCifar(StagedResNet):
    """``last_relu=False`` drops the ReLU after the last block (``model.last_relu``), so
    features can be negative, as LUCIR and PODNet want for their cosine classifiers."""

    def __init__(self, blocks_per_stage: int, num_classes: int, widths=(16, 32, 64), last_relu: bool = True,
                 groups: int = 1):
        super().__init__()
        g = groups  # > 1: that many networks side by side (models/grouped.py), which set their own head
        self.conv1 = nn.Conv2d(3 * g, g * widths[0], 3, 1, 1, bias=False, groups=g)
        self.bn1 = nn.BatchNorm2d(g * widths[0])
        layers, cin = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks_per_stage):
                layers.append(BasicBlock(cin, w, 2 if (i > 0 and j == 0) else 1, groups=g))
                cin = w
        layers[-1].relu = last_relu
        self.layers = nn.Sequential(*layers)  # flat, as before: checkpoint keys unchanged
        self.stage_ends = [blocks_per_stage * (i + 1) for i in range(len(widths))]
        self.add_head(g * cin, num_classes)

    def begin(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


@MODELS.register("resnet32")
def resnet32(num_classes: int, image_size: int = 32, last_relu: bool = True) -> ResNetCifar:
    return ResNetCifar(5, num_classes, last_relu=last_relu)


@MODELS.register("resnet20")
def resnet20(num_classes: int, image_size: int = 32, last_relu: bool = True) -> ResNetCifar:
    return ResNetCifar(3, num_classes, last_relu=last_relu)


# Two stride-2 stages: below 4x4 the last stage would see padding only.
resnet32.min_image_size = resnet20.min_image_size = 4


def factory_options(name: str) -> set[str]:
    """Which of image_size and last_relu ``MODELS[name]``'s factory takes (a user's backbone made for
    one size takes neither)."""
    return set(inspect.signature(MODELS[name]).parameters) & {"image_size", "last_relu"}


def build_model(name: str, num_classes: int, image_size: int = 32, last_relu: bool = True) -> nn.Module:
    """``MODELS[name]`` called as ``(num_classes, image_size=..., last_relu=...)``, passing only the
    options the factory takes (:func:`factory_options`)."""
    factory = MODELS[name]
    params = factory_options(name)
    kwargs = {"image_size": image_size} if "image_size" in params else {}
    if "last_relu" in params:
        kwargs["last_relu"] = last_relu
    elif not last_relu:
        raise ValueError(f"model.name={name} has no last_relu option; leave model.last_relu=true")
    return factory(num_classes, **kwargs)


def create_model(cfg, num_classes: int, image_size: int = 32) -> nn.Module:
    """``cfg`` is the ``model`` section; ``image_size`` the side of the (square) input images."""
    return build_model(cfg.name, num_classes, image_size, cfg.last_relu)


def check_image_size(name: str, image_size: int) -> str | None:
    """Why model ``name`` cannot take ``image_size`` x ``image_size`` images, or None if it can.

    Before any data is loaded. A factory that declares ``min_image_size``
    (cilab's ResNets: their total downsampling) takes every size from there
    on. Any other (a user's backbone) is tried in a forward pass on the meta
    device (shapes only, no memory, no arithmetic), which catches a backbone
    that fails at this size (say a flatten into a layer sized for 32x32) and
    one whose ``features`` / ``head`` do not give the N x d / N x classes
    that every classifier expects.
    """
    factory = MODELS[name]
    least = getattr(factory, "min_image_size", None)
    if least is not None:
        # cilab's own backbones declare their limit (and take any size above it);
        # they skip the meta pass, whose first use costs seconds of imports per process
        if image_size < least:
            return f"it needs images of at least {least}x{least} (it downsamples by {least}); raise data.image_size"
        return None
    return _meta_forward_problem(factory, name, image_size)


@functools.lru_cache(maxsize=64)
def _meta_forward_problem(factory, name: str, image_size: int) -> str | None:
    # Cached by factory: every build_config validates, and a meta forward pass
    # of a ResNet still costs a tenth of a second of Python.
    try:
        with torch.device("meta"):
            model = build_model(name, 3, image_size)
            feats = model.features(torch.empty(2, 3, image_size, image_size))
            logits = model.head(feats)
    except Exception as e:  # any failure of a user's backbone is reported, not raised from deep inside
        return f"a forward pass on {image_size}x{image_size} images fails ({type(e).__name__}: {e})"
    # else it fails at the first training step, or where LUCIR, PODNet, DER build on it, after the data is loaded
    if "with_features" not in inspect.signature(model.forward).parameters:
        return ("its forward takes no with_features (the training step calls model(x, with_features=True)); "
                "subclass cilab.models.Backbone, which gives that forward, and define features and head")
    if getattr(model, "feature_dim", None) != feats.shape[1]:
        return (f"its feature_dim is {getattr(model, 'feature_dim', None)} but features() gives {feats.shape[1]}; "
                f"set self.feature_dim = {feats.shape[1]} (Backbone.add_head(d, num_classes) sets it and the head)")
    if feats.dim() != 2 or feats.shape[0] != 2 or tuple(logits.shape) != (2, 3):
        return (f"features() gave {tuple(feats.shape)} and head {tuple(logits.shape)} for 2 images and 3 classes; "
                "cilab needs features(x) -> N x d and head(features) -> N x classes")
    return None
