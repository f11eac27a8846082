"""Neighbour consistency (SCAN, Van Gansbeke et al., 2020): an image and its neighbours agree.

At each refresh the ``num_neighbors`` nearest training images of every image are mined with
FAISS in the whitened feature space. A training step pairs each image of the batch with one of
its neighbours (drawn with the step's seeded RNG, so DDP ranks and resumed runs draw what they
should), reads that neighbour's image by dataset index, and trains ``num_heads`` clustering
heads so that both get the same cluster, with an entropy term that keeps every cluster in use.
The head with the lowest loss (a running mean over the ranks' batches) is the task's answer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mtl_unsup.clustering.refresh import RefreshContext
from mtl_unsup.distributed import mean_over_ranks
from mtl_unsup.tasks.base import Task, TaskBatch


def scan_loss(anchor_logits: torch.Tensor, neighbour_logits: torch.Tensor,
              entropy_weight: float = 5.0) -> torch.Tensor:
    """SCAN's loss: ``-mean log <p(anchor), p(neighbour)>`` minus ``entropy_weight`` times the
    entropy of the batch's mean prediction (which is largest when clusters are used equally)."""
    anchor = anchor_logits.float().softmax(dim=1)
    neighbour = neighbour_logits.float().softmax(dim=1)
    consistency = -torch.log((anchor * neighbour).sum(dim=1).clamp(min=1e-8)).mean()
    mean = anchor.mean(dim=0)
    entropy = -(mean * torch.log(mean.clamp(min=1e-8))).sum()
    return consistency - entropy_weight * entropy


class ScanTask(Task):
    """SCAN's clustering step as a task: heads trained on neighbour consistency.

    Args:
        num_neighbors: neighbours mined per image at each refresh (SCAN: 20).
        num_heads: clustering heads trained side by side; the lowest-loss one answers.
        entropy_weight: weight of the entropy term (SCAN: 5).
        k: clusters per head (None: ``cluster.k``).
        loss_momentum: of the running mean of each head's loss, which picks the answer.
    """

    refreshes = True
    has_cluster_heads = True
    stage = 1

    def __init__(self, weight: float = 1.0, view: str = "weak", start_epoch: int = 0,
                 stop_epoch: int | None = None, num_neighbors: int = 20, num_heads: int = 1,
                 entropy_weight: float = 5.0, k: int | None = None,
                 loss_momentum: float = 0.99) -> None:
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
        self.fingerprint = ""
        self.usable = True  # False when its heads never trained or fell apart (see finish)

    def build(self, feature_dim: int, num_clusters: int) -> None:
        self.num_clusters = self.fixed_k or num_clusters
        self.k = self.num_clusters  # the clusters in use: fewer with cluster.k=auto
        self.heads = nn.ModuleList(nn.Linear(feature_dim, self.num_clusters)
                                   for _ in range(self.num_heads))
        self.register_buffer("head_losses", torch.zeros(self.num_heads))
        self.register_buffer("trained_steps", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------- dataset-level targets
    def refresh(self, ctx: RefreshContext) -> dict[str, Any]:
        return {"neighbours": ctx.neighbours(self.num_neighbors), "epoch": ctx.epoch,
                "fingerprint": ctx.fingerprint, "k": self.fixed_k or ctx.k}

    def adopt(self, state: dict[str, Any], reset_head: bool = True,
              head_init: str | None = None) -> list[nn.Parameter]:
        # The heads keep training across refreshes: their cluster numbers are their own, not
        # those of a new k-means, so nothing restarts unless k changes (cluster.k=auto).
        self.neighbours = state["neighbours"].long().cpu()
        self.refreshed_epoch, self.fingerprint = int(state["epoch"]), state.get("fingerprint", "")
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

    def dataset_state(self) -> dict[str, Any] | None:
        if self.neighbours is None:
            return None
        return {"neighbours": self.neighbours, "epoch": self.refreshed_epoch,
                "fingerprint": self.fingerprint, "k": self.k, "usable": self.usable}

    def finish(self, ctx: RefreshContext) -> tuple[dict[str, Any], str] | None:
        """Heads that never trained, or whose answer fell apart (NMI with the final k-means below
        ``MIN_HEAD_AGREEMENT``, e.g. one cluster), are no answer of the run. Reads no label."""
        from torchmetrics.functional.clustering import normalized_mutual_info_score

        from mtl_unsup.tasks.cluster import MIN_HEAD_AGREEMENT

        empty = torch.zeros(0, self.num_neighbors, dtype=torch.long)
        state = self.dataset_state() or {"neighbours": empty, "epoch": -1, "fingerprint": "", "k": self.k}
        if int(self.trained_steps) == 0:
            why = f"never trained (its task starts at epoch {self.start_epoch}): it is not the run's answer"
            return {**state, "usable": False}, why
        head = self.heads[int(self.head_losses.argmin())]
        with torch.no_grad():
            preds = ctx.argmax(lambda features: head(features.to(self.head_losses.device))[:, : self.k])
        agreement = float(normalized_mutual_info_score(preds, ctx.kmeans(self.k).labels))
        if agreement < MIN_HEAD_AGREEMENT:
            why = (f"disagrees with the final k-means of the training features (NMI {agreement:.2f}): it "
                   "is not the run's answer")
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
