"""Clustering quality against ground truth: Hungarian-matched accuracy, NMI and ARI."""

from __future__ import annotations

import torch
from torchmetrics import MetricCollection
from torchmetrics.clustering import (
    AdjustedRandScore,
    ClusterAccuracy,
    NormalizedMutualInfoScore,
)


def clustering_metrics(num_clusters: int, num_classes: int) -> MetricCollection:
    """ACC (best one-to-one cluster-to-class matching), NMI and ARI, synced across ranks."""
    size = max(num_clusters, num_classes, 2)
    return MetricCollection({
        "acc": ClusterAccuracy(num_classes=size),
        "nmi": NormalizedMutualInfoScore(),
        "ari": AdjustedRandScore(),
    })


def score_clustering(preds: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    """One-shot ACC/NMI/ARI of ``preds`` against ``target`` (entries with target < 0 ignored)."""
    keep = target >= 0
    preds, target = preds[keep].long(), target[keep].long()
    if len(target) == 0:
        return {}
    metrics = clustering_metrics(int(preds.max()) + 1, int(target.max()) + 1)
    metrics.update(preds, target)
    return {k: float(v) for k, v in metrics.compute().items()}
