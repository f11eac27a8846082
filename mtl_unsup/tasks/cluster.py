"""Clustering head trained on k-means pseudo-labels (DeepCluster, Caron et al., 2018).

The same task with more clusters than classes is an overclustering head (IIC, Ji et al., 2019):
``task=[...,overcluster]``; with ``cluster.assign=sinkhorn`` its targets are balanced (SeLa).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.clustering import normalized_mutual_info_score

from mtl_unsup.clustering.head import ClusterHead
from mtl_unsup.clustering.kmeans import ClusterState
from mtl_unsup.clustering.refresh import RefreshContext
from mtl_unsup.clustering.targets import TargetProvider
from mtl_unsup.tasks.base import Task, TaskBatch
from mtl_unsup.tasks.losses import balanced_class_weights

# Below this NMI between the trained head and the final k-means, the head is no answer.
MIN_HEAD_AGREEMENT = 0.5


class ClusterTask(TargetProvider, Task):
    """Cross-entropy of the clustering head on the current pseudo-labels.

    Pseudo-labels are looked up by dataset index. The head (:class:`ClusterHead`, a linear layer
    in the whitened, normalised space k-means clustered in) is re-initialised each time the labels
    are refreshed, since cluster numbers carry no meaning from one k-means to the next.

    Args:
        k: number of clusters of this head (None: ``cluster.k`` times ``k_factor``).
        k_factor: with ``k`` None, this many times ``cluster.k`` (overclustering: > 1).
        balance: ``weights`` scales each cluster's loss by the inverse of its size (DeepCluster
            samples uniformly over clusters to the same end); ``none`` leaves it plain.
        label_smoothing: cross-entropy label smoothing.
        head_init: how the head restarts after each re-clustering: ``centroids`` sets it to the
            nearest-centroid classifier of the new k-means (its argmax is the k-means assignment,
            which the targets equal with ``cluster.assign=kmeans`` and approach with balanced
            labels), so it starts near them even when the learning rate has decayed; ``random``
            is DeepCluster's fresh random initialisation.
        head_temperature: softmax temperature of the centroid-initialised head.

    ``trained_steps`` (a buffer, so it is checkpointed) counts the steps the head has trained
    since its last restart: a head that never trained is no answer of the run.
    """

    has_cluster_heads = True

    def __init__(self, weight: float = 1.0, view: str = "weak", start_epoch: int = 0,
                 stop_epoch: int | None = None, k: int | None = None, k_factor: int = 1,
                 balance: str = "weights", label_smoothing: float = 0.0,
                 head_init: str = "centroids", head_temperature: float = 0.1) -> None:
        super().__init__(weight, view, start_epoch, stop_epoch)
        if balance not in ("weights", "none"):
            raise ValueError(f"balance={balance!r} is not one of weights, none")
        if head_init not in ("centroids", "random"):
            raise ValueError(f"head_init={head_init!r} is not one of centroids, random")
        if head_temperature <= 0:
            raise ValueError(f"head_temperature={head_temperature} must be > 0")
        if (k is not None and (not isinstance(k, int) or k < 2)) or not isinstance(k_factor, int) \
                or k_factor < 1:
            raise ValueError(f"k={k!r} must be a number >= 2 or null (cluster.k, which may be auto), "
                             f"and k_factor={k_factor!r} a whole number >= 1")
        self.fixed_k, self.k_factor = k, int(k_factor)
        self.balance, self.label_smoothing = balance, label_smoothing
        self.head_init, self.head_temperature = head_init, head_temperature
        self.pseudo_labels: torch.Tensor | None = None
        self.class_weights: torch.Tensor | None = None

    def build(self, feature_dim: int, num_clusters: int) -> None:
        self.num_clusters = self.fixed_k or num_clusters * self.k_factor
        self.k = self.num_clusters  # the clusters in use: fewer with cluster.k=auto
        self.head = ClusterHead(feature_dim, self.num_clusters)
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------- dataset-level targets
    def target_k(self, ctx: RefreshContext) -> int:
        return self.fixed_k or ctx.k * self.k_factor

    def refresh(self, ctx: RefreshContext) -> ClusterState:
        return ctx.pseudo_labels(self.target_k(ctx))

    def normalise_state(self, state: ClusterState | dict) -> ClusterState:
        return ClusterState.from_state_dict(state) if isinstance(state, dict) else state

    def adopt(self, state: ClusterState | dict, reset_head: bool = True,
              head_init: str | None = None) -> list[nn.Parameter]:
        state = self.normalise_state(state)
        self.k = state.k
        self.pseudo_labels = state.labels.long().cpu()
        self.class_weights = (balanced_class_weights(self.pseudo_labels, self.k)
                              if self.balance == "weights" else None)
        if not reset_head:
            return []
        self.reset_head(state, head_init)
        return list(self.head.parameters())

    def finish(self, ctx: RefreshContext, state: ClusterState | None) -> tuple[ClusterState, str] | None:
        """The final k-means replaces a head that never trained or fell apart (its clusters no
        longer match the final k-means of the training features: NMI below
        ``MIN_HEAD_AGREEMENT``, e.g. one cluster). Reads no label."""
        final = ctx.kmeans(self.target_k(ctx))
        if int(self.trained_steps) == 0:
            return final, (f"never trained (its task starts at epoch {self.start_epoch}): it now predicts "
                           "the final k-means clusters, and its scores are those of k-means")
        with torch.no_grad():
            head = ctx.argmax(lambda features: self.logits(features.to(self.head.mean.device)))
        agreement = float(normalized_mutual_info_score(head, final.labels))
        if agreement < MIN_HEAD_AGREEMENT:
            return final, (f"disagrees with the final k-means of the training features (NMI "
                           f"{agreement:.2f}): it now predicts the final k-means clusters, and its scores "
                           "are those of k-means")
        return None

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

    # ------------------------------------------------------------- clustering heads
    def previous_labels(self, state: ClusterState) -> dict[int, torch.Tensor]:
        return {state.k: state.labels}

    def answer_ready(self) -> bool:
        return self.pseudo_labels is not None  # its head was set from a clustering

    def cluster_heads(self) -> dict[str, int]:
        return {"": self.k}

    def head_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"": self.logits(features)}

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(features)[:, : self.k]

    def loss(self, batch: TaskBatch) -> torch.Tensor:
        if self.pseudo_labels is None:
            raise RuntimeError("ClusterTask has no pseudo-labels: is the refresh callback on?")
        targets = self.pseudo_labels[batch.index.cpu()].to(batch.index.device)
        weights = None
        if self.class_weights is not None:
            weights = self.class_weights.to(batch.index.device)
        logits = self.logits(batch.features(self.view))
        self.trained_steps += 1
        return F.cross_entropy(logits.float(), targets, weight=weights,
                               label_smoothing=self.label_smoothing)
