"""Feature extractors: a small CNN for 8-64 px images and any torchvision classifier.

Every backbone maps ``(B, C, H, W)`` images to ``(B, feature_dim)`` features.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from mtl_unsup.errors import UserError


class ConfigError(UserError, ValueError):
    """A wrong configuration value, with a message naming the key and the fix."""


class SmallCNN(nn.Module):
    """A VGG-like CNN for small images: conv-BN-ReLU stages, max-pool between, global pooling.

    Args:
        in_channels: image channels.
        widths: channels of each stage; each stage but the last halves the resolution.
        convs_per_stage: 3x3 convolutions in a stage.
    """

    def __init__(
        self, in_channels: int = 3, widths: tuple[int, ...] = (64, 128, 256),
        convs_per_stage: int = 2, weights_path: str | None = None,
    ) -> None:
        super().__init__()
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
            load_weights(self, weights_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _strip_classifier(model: nn.Module) -> None:
    for attr in ("fc", "classifier", "head", "heads"):
        if hasattr(model, attr) and isinstance(getattr(model, attr), nn.Module):
            setattr(model, attr, nn.Identity())
            return
    raise ConfigError(f"Cannot find the classifier of {type(model).__name__} to remove it.")


def _adapt_first_conv(model: nn.Module, in_channels: int, cifar_stem: bool) -> None:
    """Swap the first convolution for one taking ``in_channels`` (and, CIFAR-style, 3x3 stride 1)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels == in_channels and not cifar_stem:
                return
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
            return


class TorchvisionBackbone(nn.Module):
    """Any torchvision classification model by name (``resnet18``, ``resnet50``, ...), headless.

    Args:
        name: a name from ``torchvision.models.list_models(torchvision.models)``.
        in_channels: image channels; the first convolution is replaced when it differs from 3.
        cifar_stem: 3x3 stride-1 first convolution and no max-pool, for 32 px images.
        weights_path: a local state-dict file (never downloaded); classifier keys are ignored.
    """

    def __init__(
        self, name: str = "resnet18", in_channels: int = 3, cifar_stem: bool = False,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        available = torchvision.models.list_models(torchvision.models)
        if name not in available:
            raise ConfigError(
                f"backbone.name={name!r} is not a torchvision classification model. "
                f"Choose one of: {', '.join(sorted(available))}."
            )
        self.model = torchvision.models.get_model(name, weights=None)
        _strip_classifier(self.model)
        if weights_path:
            load_weights(self.model, weights_path)
        _adapt_first_conv(self.model, in_channels, cifar_stem)
        if cifar_stem and hasattr(self.model, "maxpool"):
            self.model.maxpool = nn.Identity()
        self.model.eval()
        with torch.no_grad():
            size = 64 if cifar_stem else 224
            self.feature_dim = int(self.model(torch.zeros(2, in_channels, size, size)).shape[1])
        self.model.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).flatten(1)


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local state dict into ``model``; every backbone weight must be found and match."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"backbone.weights_path={str(path)!r} does not exist.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"backbone.weights_path={str(path)!r} is not a state dict: {err}") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(("fc.", "classifier."))}
    missing = [k for k in own if k not in state]
    wrong = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or wrong:
        raise ConfigError(
            f"backbone.weights_path={str(path)!r} does not match the backbone: "
            f"{len(missing)} missing key(s) {missing[:3]}, {len(wrong)} of the wrong shape {wrong[:3]}. "
            "Use weights saved from the same architecture."
        )
    model.load_state_dict({k: state[k] for k in own})
