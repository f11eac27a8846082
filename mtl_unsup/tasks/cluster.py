"""Clustering head trained on k-means pseudo-labels (DeepCluster, Caron et al., 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtl_unsup.clustering.head import ClusterHead
from mtl_unsup.clustering.kmeans import ClusterState
from mtl_unsup.tasks.base import Task, TaskBatch
from mtl_unsup.tasks.losses import balanced_class_weights


class ClusterTask(Task):
    """Cross-entropy of the clustering head on the current pseudo-labels.

    Pseudo-labels are looked up by dataset index. The head (:class:`ClusterHead`, a linear layer
    in the whitened, normalised space k-means clustered in) is re-initialised each time the labels
    are refreshed, since cluster numbers carry no meaning from one k-means to the next.

    Args:
        balance: ``weights`` scales each cluster's loss by the inverse of its size (DeepCluster
            samples uniformly over clusters to the same end); ``none`` leaves it plain.
        label_smoothing: cross-entropy label smoothing.
        head_init: how the head restarts after each re-clustering: ``centroids`` sets it to the
            nearest-centroid classifier of the new k-means (its argmax is the k-means assignment),
            so it starts from the new labels even when the learning rate has decayed; ``random``
            is DeepCluster's fresh random initialisation.
        head_temperature: softmax temperature of the centroid-initialised head.

    ``trained_steps`` (a buffer, so it is checkpointed) counts the steps the head has trained
    since its last restart: a head that never trained is no answer of the run.
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
        self.head = ClusterHead(feature_dim, num_clusters)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    def set_pseudo_labels(self, labels: torch.Tensor) -> None:
        self.pseudo_labels = labels.long().cpu()
        self.class_weights = (
            balanced_class_weights(self.pseudo_labels, self.num_clusters)
            if self.balance == "weights" else None
        )

    @torch.no_grad()
    def reset_head(self, state: ClusterState | None = None, head_init: str | None = None) -> None:
        """Restart the head in ``state``'s space: randomly, or as its nearest-centroid classifier."""
        self.trained_steps.zero_()
        if state is not None:
            self.head.set_space(state.pca_mean, state.pca_proj)
        if state is None or (head_init or self.head_init) == "random":
            self.head.reset_random()
        else:
            self.head.set_centroids(state.centroids, self.head_temperature)

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
        self.trained_steps += 1
        return F.cross_entropy(logits.float(), targets, weight=weights,
                               label_smoothing=self.label_smoothing)
