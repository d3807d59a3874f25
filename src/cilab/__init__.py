"""cilab: class-incremental learning on CIFAR-100 with ResNet-32, fast and faithful."""

__version__ = "0.1.0"
