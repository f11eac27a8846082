"""The clustering head: a linear classifier in the space k-means clusters in.

k-means sees a backbone feature ``f`` as ``z = normalise((f - mean) P)`` (PCA-whitened, then
L2-normalised; :class:`~mtl_unsup.clustering.kmeans.ClusterState`). The head applies the same
fixed map before its linear layer, so that, set from the centroids, it *is* the nearest-centroid
classifier of the last k-means, exactly and whatever the scale of the features: for unit ``z``,
``argmin_c |z - c|^2 = argmax_c <z, c> - |c|^2 / 2``. This is the cosine/prototype head of
DeepCluster-v2 and SwAV, on the whitened features k-means used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ClusterHead(nn.Module):
    """``logits = W normalise((f - mean) P) + b``, with ``mean`` and ``P`` fixed buffers.

    ``P`` is stored as a ``(D, D)`` matrix (a PCA to ``d < D`` dimensions is padded with zero
    columns), so the buffers keep one shape from one clustering to the next and the checkpoint
    loads into a freshly built head.
    """

    def __init__(self, feature_dim: int, num_clusters: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("proj", torch.eye(feature_dim))
        self.linear = nn.Linear(feature_dim, num_clusters)

    def embed(self, features: torch.Tensor) -> torch.Tensor:
        """The features as k-means saw them (float32, also under mixed precision)."""
        with torch.autocast(features.device.type, enabled=False):
            return F.normalize((features.float() - self.mean) @ self.proj, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = self.embed(features)
        with torch.autocast(features.device.type, enabled=False):
            return self.linear(z)

    @torch.no_grad()
    def set_space(self, mean: torch.Tensor, proj: torch.Tensor) -> None:
        """Adopt the centring and ``(D, d)`` projection of a new clustering."""
        self.mean.copy_(mean.to(self.mean))
        self.proj.zero_()
        self.proj[:, : proj.shape[1]] = proj.to(self.proj)

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor, temperature: float) -> None:
        """Become the nearest-centroid classifier of ``(k, d)`` unit-space centroids (in the first
        ``k`` outputs)."""
        c = centroids.to(self.linear.weight)
        k = c.shape[0]  # may be fewer than the head's rows (cluster.k=auto): the rest are unused
        self.linear.weight.zero_()
        self.linear.bias.zero_()
        self.linear.weight[:k, : c.shape[1]] = c / temperature
        self.linear.bias[:k] = -c.pow(2).sum(1) / (2 * temperature)

    @torch.no_grad()
    def reset_random(self) -> None:
        self.linear.reset_parameters()
