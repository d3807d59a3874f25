"""Backbones, keyed by ``model.name``. Add your own from your code::

    from cilab.models import MODELS

    @MODELS.register("my-net")
    def my_net(num_classes: int, image_size: int = 32):
        return MyNet(num_classes)  # a cilab.models.Backbone: .features(x) -> N x d and .head (d -> classes)
"""

from . import resnet18 as _resnet18  # noqa: F401  (registers resnet18, resnet18-cifar, resnet18-imagenet)
from .resnet import (MODELS, Backbone, Outputs, ResNetCifar, StagedResNet, build_model, check_image_size, create_model,
                     factory_options)
from .resnet18 import ResNet18

__all__ = ["MODELS", "Backbone", "Outputs", "ResNetCifar", "ResNet18", "StagedResNet", "build_model", "check_image_size", "create_model",
           "factory_options"]
