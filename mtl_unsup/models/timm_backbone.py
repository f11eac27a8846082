"""Any timm model as a backbone: ``backbone=timm backbone.name=<model>[.<tag>]``.

timm is imported when such a backbone is built, not before: other runs do not pay for it.
"""

from __future__ import annotations

from typing import Any

import torch

from mtl_unsup.models.backbones import Backbone, ConfigError, mean_std_for
from mtl_unsup.models.weights import WeightsError


def _timm():
    try:
        import timm
    except ImportError:  # pragma: no cover - timm is a dependency; a broken install
        raise ConfigError("backbone=timm needs the timm package: pip install timm") from None
    return timm


def timm_name(name: str) -> str:
    timm = _timm()
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:12]
        raise ConfigError(f"backbone.name={name!r} is not a timm model. Similar names: "
                          f"{', '.join(close) or 'none'}; timm.list_models() lists them all, "
                          "timm.list_models(pretrained=True) those with weights.")
    return name


class TimmBackbone(Backbone):
    """A timm model without its classifier (``num_classes=0``): pooled features.

    Args:
        name: a timm model name, with a weights tag if wanted (``resnet50.a1_in1k``,
            ``vit_small_patch14_dinov2.lvd142m``).
        in_channels: image channels (timm adapts RGB weights to one channel).
        pretrained: the published weights, fetched the way timm does (Hugging Face Hub, once, into
            its cache). ``weights_path`` wins when both are given.
        weights_path: a local weights file (see :mod:`mtl_unsup.models.weights`).
        freeze: keep the weights as loaded (see :class:`~mtl_unsup.models.backbones.Backbone`).
    """

    def __init__(
        self, name: str = "resnet18", in_channels: int = 3, pretrained: bool = False,
        weights_path: str | None = None, freeze: bool = False,
    ) -> None:
        super().__init__()
        timm = _timm()
        fetch = pretrained and not weights_path
        name = timm_name(name)
        try:
            self.model = timm.create_model(name, pretrained=fetch, num_classes=0, in_chans=in_channels)
        except Exception as err:  # no network, no such weights, a broken download
            raise WeightsError(
                f"backbone.pretrained=true: timm could not fetch the weights of {name}: "
                f"{str(err).splitlines()[0]} Download them where there is network (the "
                "model's .safetensors) and pass backbone.weights_path=<the file>.") from None
        if fetch:
            self.weights = f"timm {self.model.pretrained_cfg.get('hf_hub_id') or name}"
        if weights_path:
            first = self.model.pretrained_cfg.get("first_conv")
            first = first if isinstance(first, str) else None
            self.load_file(self.model, weights_path,
                           adapt={f"{first}.weight": in_channels} if first else None)
        self.feature_dim = int(self.model.num_features)
        if freeze:
            self.freeze()

    @staticmethod
    def pretrained_input(name: str = "resnet18", in_channels: int = 3, pretrained: bool = False,
                         weights_path: str | None = None, **_: Any) -> dict[str, Any]:
        """``image_size``, ``mean``, ``std`` the weights expect: an mtl-unsup checkpoint's, or
        the model's pretrained config in timm (for ``pretrained`` or a file of its weights)."""
        saved = Backbone.file_input(weights_path)
        if saved or not (pretrained or weights_path):
            return saved
        config = _timm().get_pretrained_cfg(timm_name(name))
        if config is None:
            return {}
        mean, std = mean_std_for(in_channels, config.mean, config.std)
        return {"image_size": int(config.input_size[-1]), "mean": mean, "std": std}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)
