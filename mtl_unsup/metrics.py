"""Clustering quality: against ground truth (Hungarian-matched accuracy, NMI, ARI) and label-free."""

from __future__ import annotations

import torch
from torchmetrics.functional.clustering import (
    adjusted_rand_score,
    cluster_accuracy,
    normalized_mutual_info_score,
)


def many_to_one_accuracy(preds: torch.Tensor, target: torch.Tensor) -> float:
    """Share of images in their cluster's majority class: ACC when several clusters may map to
    one class (overclustering, Ji et al. 2019). Equals one-to-one ACC at best when k = classes."""
    k, c = int(preds.max()) + 1, int(target.max()) + 1
    counts = torch.zeros(k, c, dtype=torch.long)
    counts.index_put_((preds, target), torch.ones(len(preds), dtype=torch.long), accumulate=True)
    return float(counts.max(dim=1).values.sum()) / len(preds)


def score_clustering(preds: torch.Tensor, target: torch.Tensor,
                     num_clusters: int | None = None) -> dict[str, float]:
    """ACC (best one-to-one cluster-to-class matching), NMI and ARI of ``preds`` against
    ``target`` (entries with target < 0 ignored); with ``num_clusters`` other than the number of
    classes, also many-to-one ACC (``acc_m2o``).

    Plain functions of the two tensors: no state, and no collective under DDP (the caller
    gathers the whole split first), so one rank can score alone.
    """
    keep = target >= 0
    preds, target = preds[keep].long().cpu(), target[keep].long().cpu()
    if len(target) == 0:
        return {}
    size = max(int(preds.max()), int(target.max())) + 1
    scores = {
        "acc": float(cluster_accuracy(preds, target, num_classes=max(size, 2))),
        "nmi": float(normalized_mutual_info_score(preds, target)),
        "ari": float(adjusted_rand_score(preds, target)),
    }
    if num_clusters is not None and num_clusters != len(target.unique()):
        scores["acc_m2o"] = many_to_one_accuracy(preds, target)
    return scores


# Metric names that read ground-truth labels. They are reported, never used to choose anything
# (checkpoint, head, k, sweep objective) unless the user names one on purpose.
LABELLED_NAMES = ("acc", "nmi", "ari", "acc_m2o", "kmeans_acc", "kmeans_nmi", "kmeans_ari",
                  "kmeans_acc_m2o")


def reads_labels(metric: str) -> bool:
    """Whether a logged metric (``val/acc``, ``cluster/train_nmi``, ...) uses ground truth."""
    return metric.rsplit("/", 1)[-1] in LABELLED_NAMES or metric.startswith("cluster/train_")


def silhouette(space: torch.Tensor, clusters: torch.Tensor, sample_size: int = 2000,
               seed: int = 0) -> float:
    """Mean silhouette (Rousseeuw, 1987) of ``clusters`` among the rows of ``space``: label-free.

    Near 1 when every point is much closer to its own cluster than to the next one. A single
    cluster has no silhouette; it scores -1, the worst, so a collapsed model never wins a
    selection. At most ``sample_size`` points (a seeded sample) keep the cost quadratic in that.
    """
    from sklearn.metrics import silhouette_score

    x, labels = space.float().cpu(), clusters.cpu()
    if len(labels) > sample_size:
        keep = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))[:sample_size]
        x, labels = x[keep], labels[keep]
    n_used = len(labels.unique())
    if n_used < 2 or n_used >= len(labels):
        return -1.0
    return float(silhouette_score(x.numpy(), labels.numpy()))
