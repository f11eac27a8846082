"""Clustering head trained on k-means pseudo-labels (DeepCluster, Caron et al., 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mtl_unsup.clustering.kmeans import ClusterState
from mtl_unsup.tasks.base import Task, TaskBatch
from mtl_unsup.tasks.losses import balanced_class_weights


class ClusterTask(Task):
    """Cross-entropy of a linear clustering head on the current pseudo-labels.

    Pseudo-labels are looked up by dataset index. The head is re-initialised each time the
    labels are refreshed, since cluster numbers carry no meaning from one k-means to the next.

    Args:
        balance: ``weights`` scales each cluster's loss by the inverse of its size (DeepCluster
            samples uniformly over clusters to the same end); ``none`` leaves it plain.
        label_smoothing: cross-entropy label smoothing.
        head_init: how the head restarts after each re-clustering: ``centroids`` sets it to the
            nearest-centroid classifier of the new k-means (mapped back through the whitening),
            so it starts from the new labels even when the learning rate has decayed; ``random``
            is DeepCluster's fresh random initialisation.
        head_temperature: softmax temperature of the centroid-initialised head.
    """

    needs_pseudo_labels = True

    def __init__(self, weight: float = 1.0, view: str = "weak", start_epoch: int = 0,
                 balance: str = "weights", label_smoothing: float = 0.0,
                 head_init: str = "centroids", head_temperature: float = 0.1) -> None:
        super().__init__(weight, view, start_epoch)
        if balance not in ("weights", "none"):
            raise ValueError(f"task.cluster.balance={balance!r} is not one of weights, none")
        if head_init not in ("centroids", "random"):
            raise ValueError(f"task.cluster.head_init={head_init!r} is not one of centroids, random")
        if head_temperature <= 0:
            raise ValueError(f"task.cluster.head_temperature={head_temperature} must be > 0")
        self.balance, self.label_smoothing = balance, label_smoothing
        self.head_init, self.head_temperature = head_init, head_temperature
        self.pseudo_labels: torch.Tensor | None = None
        self.class_weights: torch.Tensor | None = None

    def build(self, feature_dim: int, num_clusters: int) -> None:
        self.num_clusters = num_clusters
        self.head = nn.Linear(feature_dim, num_clusters)

    def set_pseudo_labels(self, labels: torch.Tensor) -> None:
        self.pseudo_labels = labels.long().cpu()
        self.class_weights = (
            balanced_class_weights(self.pseudo_labels, self.num_clusters)
            if self.balance == "weights" else None
        )

    @torch.no_grad()
    def reset_head(self, state: ClusterState | None = None) -> None:
        """Restart the head: randomly, or as the nearest-centroid classifier of ``state``."""
        if state is None or self.head_init == "random":
            self.head.reset_parameters()
            return
        # k-means assigns z/|z| to the centroid maximising <z/|z|, c> - |c|^2 / 2, with
        # z = (f - mean) P. Whitened features have |z| ~ sqrt(d), so the linear head
        # (<z, c> / sqrt(d) - |c|^2 / 2) / T reproduces that assignment, at temperature T.
        centroids = state.centroids.to(self.head.weight)
        proj, mean = state.pca_proj.to(centroids), state.pca_mean.to(centroids)
        scale = 1.0 / (self.head_temperature * proj.shape[1] ** 0.5)
        self.head.weight.copy_(centroids @ proj.t() * scale)
        self.head.bias.copy_(-(mean @ proj) @ centroids.t() * scale
                             - centroids.pow(2).sum(1) / (2 * self.head_temperature))

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)

    def loss(self, batch: TaskBatch) -> torch.Tensor:
        if self.pseudo_labels is None:
            raise RuntimeError("ClusterTask has no pseudo-labels: is the PseudoLabelCallback on?")
        targets = self.pseudo_labels[batch.index.cpu()].to(batch.index.device)
        weights = None
        if self.class_weights is not None:
            weights = self.class_weights.to(batch.index.device)
        logits = self.logits(batch.features(self.view))
        return F.cross_entropy(logits.float(), targets, weight=weights,
                               label_smoothing=self.label_smoothing)
