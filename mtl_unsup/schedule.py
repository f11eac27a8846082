"""Task start epochs, the clustering period and the LR schedule, checked together at start.

Nothing here stops a run: each finding is one warning that names the keys to change, printed
before any image is trained on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from mtl_unsup.tasks.base import Task

log = logging.getLogger(__name__)


def lr_fraction_at(cfg: DictConfig, epoch: int) -> float | None:
    """The share of ``optimizer.lr`` left at ``epoch`` under a cosine schedule (None: not cosine)."""
    scheduler = cfg.get("scheduler")
    if not scheduler or not str(scheduler.get("_target_", "")).endswith("CosineAnnealingLR"):
        return None
    period = int(scheduler.T_max)
    return 0.5 * (1 + math.cos(math.pi * epoch / period)) if period > 0 else None


def schedule_findings(cfg: DictConfig, tasks: Mapping[str, Task]) -> list[str]:
    """Epochs that train nothing, tasks that never train, schedules that waste a task's start."""
    max_epochs = cfg.trainer.get("max_epochs")
    live = {name: task for name, task in tasks.items() if task.weight > 0}
    findings = []
    if max_epochs is not None and max_epochs > 0:
        for name, task in live.items():
            if task.start_epoch >= max_epochs:
                answer = (" The run's clusters will be the final k-means of the features."
                          if task.has_cluster_heads else "")
                findings.append(f"task.{name}.start_epoch={task.start_epoch} >= trainer.max_epochs="
                                f"{max_epochs}: the {name} task never trains.{answer}")
        every = cfg.cluster.every_n_epochs
        for name, task in live.items():
            if task.refreshes and task.start_epoch < max_epochs <= task.start_epoch + every:
                findings.append(f"cluster.every_n_epochs={every}: the {name} task's pseudo-labels are "
                                f"computed once (epoch {task.start_epoch}) and never refreshed before "
                                f"the run ends (trainer.max_epochs={max_epochs}). Lower "
                                "cluster.every_n_epochs to refresh them.")
    first = min((task.start_epoch for task in live.values()), default=0)
    if live and first > 0:
        findings.append(f"epochs 0-{first - 1} train nothing: every task starts at epoch {first} or "
                        "later. Lower a task's start_epoch (warmup_epochs=0 starts the clustering "
                        "tasks at once).")
    scheduler = cfg.get("scheduler")
    if lr_fraction_at(cfg, 0) is not None and max_epochs and scheduler.T_max < max_epochs:
        findings.append(f"scheduler.T_max={scheduler.T_max} < trainer.max_epochs={max_epochs}: the "
                        "cosine learning rate rises again after it reaches zero. Set scheduler.T_max "
                        "to the number of epochs.")
    for name, task in live.items():
        left = lr_fraction_at(cfg, task.start_epoch)
        if task.start_epoch > 0 and left is not None and left < 0.1 and (
                max_epochs is None or task.start_epoch < max_epochs):
            findings.append(f"task.{name}.start_epoch={task.start_epoch}: the cosine schedule has left "
                            f"{left:.0%} of optimizer.lr by then, so the task barely trains. Start it "
                            "earlier or lengthen scheduler.T_max.")
    return findings


def check_schedule(cfg: DictConfig, tasks: Mapping[str, Task]) -> list[str]:
    """Log each finding of :func:`schedule_findings` as a warning; returns them."""
    findings = schedule_findings(cfg, tasks)
    for finding in findings:
        rank_zero_only(log.warning)(finding)
    return findings
