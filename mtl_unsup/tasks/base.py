"""The task interface: a head on the shared backbone and a loss, weighted by the module.

Two optional abilities make a task more than a per-batch loss:

- **Dataset-level targets**: a task that is also a
  :class:`~mtl_unsup.clustering.targets.TargetProvider` (``refreshes = True``) makes targets from
  the features of the whole training set (k-means labels, nearest neighbours, balanced
  assignments). The refresh callback makes one feature pass and hands every due provider the same
  :class:`~mtl_unsup.clustering.refresh.RefreshContext`; the provider computes the new targets,
  the model's :class:`~mtl_unsup.clustering.targets.Targets` keeps them (and checkpoints them),
  and the provider reads them by dataset index in its loss.
- **Clustering heads** (:meth:`Task.cluster_heads`): heads whose argmax is a clustering of the
  images. Evaluation scores every one; :meth:`Task.answer_head` names the task's own label-free
  choice among them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn


class TaskBatch:
    """What a task may read of a training batch: augmented views and dataset indices.

    Ground-truth labels are deliberately absent, so no loss can read them. Backbone features of
    a view are computed once and shared by every task that asks for them. ``fetch(view,
    indices)`` returns augmented, normalised views of *other* training images by dataset index
    (a neighbour of each image, for instance); it is None where the data cannot provide them.
    """

    def __init__(
        self, views: dict[str, list[torch.Tensor]], index: torch.Tensor,
        backbone: Callable[[torch.Tensor], torch.Tensor],
        fetch: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.views = views
        self.index = index
        self.backbone = backbone
        self.fetch = fetch
        self._features: dict[tuple[str, int], torch.Tensor] = {}

    def view(self, name: str, i: int = 0) -> torch.Tensor:
        return self.views[name][i]

    def features(self, name: str, i: int = 0) -> torch.Tensor:
        key = (name, i)
        if key not in self._features:
            self._features[key] = self.backbone(self.views[name][i])
        return self._features[key]

    def computed_features(self) -> torch.Tensor | None:
        """The features of the first view a task encoded (None if none did), for the bank."""
        return next(iter(self._features.values()), None)


class Task(nn.Module):
    """Base class of a training task.

    Args:
        weight: factor of this task's loss in the sum.
        view: name of the augmentation (``data.augmentations``) whose views the task reads.
        start_epoch: the task contributes from this epoch on (a warm-up for the others).
        stop_epoch: the task contributes before this epoch only (None: to the end), so staged
            recipes (pretext -> neighbours -> self-labelling) are configuration.
    """

    num_views: int = 1
    refreshes: bool = False  # makes dataset-level targets (a TargetProvider, mtl_unsup.clustering.targets)
    has_cluster_heads: bool = False  # known before build(), unlike cluster_heads()
    needs_images: bool = False  # reads image views (not only features): no cached features
    # Where the recipe stands in the field's pipeline (k-means targets 0 < neighbours 1): of two
    # clustering tasks, the later stage's head is the run's answer (see MultiTaskModule.answer).
    stage: int = 0

    def __init__(self, weight: float = 1.0, view: str = "weak", start_epoch: int = 0,
                 stop_epoch: int | None = None) -> None:
        super().__init__()
        if weight < 0:
            raise ValueError(f"a task weight must be >= 0, got {weight}")
        if stop_epoch is not None and stop_epoch <= start_epoch:
            raise ValueError(f"stop_epoch={stop_epoch} must be above start_epoch={start_epoch} "
                             "(or null: train to the end)")
        self.weight = float(weight)
        self.view = view
        self.start_epoch = int(start_epoch)
        self.stop_epoch = None if stop_epoch is None else int(stop_epoch)

    def views(self) -> dict[str, int]:
        """Augmentation name -> how many views of it this task needs per image."""
        return {self.view: self.num_views}

    def build(self, feature_dim: int, num_clusters: int) -> None:
        """Create the task's head once the backbone's feature size is known."""
        raise NotImplementedError

    def bind(self, tasks: Mapping[str, Task]) -> None:
        """Called once every task is built, for a task that works on another's head."""

    def trains_heads_of(self) -> list[str]:
        """The other tasks whose clustering heads this task trains (their end-of-training check
        runs when this one trains)."""
        return []

    def loss(self, batch: TaskBatch) -> torch.Tensor:
        raise NotImplementedError

    def step_metrics(self) -> dict[str, torch.Tensor]:
        """Label-free figures of the last :meth:`loss` call, logged as ``train/<task>_<name>``."""
        return {}

    def active(self, epoch: int) -> bool:
        return (self.weight > 0 and epoch >= self.start_epoch
                and (self.stop_epoch is None or epoch < self.stop_epoch))

    # ------------------------------------------------------------- clustering heads
    def cluster_heads(self) -> dict[str, int]:
        """Name -> number of clusters of each clustering head (none by default)."""
        return {}

    def head_logits(self, features: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits of every clustering head for backbone features."""
        return {}

    def answer_ready(self) -> bool:
        """Whether this task's heads can be the run's answer (trained, or set from a clustering)."""
        return True

    def answer_head(self) -> str | None:
        """This task's own label-free choice among its heads."""
        heads = self.cluster_heads()
        return next(iter(heads)) if heads else None


def latest_stage(tasks: Mapping[str, Task], fits: Callable[[str, Task], bool]) -> str | None:
    """Of the tasks that ``fits``, the one of the latest stage of the field's pipeline (neighbour
    consistency refines k-means targets), then the latest start epoch, then the first in the list:
    how the run's answer (:meth:`MultiTaskModule.answer`) and self-labelling's source are chosen."""
    best, rank = None, None
    for name, task in tasks.items():
        if fits(name, task) and (rank is None or (task.stage, task.start_epoch) > rank):
            best, rank = name, (task.stage, task.start_epoch)
    return best
