"""Backbones: ResNet-18's two stems, the registry a user adds to, the image-size check."""

import pytest
import torch
import torch.nn as nn

from cilab.config import ConfigError, build_config
from cilab.models import MODELS, Backbone, ResNet18, build_model, check_image_size, create_model


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_resnet18_parameter_counts_match_the_published_ones():
    # torchvision's resnet18 (ImageNet stem, 1000 classes): 11,689,512 parameters;
    # the CIFAR variant with 10 classes (3x3 stem, no max-pool): 11,173,962
    # = 11,689,512 - (7*7 - 3*3)*3*64 - 513,000 + 5,130.
    assert n_params(build_model("resnet18-imagenet", 1000)) == 11_689_512
    assert n_params(build_model("resnet18-cifar", 10)) == 11_173_962


@pytest.mark.parametrize("size, stem", [(32, "cifar"), (16, "cifar"), (33, "imagenet"), (64, "imagenet")])
def test_resnet18_picks_its_stem_by_image_size(size, stem):
    m = build_model("resnet18", 5, size)
    assert m.stem_kind == stem


def test_resnet18_feature_maps_and_head_split():
    m = ResNet18(7, "cifar").eval()
    big = ResNet18(7, "imagenet").eval()
    with torch.no_grad():
        # CIFAR stem keeps the size, three stride-2 stages: 16x16 -> 2x2 maps of 512 channels
        assert m.layers(m.stem(torch.zeros(1, 3, 16, 16))).shape == (1, 512, 2, 2)
        # ImageNet stem: /4, then /8 more: 64x64 -> 2x2
        assert big.layers(big.stem(torch.zeros(1, 3, 64, 64))).shape == (1, 512, 2, 2)
        x = torch.randn(2, 3, 8, 8)
        f = m.features(x)
        assert f.shape == (2, 512) and m.feature_dim == 512
        torch.testing.assert_close(m(x), m.head(f))


class Tiny(Backbone):
    """A user's backbone: a convolution, averaged, and the head."""

    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.add_head(4, num_classes)  # .head and .feature_dim

    def features(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_a_users_backbone_registers_and_runs_through_config():

    name = "test-tiny-user-net"
    if name not in MODELS:
        @MODELS.register(name)
        def tiny(num_classes):  # no image_size argument: built for any size
            return Tiny(num_classes)

    cfg = build_config("finetune", [f"model.name={name}", "data.name=digits"])
    model = create_model(cfg.model, 10, 32)
    # LUCIR's preset drops the last ReLU: refused when the config is built, not when the network is
    with pytest.raises(ConfigError, match=rf"model.last_relu=false, but model.name={name}'s factory takes no "
                                          r"last_relu; give it a last_relu argument, or pass model.last_relu=true"):
        build_config("lucir", [f"model.name={name}", "data.name=digits"])
    build_config("lucir", [f"model.name={name}", "data.name=digits", "model.last_relu=true"])
    assert isinstance(model, Tiny) and model.head.out_features == 10


def test_a_backbone_that_fails_at_the_size_is_refused_by_config():
    class Fixed32(Backbone):  # flattens a 32x32 map into a layer sized for it
        def __init__(self, num_classes):
            super().__init__()
            self.fc = nn.Linear(3 * 32 * 32, 8)
            self.add_head(8, num_classes)

        def features(self, x):
            return self.fc(x.flatten(1))

    name = "test-fixed32-net"
    if name not in MODELS:
        MODELS.register(name)(lambda num_classes: Fixed32(num_classes))
    assert check_image_size(name, 32) is None
    with pytest.raises(ConfigError, match=rf"model.name={name} cannot take data.image_size=64: a forward pass on 64x64"):
        build_config("finetune", [f"model.name={name}", "data.name=imagefolder", "data.path=x", "data.image_size=64"])


def test_a_backbone_without_the_features_head_split_is_refused():
    name = "test-no-split-net"
    if name not in MODELS:
        MODELS.register(name)(lambda num_classes: nn.Sequential(nn.Flatten(), nn.LazyLinear(num_classes)))
    assert "features" in check_image_size(name, 32)


def test_a_backbone_that_is_not_a_cilab_backbone_is_refused_by_config():
    """A module with features() and head but its own forward(x) passed the check, then failed at the
    first training step: the step calls model(x, with_features=True), which Backbone defines."""
    class Plain(nn.Module):  # Tiny's layers and features(), on a plain module with its own forward
        features = Tiny.features

        def __init__(self, num_classes):
            super().__init__()
            tiny = Tiny(num_classes)
            self.conv, self.head = tiny.conv, tiny.head

        def forward(self, x):
            return self.head(self.features(x))

    _refused_by_config("test-plain-module-net", Plain, "finetune", r"its forward takes no with_features \(the "
                       r"training step calls model\(x, with_features=True\)\); subclass cilab.models.Backbone")

    class NoDim(Backbone):  # a Backbone whose head was set by hand: LUCIR, PODNet, DER read feature_dim
        features = Tiny.features

        def __init__(self, num_classes):
            super().__init__()
            self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(4, num_classes)

    _refused_by_config("test-no-feature-dim-net", NoDim, "lucir",
                       r"its feature_dim is None but features\(\) gives 4; set self.feature_dim = 4 \(Backbone.add_head")


def _refused_by_config(name, net, preset, match):
    """``net`` registered as ``name`` is refused when a ``preset`` config is built, with ``match``."""
    if name not in MODELS:
        MODELS.register(name)(lambda num_classes: net(num_classes))
    with pytest.raises(ConfigError, match=match):
        build_config(preset, [f"model.name={name}", "data.name=digits"])
