from .resnet import MODELS, ResNetCifar, create_model

__all__ = ["MODELS", "ResNetCifar", "create_model"]
