from .resnet import MODELS, Outputs, ResNetCifar, create_model

__all__ = ["MODELS", "Outputs", "ResNetCifar", "create_model"]
