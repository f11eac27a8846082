"""The task interface: a head on the shared backbone and a loss, weighted by the module.

Two optional abilities make a task more than a per-batch loss:

- **Dataset-level targets** (``refreshes = True``): the task owns state computed from the
  features of the whole training set (k-means labels, nearest neighbours, balanced assignments).
  The refresh callback makes one feature pass and hands every due task the same
  :class:`~mtl_unsup.clustering.refresh.RefreshContext`; :meth:`Task.refresh` computes the new
  state on rank 0, every rank :meth:`Task.adopt`\\ s it, and :meth:`Task.dataset_state` puts it in
  the checkpoint.
- **Clustering heads** (:meth:`Task.cluster_heads`): heads whose argmax is a clustering of the
  images. Evaluation scores every one; :meth:`Task.answer_head` names the task's own label-free
  choice among them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

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
    refreshes: bool = False  # owns dataset-level targets
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
        self.refreshed_epoch: int | None = None  # epoch of the last dataset-level refresh

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

    # ------------------------------------------------------------- dataset-level targets
    # A provider of dataset-level targets (``refreshes``) says what it needs, so that the checks
    # of shared code (data size, sharded clustering, warm starts) ask it instead of its class.
    # what its targets need that only every training row on one rank gives (None: nothing)
    needs_all_rows: str | None = None

    def size_problem(self, num_train: int) -> str | None:
        """Why ``num_train`` training images are too few for this task's targets (None: enough);
        a sentence that names the setting to lower."""
        return None

    def previous_labels(self) -> dict[int, torch.Tensor]:
        """k -> the cluster labels this task holds, by dataset index (k-means starts from them)."""
        return {}

    def refresh(self, ctx: Any) -> Any:
        """New dataset-level state from the training set's features (rank 0 only; returns a
        picklable object that every rank then :meth:`adopt`\\ s)."""
        raise NotImplementedError

    def adopt(self, state: Any, reset_head: bool = True, head_init: str | None = None) -> list[nn.Parameter]:
        """Take ``state`` from :meth:`refresh` (or a checkpoint, ``reset_head=False``); returns
        the parameters that restarted, whose optimizer moments must be dropped. ``head_init``
        overrides how a restarted head starts (see :meth:`finish`)."""
        raise NotImplementedError

    def dataset_state(self) -> Any:
        """The state to checkpoint (None: nothing yet); :meth:`adopt` takes it back."""
        return None

    def label_stats(self, labels: torch.Tensor) -> dict[str, float]:
        """Quality of the current state against ground truth, logged for the reader only (e.g.
        the share of mined neighbours in the same class); never read by training."""
        return {}

    def finish(self, ctx: Any) -> tuple[Any, str] | None:
        """After training, with the final features (rank 0): a state to adopt with a fresh head
        and the reason, when the trained head is no answer; None to keep it."""
        return None

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
