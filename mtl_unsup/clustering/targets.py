"""The run's dataset-level targets, held in one place (DESIGN.md, "Stages": targets have one owner).

A task that makes targets over the whole training set (k-means labels, balanced labels, mined
neighbours) is a :class:`TargetProvider`: it says what it needs, computes new targets from a
refresh's features and turns them into what its loss reads by dataset index. The targets
themselves live in :class:`Targets`, one per model: the k-means of the training features that
evaluation and prediction assign with, the criterion of each k tried (``cluster.k=auto``), each
provider's state and the epoch it was made at. :class:`Targets` saves itself into a checkpoint and
restores itself from one; the refresh callback, the stage runner and the checks ask it, never a
task's attributes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from mtl_unsup.clustering.kmeans import ClusterState


class TargetProvider:
    """What a task that makes dataset-level targets provides (a mix-in of a :class:`Task`).

    Its state is any picklable value (a :class:`ClusterState`, a dict of tensors) that carries the
    epoch it was made at (:meth:`state_epoch`); :class:`Targets` keeps it, the task keeps only
    what its loss reads, set by :meth:`adopt`.
    """

    refreshes = True
    # what its targets need that only every training row on one rank gives (None: nothing)
    needs_all_rows: str | None = None

    def size_problem(self, num_train: int) -> str | None:
        """Why ``num_train`` training images are too few for these targets (None: enough); a
        sentence that names the setting to lower."""
        return None

    def refresh(self, ctx: Any) -> Any:
        """New targets from the training set's features (rank 0 only, or every rank with a
        sharded context); every rank then :meth:`adopt`\\ s the result."""
        raise NotImplementedError

    def adopt(self, state: Any, reset_head: bool = True, head_init: str | None = None) -> list[nn.Parameter]:
        """Read ``state`` (from :meth:`refresh`, :meth:`finish` or a checkpoint, the latter with
        ``reset_head=False``); returns the parameters that restarted, whose optimizer moments must
        be dropped. ``head_init`` overrides how a restarted head starts."""
        raise NotImplementedError

    @staticmethod
    def state_epoch(state: Any) -> int:
        """The epoch ``state`` was made at."""
        return int(state.epoch if isinstance(state, ClusterState) else state["epoch"])

    def normalise_state(self, state: Any) -> Any:
        """``state`` as the owner keeps it, every field set (a checkpoint holds plain dicts)."""
        return state

    def previous_labels(self, state: Any) -> dict[int, torch.Tensor]:
        """k -> the cluster labels ``state`` holds, by dataset index (k-means starts from them)."""
        return {}

    def finish(self, ctx: Any, state: Any) -> tuple[Any, str] | None:
        """After training, with the final features (rank 0) and the current ``state`` (None if
        none was made): a state to adopt with a fresh head and the reason, when the trained head
        is no answer; None to keep it."""
        return None

    def label_stats(self, labels: torch.Tensor) -> dict[str, float]:
        """Quality of the current targets against ground truth, logged for the reader only (e.g.
        the share of mined neighbours in the same class); never read by training."""
        return {}


def is_provider(task: Any) -> bool:
    return isinstance(task, TargetProvider)


class Targets:
    """Every dataset-level target of one model: the k-means at ``cluster.k`` (:attr:`kmeans`),
    ``k`` -> criterion of each k tried (:attr:`k_selection`), each provider's state
    (:attr:`states`) with the epoch it was made at (:meth:`epoch`), and the last epoch any was
    refreshed at (:attr:`last_refresh`, for the epoch history)."""

    def __init__(self) -> None:
        self.kmeans: ClusterState | None = None
        self.k_selection: dict[int, float] = {}
        self.states: dict[str, Any] = {}
        self._epochs: dict[str, int] = {}
        self.last_refresh: int | None = None

    def epoch(self, name: str) -> int | None:
        """The epoch ``name``'s targets were made at; None when it has none, or they are due anew."""
        return self._epochs.get(name)

    def mark_due(self, name: str) -> None:
        """Keep ``name``'s targets (a k-means warm start, say) but make them due at the next epoch
        (a stage that remakes its targets at its start)."""
        self._epochs.pop(name, None)

    def put(self, name: str, provider: TargetProvider, state: Any, reset_head: bool = True,
            head_init: str | None = None) -> list[nn.Parameter]:
        """``state`` becomes ``name``'s targets and ``provider`` reads them; returns the
        parameters that restarted."""
        restarted = provider.adopt(state, reset_head=reset_head, head_init=head_init)
        state = provider.normalise_state(state)
        self.states[name], self._epochs[name] = state, provider.state_epoch(state)
        return restarted

    def previous_labels(self, providers: Mapping[str, Any], rows: int) -> dict[int, torch.Tensor]:
        """k -> labels of ``rows`` training images that k-means at that k can start from: the
        providers', then the run's own k-means for its k."""
        previous: dict[int, torch.Tensor] = {}
        for name, provider in providers.items():
            if name in self.states:
                previous.update(provider.previous_labels(self.states[name]))
        if self.kmeans is not None:
            previous[self.kmeans.k] = self.kmeans.labels
        return {k: v for k, v in previous.items() if len(v) == rows}

    # ------------------------------------------------------------- checkpoints
    def save(self, checkpoint: dict[str, Any]) -> None:
        """Write the targets into ``checkpoint`` (the keys of earlier versions, so their readers
        and checkpoints keep working)."""
        if self.kmeans is not None:
            checkpoint["cluster_state"] = self.kmeans.state_dict()
        checkpoint["task_states"] = {name: (s.state_dict() if isinstance(s, ClusterState) else s)
                                     for name, s in self.states.items()}
        if self.k_selection:
            checkpoint["k_selection"] = dict(self.k_selection)

    def load(self, checkpoint: Mapping[str, Any], providers: Mapping[str, Any]) -> None:
        """Take the targets of ``checkpoint`` and hand each provider its own (heads as saved)."""
        if "cluster_state" not in checkpoint:
            return
        self.kmeans = ClusterState.from_state_dict(checkpoint["cluster_state"])
        self.k_selection = dict(checkpoint.get("k_selection", {}))
        states = dict(checkpoint.get("task_states", {}))
        if "task_states" not in checkpoint:  # written before tasks had targets of their own
            from mtl_unsup.tasks.cluster import ClusterTask
            states = {n: checkpoint["cluster_state"] for n, t in providers.items()
                      if isinstance(t, ClusterTask) and t.num_clusters == self.kmeans.k}
        for name, state in states.items():
            if name in providers:
                self.put(name, providers[name], state, reset_head=False)
