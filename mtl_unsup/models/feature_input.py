"""``backbone=features``: the input rows are the features already (``data=embeddings``).

The model is the task heads alone: there is nothing to compute, train or freeze before them.
The training script sets ``dim`` from the embedding file.
"""

from __future__ import annotations

from typing import Any

import torch

from mtl_unsup.models.backbones import Backbone, ConfigError

FEATURES_TARGET = "mtl_unsup.models.feature_input.FeatureInput"  # backbone._target_ of a rows model


class FeatureInput(Backbone):
    """Passes ``(B, D)`` rows through (or the plain slot of ``(B, slots, D)`` rows)."""

    weights = "none: the rows of the embedding file (data.path) are the features"

    def __init__(self, dim: int | None = None, **_: Any) -> None:
        super().__init__()
        if dim is None or dim < 1:
            raise ConfigError("backbone=features reads the rows of an embedding file: use it with "
                              "data=embeddings data.path=<file>, which sets its size.")
        self.feature_dim = int(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = x[:, 0]
        if x.ndim != 2 or x.shape[1] != self.feature_dim:
            raise ConfigError(f"backbone=features takes rows of {self.feature_dim} features, not "
                              f"{tuple(x.shape)}: images need an image backbone (e.g. backbone=small_cnn).")
        return x
