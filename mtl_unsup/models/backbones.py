"""Feature extractors: a small CNN for 8-64 px images and any torchvision classifier (timm's
models are in :mod:`mtl_unsup.models.timm_backbone`).

Every backbone maps ``(B, C, H, W)`` images to ``(B, feature_dim)`` features, can be frozen
(``backbone.freeze=true``) and says which weights it started from (:attr:`Backbone.weights`).
"""

from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from mtl_unsup.errors import UserError
from mtl_unsup.models.weights import WeightsError, file_digest, load_weights, saved_input


class ConfigError(UserError, ValueError):
    """A wrong configuration value, with a message naming the key and the fix."""


class Backbone(nn.Module):
    """What every backbone has: ``feature_dim``, freezing, and a record of its weights.

    A frozen backbone has no trainable parameters (so no optimizer state) and stays in eval
    mode, BatchNorm statistics included, whatever mode the model around it is put in.
    """

    feature_dim: int
    frozen: bool = False
    weights: str = "random"  # which weights it started from, recorded in checkpoints

    def freeze(self) -> None:
        self.frozen = True
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> Backbone:
        return super().train(mode and not self.frozen)

    def load_file(self, model: nn.Module, path: str, adapt: dict[str, int] | None = None,
                  optional: tuple[str, ...] = ()) -> None:
        load_weights(model, path, adapt, optional)
        self.weights = f"file {path} (sha256 {file_digest(path)})"

    @staticmethod
    def file_input(weights_path: str | None) -> dict[str, Any]:
        """The input an mtl-unsup checkpoint's weights were trained on (empty for other files)."""
        return saved_input(weights_path) if weights_path else {}


# The input of a backbone without pretrained weights, where data.image_size/mean/std are null.
PLAIN_INPUT = {"image_size": 32, "mean": 0.5, "std": 0.25}


def expected_input(backbone: Any, channels: int) -> dict[str, Any]:
    """``image_size``, ``mean`` and ``std`` for a backbone config: those its weights were trained
    with (pretrained config, or the mtl-unsup run that saved them), else :data:`PLAIN_INPUT`."""
    from hydra.utils import get_class

    settings = {k: v for k, v in dict(backbone).items() if k != "_target_"}
    given = getattr(get_class(backbone["_target_"]), "pretrained_input", None)
    found = given(in_channels=channels, **settings) if given else {}
    return {**PLAIN_INPUT, **found}


def mean_std_for(channels: int, mean: Any, std: Any) -> tuple[list[float], list[float]]:
    """Per-channel statistics of RGB pretraining for ``channels`` (1: their average)."""
    mean, std = [float(m) for m in mean], [float(s) for s in std]
    if channels == 1 and len(mean) == 3:
        return [sum(mean) / 3], [sum(std) / 3]
    return mean, std


