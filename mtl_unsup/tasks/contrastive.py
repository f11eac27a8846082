"""Contrastive views (SimCLR, Chen et al., 2020): two augmentations of an image attract."""

from __future__ import annotations

import torch
from torch import nn

from mtl_unsup.tasks.base import Task, TaskBatch
from mtl_unsup.tasks.losses import nt_xent


class ContrastiveTask(Task):
    """NT-Xent between two augmented views, through an MLP projector.

    Args:
        temperature: softmax temperature of NT-Xent.
        proj_dim: output size of the projector.
        hidden_dim: hidden size of the projector.
        gather_distributed: under DDP, contrast against every rank's batch (more negatives, the
            loss of the global batch) instead of the rank's own.
        batch_norm: BatchNorm after the projector's hidden layer (SimCLR v2; SCAN's code has none).
    """

    num_views = 2

    def __init__(self, weight: float = 1.0, view: str = "strong", start_epoch: int = 0,
                 stop_epoch: int | None = None,
                 temperature: float = 0.5, proj_dim: int = 128, hidden_dim: int = 512,
                 gather_distributed: bool = True, batch_norm: bool = True) -> None:
        super().__init__(weight, view, start_epoch, stop_epoch)
        if temperature <= 0:
            raise ValueError(f"task.contrastive.temperature must be > 0, got {temperature}")
        self.temperature, self.proj_dim, self.hidden_dim = temperature, proj_dim, hidden_dim
        self.gather_distributed, self.batch_norm = gather_distributed, batch_norm

    def build(self, feature_dim: int, num_clusters: int) -> None:
        norm = nn.BatchNorm1d(self.hidden_dim) if self.batch_norm else nn.Identity()
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, self.hidden_dim), norm,
            nn.ReLU(inplace=True), nn.Linear(self.hidden_dim, self.proj_dim),
        )

    @torch.no_grad()
    def project(self, features: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """L2-normalised projections of backbone features, the projector in eval mode (the
        space SCAN mines its neighbours in); on the projector's device, returned on the CPU."""
        device, mode = next(self.projector.parameters()).device, self.projector.training
        self.projector.eval()
        try:
            out = [torch.nn.functional.normalize(self.projector(part.to(device)).float(), dim=1).cpu()
                   for part in features.split(chunk)]
        finally:
            self.projector.train(mode)
        return torch.cat(out)

    def loss(self, batch: TaskBatch) -> torch.Tensor:
        z1 = self.projector(batch.features(self.view, 0))
        z2 = self.projector(batch.features(self.view, 1))
        return nt_xent(z1, z2, self.temperature, gather=self.gather_distributed)
