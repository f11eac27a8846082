"""Rotation prediction (Gidaris et al., 2018): which of 4 quarter turns was applied."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl_unsup.tasks.base import Task, TaskBatch
from mtl_unsup.tasks.losses import rotate_batch


class RotationTask(Task):
    """4-way rotation classification on the backbone's features.

    Args:
        all_rotations: feed all four rotations of every image (4x the compute) instead of one
            random rotation per image.
    """

    needs_images = True  # rotates the images themselves

    def __init__(self, weight: float = 1.0, view: str = "weak", start_epoch: int = 0,
                 stop_epoch: int | None = None,
                 all_rotations: bool = False) -> None:
        super().__init__(weight, view, start_epoch, stop_epoch)
        self.all_rotations = all_rotations

    def build(self, feature_dim: int, num_clusters: int) -> None:
        self.head = nn.Linear(feature_dim, 4)

    def loss(self, batch: TaskBatch) -> torch.Tensor:
        x = batch.view(self.view)
        if self.all_rotations:
            turns = torch.arange(4, device=x.device).repeat_interleave(x.shape[0])
            x = x.repeat(4, 1, 1, 1)
        else:
            turns = torch.randint(0, 4, (x.shape[0],), device=x.device)
        logits = self.head(batch.backbone(rotate_batch(x, turns)))
        return F.cross_entropy(logits, turns)