class SmallCNN(Backbone):
    """A VGG-like CNN for small images: conv-BN-ReLU stages, max-pool between, global pooling.

    Args:
        in_channels: image channels.
        widths: channels of each stage; each stage but the last halves the resolution.
        convs_per_stage: 3x3 convolutions in a stage.
    """

    def __init__(
        self, in_channels: int = 3, widths: tuple[int, ...] = (64, 128, 256),
        convs_per_stage: int = 2, weights_path: str | None = None, pretrained: bool = False,
        freeze: bool = False,
    ) -> None:
        super().__init__()
        if pretrained:
            raise ConfigError("backbone.pretrained=true: the small CNN has no published weights. Train "
                              "one (backbone.weights_path=<an mtl-unsup checkpoint>) or pick a model "
                              "that has them: backbone=torchvision or backbone=timm with backbone.name.")
        if not widths:
            raise ConfigError("backbone.widths must list at least one stage width.")
        layers: list[nn.Module] = []
        channels = in_channels
        for stage, width in enumerate(widths):
            for _ in range(convs_per_stage):
                layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False),
                           nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
                channels = width
            if stage < len(widths) - 1:
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = channels
        if weights_path:
            self.load_file(self, weights_path)
        if freeze:
            self.freeze()

    @staticmethod
    def pretrained_input(in_channels: int = 3, weights_path: str | None = None, **_: Any) -> dict[str, Any]:
        """``image_size``, ``mean``, ``std`` its weights expect (a trained mtl-unsup checkpoint's)."""
        return Backbone.file_input(weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _strip_classifier(model: nn.Module) -> None:
    for attr in ("fc", "classifier", "head", "heads"):
        if hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            setattr(model, attr, nn.Identity())
            return
    raise ConfigError(f"Cannot find the classifier of {type(model).__name__} to remove it.")


def _adapt_first_conv(model: nn.Module, in_channels: int, cifar_stem: bool) -> str:
    """Swap the first convolution for one taking ``in_channels`` (and, CIFAR-style, 3x3 stride 1);
    returns its weight's key."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels and not cifar_stem:
                return f"{name}.weight"
            kernel, stride, padding = (
                (3, 1, 1) if cifar_stem else (module.kernel_size, module.stride, module.padding)
            )
            new = nn.Conv2d(in_channels, module.out_channels, kernel, stride, padding,
                            bias=module.bias is not None)
            if not cifar_stem and in_channels == 1:  # keep (pretrained) filters: sum over RGB
                with torch.no_grad():
                    new.weight.copy_(module.weight.sum(dim=1, keepdim=True))
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], new)
            return f"{name}.weight"
    raise ConfigError(f"{type(model).__name__} has no convolution to take {in_channels}-channel images.")


def torchvision_name(name: str) -> str:
    available = torchvision.models.list_models(torchvision.models)
    if name not in available:
        raise ConfigError(
            f"backbone.name={name!r} is not a torchvision classification model. "
            f"Choose one of: {', '.join(sorted(available))}."
        )
    return name


class TorchvisionBackbone(Backbone):
    """Any torchvision classification model by name (``resnet18``, ``resnet50``, ...), headless.

    Args:
        name: a name from ``torchvision.models.list_models(torchvision.models)``.
        in_channels: image channels; the first convolution is replaced when it differs from 3.
        cifar_stem: 3x3 stride-1 first convolution and no max-pool, for 32 px images.
        weights_path: a local weights file (see :mod:`mtl_unsup.models.weights`); classifier keys
            are ignored.
        pretrained: torchvision's default weights for ``name``, fetched (once, into torch's cache)
            the way torchvision does; ``weights_path`` wins when both are given.
        freeze: keep the weights as loaded (see :class:`Backbone`).
    """

    def __init__(
        self, name: str = "resnet18", in_channels: int = 3, cifar_stem: bool = False,
        weights_path: str | None = None, pretrained: bool = False, freeze: bool = False,
    ) -> None:
        super().__init__()
        weights = "DEFAULT" if pretrained and not weights_path else None
        name = torchvision_name(name)
        try:
            self.model = torchvision.models.get_model(name, weights=weights)
        except Exception as err:  # no network, a broken download
            raise WeightsError(
                f"backbone.pretrained=true: torchvision could not fetch the weights of {name}: "
                f"{str(err).splitlines()[0]} Download them where there is network and pass "
                "backbone.weights_path=<the .pth file>.") from None
        if weights:
            self.weights = f"torchvision {torchvision.models.get_model_weights(name).DEFAULT}"
        _strip_classifier(self.model)
        first = _adapt_first_conv(self.model, in_channels, cifar_stem)
        if cifar_stem and hasattr(self.model, "maxpool"):
            self.model.maxpool = nn.Identity()
        if weights_path:  # a CIFAR stem keeps its new first convolution unless the file has one
            self.load_file(self.model, weights_path, adapt={first: in_channels},
                           optional=(first,) if cifar_stem else ())
        self.model.eval()
        with torch.no_grad():
            size = 64 if cifar_stem else 224
            self.feature_dim = int(self.model(torch.zeros(2, in_channels, size, size)).shape[1])
        self.model.train()
        if freeze:
            self.freeze()

    @staticmethod
    def pretrained_input(name: str = "resnet18", in_channels: int = 3, pretrained: bool = False,
                         weights_path: str | None = None, **_: Any) -> dict[str, Any]:
        """``image_size``, ``mean``, ``std`` the weights expect: an mtl-unsup checkpoint's, or
        those torchvision publishes for its weights (pretrained, or a file of them)."""
        saved = Backbone.file_input(weights_path)
        if saved or not (pretrained or weights_path):
            return saved
        try:
            transform = torchvision.models.get_model_weights(torchvision_name(name)).DEFAULT.transforms()
        except ValueError:  # a model without published weights
            return {}
        mean, std = mean_std_for(in_channels, transform.mean, transform.std)
        return {"image_size": int(transform.crop_size[0]), "mean": mean, "std": std}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1)
