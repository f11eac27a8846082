"""Neighbour consistency (SCAN, Van Gansbeke et al., 2020): an image and its neighbours agree.

At each refresh the ``num_neighbors`` nearest training images of every image are mined with
FAISS in the whitened feature space. A training step pairs each image of the batch with one of
its neighbours (drawn with the step's seeded RNG, so DDP ranks and resumed runs draw what they
should), reads that neighbour's image by dataset index, and trains ``num_heads`` clustering
heads so that both get the same cluster, with an entropy term that keeps every cluster in use.
The head with the lowest loss (a running mean over the ranks' batches) is the task's answer.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mtl_unsup.clustering.refresh import RefreshContext, nearest_neighbours
from mtl_unsup.clustering.targets import TargetProvider
from mtl_unsup.distributed import mean_over_ranks
from mtl_unsup.tasks.base import Task, TaskBatch


def scan_loss(anchor_logits: torch.Tensor, neighbour_logits: torch.Tensor,
              entropy_weight: float = 5.0) -> torch.Tensor:
    """SCAN's loss: ``-mean log <p(anchor), p(neighbour)>`` minus ``entropy_weight`` times the
    entropy of the batch's mean prediction (which is largest when clusters are used equally).

    The log of the agreement is computed in log space (a log-sum-exp of the two log-softmaxes),
    so a confident pair that disagrees keeps its full loss and gradient, as in the reference's
    binary cross-entropy on the agreement; clamping the agreement instead would flatten both.
    """
    dtype = torch.promote_types(anchor_logits.dtype, torch.float32)  # half precision: float32
    log_anchor = anchor_logits.to(dtype).log_softmax(dim=1)
    log_neighbour = neighbour_logits.to(dtype).log_softmax(dim=1)
    consistency = -torch.logsumexp(log_anchor + log_neighbour, dim=1).mean()
    mean = log_anchor.exp().mean(dim=0)
    entropy = -(mean * torch.log(mean.clamp(min=1e-8))).sum()
    return consistency - entropy_weight * entropy


# Below this normalised entropy of its cluster sizes a head has collapsed (0: one cluster; a
# uniform use of half the clusters of k=10 gives 0.70).
MIN_SIZE_ENTROPY = 0.5


class ScanTask(TargetProvider, Task):
    """SCAN's clustering step as a task: heads trained on neighbour consistency.

    Args:
        num_neighbors: neighbours mined per image at each refresh (SCAN: 20).
        num_heads: clustering heads trained side by side; the lowest-loss one answers.
        entropy_weight: weight of the entropy term (SCAN: 5).
        k: clusters per head (None: ``cluster.k``).
        loss_momentum: of the running mean of each head's loss, which picks the answer.
        space: where neighbours are mined: ``features`` (the backbone's, PCA-whitened as the
            clustering sees them) or the name of a task that projects them (``contrastive``:
            its projector's normalised output, where SCAN's reference code mines).
    """

    has_cluster_heads = True
    needs_all_rows = "nearest neighbours over the whole training set"
    stage = 1

    def __init__(self, weight: float = 1.0, view: str = "weak", start_epoch: int = 0,
                 stop_epoch: int | None = None, num_neighbors: int = 20, num_heads: int = 1,
                 entropy_weight: float = 5.0, k: int | None = None,
                 loss_momentum: float = 0.99, space: str = "features") -> None:
        super().__init__(weight, view, start_epoch, stop_epoch)
        if num_neighbors < 1 or num_heads < 1:
            raise ValueError(f"num_neighbors={num_neighbors} and num_heads={num_heads} must be >= 1")
        if entropy_weight < 0 or not 0 <= loss_momentum < 1:
            raise ValueError(f"entropy_weight={entropy_weight} must be >= 0 and loss_momentum="
                             f"{loss_momentum} in [0, 1)")
        if k is not None and (not isinstance(k, int) or k < 2):
            raise ValueError(f"k={k!r} must be a number >= 2 or null (cluster.k, which may be auto)")
        self.num_neighbors, self.num_heads = int(num_neighbors), int(num_heads)
        self.entropy_weight, self.fixed_k, self.loss_momentum = entropy_weight, k, loss_momentum
        self.neighbours: torch.Tensor | None = None
        self.usable = True  # False when its heads never trained or fell apart (see finish)
        self.space = space
        self._projector: list[Task] = []  # a plain list: the projector belongs to its task

    def bind(self, tasks: Mapping[str, Task]) -> None:
        if self.space == "features":
            return
        task = dict(tasks.items()).get(self.space)
        if task is None or not hasattr(task, "project"):
            choices = [n for n, t in tasks.items() if hasattr(t, "project")]
            raise ValueError(f"space={self.space!r}: use features or a task that projects features "
                             f"({', '.join(choices) or 'none in this run, e.g. contrastive'})")
        self._projector = [task]

    def build(self, feature_dim: int, num_clusters: int) -> None:
        self.num_clusters = self.fixed_k or num_clusters
        self.k = self.num_clusters  # the clusters in use: fewer with cluster.k=auto
        self.heads = nn.ModuleList(nn.Linear(feature_dim, self.num_clusters)
                                   for _ in range(self.num_heads))
        self.register_buffer("head_losses", torch.zeros(self.num_heads))
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------- dataset-level targets
    def size_problem(self, num_train: int) -> str | None:
        if self.num_neighbors < num_train:
            return None
        return (f"num_neighbors={self.num_neighbors} needs more training images than the {num_train} "
                "there are. Lower it.")

    def refresh(self, ctx: RefreshContext) -> dict[str, Any]:
        if self._projector:
            neighbours = nearest_neighbours(self._projector[0].project(ctx.features), self.num_neighbors)
        else:
            neighbours = ctx.neighbours(self.num_neighbors)
        return {"neighbours": neighbours, "epoch": ctx.epoch,
                "fingerprint": ctx.fingerprint, "k": self.fixed_k or ctx.k}

    def normalise_state(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"fingerprint": "", "k": self.num_clusters, "usable": True, **state,
                "neighbours": state["neighbours"].long().cpu()}

    def adopt(self, state: dict[str, Any], reset_head: bool = True,
              head_init: str | None = None) -> list[nn.Parameter]:
        # The heads keep training across refreshes: their cluster numbers are their own, not
        # those of a new k-means, so nothing restarts unless k changes (cluster.k=auto).
        self.neighbours = state["neighbours"].long().cpu()
        self.usable = bool(state.get("usable", True))
        k = int(state.get("k", self.num_clusters))
        changed, self.k = k != self.k, k
        if not (reset_head and changed):
            return []
        with torch.no_grad():
            for head in self.heads:
                head.reset_parameters()
            self.head_losses.zero_()
            self.trained_steps.zero_()
        return list(self.heads.parameters())

    def finish(self, ctx: RefreshContext, state: dict[str, Any] | None) -> tuple[dict[str, Any], str] | None:
        """Heads that never trained, or that collapsed (the normalised entropy of their cluster
        sizes over the training set below ``MIN_SIZE_ENTROPY``: most images in a few clusters),
        are no answer of the run. SCAN's clusters are meant to differ from k-means', so unlike a
        k-means-trained head's, their disagreement with the final k-means is no fault. Reads no
        label."""
        empty = torch.zeros(0, self.num_neighbors, dtype=torch.long)
        state = state or {"neighbours": empty, "epoch": -1, "fingerprint": "", "k": self.k}
        if int(self.trained_steps) == 0:
            why = f"never trained (its task starts at epoch {self.start_epoch}): it is not the run's answer"
            return {**state, "usable": False}, why
        head = self.heads[int(self.head_losses.argmin())]
        with torch.no_grad():
            preds = ctx.argmax(lambda features: head(features.to(self.head_losses.device))[:, : self.k])
        share = torch.bincount(preds, minlength=self.k).double() / len(preds)
        entropy = float(-(share * share.clamp(min=1e-12).log()).sum() / math.log(self.k))
        if entropy < MIN_SIZE_ENTROPY:
            why = (f"collapsed (the entropy of its cluster sizes is {entropy:.2f} of the most "
                   f"possible; {int((share > 0).sum())} of {self.k} clusters in use): it is not the "
                   "run's answer")
            return {**state, "usable": False}, why
        return None

    def label_stats(self, labels: torch.Tensor) -> dict[str, float]:
        if self.neighbours is None:
            return {}
        same = labels[self.neighbours] == labels.unsqueeze(1)
        return {"neighbour_acc": float(same.float().mean())}

    # ------------------------------------------------------------- clustering heads
    def cluster_heads(self) -> dict[str, int]:
        return {f"h{i}": self.k for i in range(self.num_heads)} if self.num_heads > 1 else {"": self.k}

    def head_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = (head(features)[:, : self.k] for head in self.heads)
        return dict(zip(self.cluster_heads(), logits, strict=True))

    def answer_ready(self) -> bool:
        return self.usable and int(self.trained_steps) > 0

    def answer_head(self) -> str:
        return list(self.cluster_heads())[int(self.head_losses.argmin())]

    def loss(self, batch: TaskBatch) -> torch.Tensor:
        if self.neighbours is None:
            raise RuntimeError("ScanTask has no neighbours yet: is the refresh callback on?")
        if batch.fetch is None:
            raise RuntimeError("ScanTask reads neighbour images by index: the batch cannot fetch them.")
        index = batch.index.cpu()
        pick = torch.randint(0, self.num_neighbors, (len(index),))
        neighbours = self.neighbours[index, pick]
        anchor = batch.features(self.view)
        other = batch.backbone(batch.fetch(self.view, neighbours.to(batch.index.device)))
        k = self.k
        losses = torch.stack([scan_loss(head(anchor)[:, :k], head(other)[:, :k], self.entropy_weight)
                              for head in self.heads])
        with torch.no_grad():
            mean = mean_over_ranks(losses.detach())  # every rank keeps the same running losses
            keep = self.loss_momentum if int(self.trained_steps) > 0 else 0.0
            self.head_losses.mul_(keep).add_((1 - keep) * mean)
            self.trained_steps += 1
        return losses.sum()
