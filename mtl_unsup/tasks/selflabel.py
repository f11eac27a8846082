"""Self-labelling (SCAN's last step, Van Gansbeke et al., 2020): confident predictions teach.

The images a clustering head is confident about on a weak view become targets for a strong view
of the same images, with each target cluster weighted by the inverse of its count in the batch,
so that large clusters cannot swallow small ones. It trains another task's answer head
(``source``); that head is the run's answer when its task is (see ``MultiTaskModule.answer``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from mtl_unsup.tasks.base import Task, TaskBatch, latest_stage
from mtl_unsup.tasks.losses import balanced_class_weights


def confident_targets(probs: torch.Tensor, threshold: float, min_share: float) -> torch.Tensor:
    """Which rows of ``probs`` become targets: those whose top probability reaches ``threshold``.

    When fewer than ``min_share`` of the rows do (early on, or with an over-strict threshold),
    the most confident rows of *each* predicted cluster are taken instead, the same number per
    cluster, until ``min_share`` is reached: training never stalls for want of targets, and the
    fallback cannot favour one cluster, so it cannot collapse into it.
    """
    confidence, cluster = probs.max(dim=1)
    mask = confidence >= threshold
    wanted = math.ceil(min_share * len(probs))
    if int(mask.sum()) >= wanted:
        return mask
    present = cluster.unique()
    per_cluster = math.ceil(wanted / len(present))
    order = torch.argsort(confidence, descending=True)
    rank = torch.zeros_like(cluster)
    for c in present:  # the position of each row among its cluster's, most confident first
        rows = order[cluster[order] == c]
        rank[rows] = torch.arange(len(rows), device=rank.device)
    return mask | (rank < per_cluster)


class SelfLabelTask(Task):
    """Class-balanced cross-entropy of a strong view on the confident weak-view predictions.

    Args:
        view: the augmentation trained on (strong); ``weak_view``: the one predictions come from.
        source: the task whose answer head is trained (a task with clustering heads), or
            ``auto``: the one whose head would be the run's answer (of the tasks with a head of
            ``cluster.k`` clusters, the latest in the field's pipeline, SCAN after k-means
            targets, then the latest start, then the first listed, as the module picks its answer).
        threshold: softmax probability an image's prediction must reach to become its target
            (SCAN: 0.99).
        min_share: when fewer images of a batch are that confident, the most confident of each
            predicted cluster are used, up to this share of the batch.
    """

    def __init__(self, weight: float = 1.0, view: str = "strong", start_epoch: int = 0,
                 stop_epoch: int | None = None, weak_view: str = "weak", source: str = "auto",
                 threshold: float = 0.99, min_share: float = 0.05) -> None:
        super().__init__(weight, view, start_epoch, stop_epoch)
        if not 0 < threshold <= 1 or not 0 <= min_share <= 1:
            raise ValueError(f"threshold={threshold} must lie in (0, 1] and min_share={min_share} "
                             "in [0, 1]")
        self.weak_view, self.source, self.threshold, self.min_share = weak_view, source, threshold, min_share
        self._source: list[Task] = []  # a plain list: the head belongs to the source's parameters

    def views(self) -> dict[str, int]:
        if self.weak_view == self.view:
            return {self.view: 2}
        return {self.weak_view: 1, self.view: 1}

    def build(self, feature_dim: int, num_clusters: int) -> None:
        self.num_clusters = num_clusters
        self.register_buffer("confident_share", torch.zeros(()))

    def bind(self, tasks: Mapping[str, Task]) -> None:
        tasks = dict(tasks.items())  # ModuleDict has no get()
        heads = [n for n, t in tasks.items() if t.has_cluster_heads]
        name = self.source if self.source != "auto" else self._auto_source(tasks)
        source = tasks.get(name) if name else None
        if source is None or not source.has_cluster_heads:
            raise ValueError(f"source={self.source!r} is not a task with a clustering head in this "
                             f"run; choose one of {heads}" if heads else
                             "self-labelling trains a clustering head, and no task of this run has "
                             "one: add one, e.g. task=[...,cluster,selflabel] or [...,scan,selflabel]")
        self.source = name
        self._source = [source]

    def trains_heads_of(self) -> list[str]:
        return [self.source]

    def _auto_source(self, tasks: Mapping[str, Task]) -> str | None:
        """The task whose head would answer: a head of the run's k (an overclustering head is never
        the answer), of the latest pipeline stage."""
        return latest_stage(tasks, lambda _, task: task is not self and task.has_cluster_heads
                            and self.num_clusters in task.cluster_heads().values())

    def step_metrics(self) -> dict[str, torch.Tensor]:
        return {"confident": self.confident_share}

    def loss(self, batch: TaskBatch) -> torch.Tensor:
        source = self._source[0]
        head = source.answer_head()
        strong_index = 1 if self.weak_view == self.view else 0
        # features through the shared cache, with gradients (other tasks may read the same view);
        # detached here, as the weak view only gives targets
        weak_features = batch.features(self.weak_view).detach()
        with torch.no_grad():
            weak = source.head_logits(weak_features)[head]
            probs = weak.float().softmax(dim=1)
            chosen = confident_targets(probs, self.threshold, self.min_share)
            targets = probs.argmax(dim=1)
            self.confident_share.copy_((probs.max(dim=1).values >= self.threshold).float().mean())
        logits = source.head_logits(batch.features(self.view, strong_index))[head]
        if not chosen.any():  # min_share=0 and nobody confident: nothing to learn from this batch
            return logits.sum() * 0.0
        logits = logits[chosen]
        weights = balanced_class_weights(targets[chosen], probs.shape[1]).to(logits.device)
        return F.cross_entropy(logits.float(), targets[chosen], weight=weights)
