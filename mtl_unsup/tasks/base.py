"""The task interface: a head on the shared backbone and a loss, weighted by the module."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


class TaskBatch:
    """What a task may read of a training batch: augmented views and dataset indices.

    Ground-truth labels are deliberately absent, so no loss can read them. Backbone features of
    a view are computed once and shared by every task that asks for them.
    """

    def __init__(
        self, views: dict[str, list[torch.Tensor]], index: torch.Tensor,
        backbone: Callable[[torch.Tensor], torch.Tensor],
    ) -> None:
        self.views = views
        self.index = index
        self.backbone = backbone
        self._features: dict[tuple[str, int], torch.Tensor] = {}

    def view(self, name: str, i: int = 0) -> torch.Tensor:
        return self.views[name][i]

    def features(self, name: str, i: int = 0) -> torch.Tensor:
        key = (name, i)
        if key not in self._features:
            self._features[key] = self.backbone(self.views[name][i])
        return self._features[key]


class Task(nn.Module):
    """Base class of a training task.

    Args:
        weight: factor of this task's loss in the sum.
        view: name of the augmentation (``data.augmentations``) whose views the task reads.
        start_epoch: the task contributes from this epoch on (a warm-up for the others).
    """

    num_views: int = 1
    needs_pseudo_labels: bool = False

    def __init__(self, weight: float = 1.0, view: str = "weak", start_epoch: int = 0) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"a task weight must be >= 0, got {weight}")
        self.weight = float(weight)
        self.view = view
        self.start_epoch = int(start_epoch)

    def views(self) -> dict[str, int]:
        """Augmentation name -> how many views of it this task needs per image."""
        return {self.view: self.num_views}

    def build(self, feature_dim: int, num_clusters: int) -> None:
        """Create the task's head once the backbone's feature size is known."""
        raise NotImplementedError

    def loss(self, batch: TaskBatch) -> torch.Tensor:
        raise NotImplementedError

    def active(self, epoch: int) -> bool:
        return self.weight > 0 and epoch >= self.start_epoch
