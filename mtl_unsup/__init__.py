"""mtl-unsup: unsupervised image classification through multi-task learning."""

__version__ = "0.1.0"
