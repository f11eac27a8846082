"""A run as a sequence of named stages: the field's protocols as configuration.

SCAN, for instance, is a contrastive pretext stage, a stage that trains clustering heads on
neighbours mined once from the pretext features, and a self-labelling stage, each with its own
optimiser, learning rate, batch size and augmentations. ``stages`` in the config (an
``experiment=`` file declares them) is an ordered mapping from a stage's name to its settings:

- ``tasks``: the tasks this stage trains, each ``{}`` or with overrides of ``weight``, ``view``,
  ``weak_view``, ``start_epoch`` and ``stop_epoch`` (counted from the stage's first epoch);
  every task named must be in the run's ``task`` list, whose settings hold the rest.
- ``epochs`` (required) and ``max_time`` (a time cap, ``DD:HH:MM:SS``). The run's own
  ``trainer.max_time`` is the budget of all the stages together, planned (:mod:`mtl_unsup.planning.budget`:
  each stage's epochs sized to end in time); ``time_share`` caps a stage's part of it.
- ``images``: the number of training images the stage reads, which sizes it by the training set:
  its epochs are ``images`` over the training images, rounded up, at most ``epochs`` (a
  protocol written for any folder, such as data=folder's, so costs the same on a large folder and
  gives a small one more epochs).
- ``optimizer`` and ``scheduler``: as the run's top-level keys (absent: the run's; a
  scheduler's ``${trainer.max_epochs}`` is the stage's epochs; ``scheduler: null``: constant).
- ``batch_size``: of the stage's training batches (absent: ``data.batch_size``).
- ``backbone_lr``: the backbone's learning rate as a share of the optimiser's (0 freezes it).
- ``refresh``: when dataset-level targets are made: ``every`` ``every_n_epochs`` epochs
  (absent: ``cluster.every_n_epochs``), ``once`` at the stage's start from the features the
  previous stage left (an eval-mode pass), or ``never`` (the targets the previous stage left).
- A stage set to ``null`` is left out: an experiment that extends another drops a stage so.
  A task of the ``task`` list that no stage trains is left out too (with a line saying so), unless
  a trained task reads it (``source``, ``space``).

A run without ``stages`` is one stage (:func:`one_stage`), run by the same code. Nothing here
loads torch: the plan is checked (:mod:`mtl_unsup.stage_checks`) before any library loads.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict


@dataclass
class Stage:
    """One stage of a run, as its trainer and the module see it.

    Attributes:
        name: its key in ``stages`` (its checkpoints are ``checkpoints/<name>/``).
        index: its position, from 0.
        cfg: the run's config with the stage's settings in place (trainer epochs and time cap,
            optimiser, scheduler, batch size, refresh period); ``task`` is the run's own.
        weights: task name -> weight in this stage (tasks not named: not trained).
        settings: task name -> the task attributes this stage sets (view, start epoch, ...).
        backbone_lr: the backbone's learning rate as a share of the optimiser's.
        refresh: ``every``, ``once`` or ``never``.

    The stage's own time cap is ``cfg.trainer.max_time``.
    """

    name: str
    index: int
    cfg: DictConfig
    weights: dict[str, float]
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    backbone_lr: float = 1.0
    refresh: str = "every"


def as_timedelta(value: Any) -> timedelta | None:
    """A ``max_time`` value (``DD:HH:MM:SS`` or a dict such as ``{hours: 1}``; None: none)."""
    if value is None:
        return None
    if isinstance(value, str):
        days, hours, minutes, seconds = (int(v) for v in value.split(":"))
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    return timedelta(**OmegaConf.to_container(value) if isinstance(value, DictConfig) else value)


def max_time_string(seconds: float) -> str:
    """``DD:HH:MM:SS``, as Lightning's ``max_time`` takes it."""
    s = int(seconds)
    return f"{s // 86400:02d}:{s // 3600 % 24:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def listed_tasks(cfg: DictConfig) -> list[str]:
    """The tasks of the run's ``task`` list (entries with a ``_target_``; an entry without one only
    sets keys of a task the list lacks)."""
    return [str(name) for name, task in (cfg.task or {}).items() if "_target_" in task]


def drop_null_stages(cfg: DictConfig) -> None:
    """Leave out the stages set to ``null`` (``stages: {selflabel: null}`` in an experiment that
    extends another); with none left the run is one stage."""
    stages = cfg.get("stages")
    if isinstance(stages, DictConfig) and any(v is None for v in stages.values()):
        with open_dict(cfg):
            cfg.stages = {k: v for k, v in stages.items() if v is not None} or None


def drop_unstaged_tasks(cfg: DictConfig) -> list[str]:
    """Leave out the tasks of the ``task`` list that no stage trains and no trained task reads
    (its ``source`` or ``space``), as data=folder's protocol trains two of the four tasks its list ends up
    with; returns their names (none without stages)."""
    stages = cfg.get("stages")
    if not isinstance(stages, DictConfig) or not all(isinstance(v, DictConfig) for v in stages.values()):
        return []
    named = {str(t) for stage in stages.values() for t in (stage.get("tasks") or {})}
    # and what they read: self-labelling's source heads, the task whose projection SCAN mines in
    named |= {str(cfg.task[t].get(key)) for t in list(named) if t in cfg.task for key in ("source", "space")
              if cfg.task[t].get(key) in cfg.task}
    listed = listed_tasks(cfg)
    unused = [t for t in listed if t not in named]
    if not unused or len(unused) == len(listed):  # none trained: stage_problems names the fix
        return []
    with open_dict(cfg):
        cfg.task = {k: v for k, v in cfg.task.items() if k not in unused}
    return unused


def stage_config(cfg: DictConfig, name: str) -> DictConfig:
    """The run's config with stage ``name``'s settings in place; interpolations such as a
    scheduler's ``${trainer.max_epochs}`` resolve to the stage's values."""
    stage = cfg.stages[name]
    out = copy.deepcopy(cfg)
    with open_dict(out):
        cap = cfg.get("max_stage_epochs")  # the debug presets' limit
        out.trainer.max_epochs = int(stage.epochs) if cap is None else min(int(stage.epochs), int(cap))
        # the run's trainer.max_time is the whole run's budget (the runner caps each stage)
        out.trainer.max_time = stage.get("max_time")
        for key in ("optimizer", "scheduler"):
            if key in stage:
                out[key] = stage[key]
        if stage.get("batch_size") is not None:
            out.data.batch_size = stage.batch_size
        if stage.get("every_n_epochs") is not None:
            out.cluster.every_n_epochs = stage.every_n_epochs
        for entry in (out.get("logger") or {}).values():  # each stage its own logged run
            key = next((k for k in ("version", "run_name", "name") if isinstance(entry, DictConfig)
                        and k in entry), None)
            if key is not None:
                entry[key] = name
        out.stages, out.start_stage = None, None
    return out


def task_settings(cfg: DictConfig, stage: DictConfig) -> dict[str, dict[str, Any]]:
    """Task name -> the attributes a stage sets on it: its view(s) as the run configures them,
    epochs counted from the stage's first (start 0, no stop) unless the stage says otherwise."""
    out = {}
    for task, given in stage.tasks.items():
        own = OmegaConf.to_container(cfg.task[task], resolve=True)
        values = {k: own[k] for k in ("view", "weak_view") if k in own}
        values.update(start_epoch=0, stop_epoch=None)
        values.update(OmegaConf.to_container(given, resolve=True) if given is not None else {})
        values.pop("weight", None)  # the stage's weights are its own (Stage.weights)
        out[str(task)] = values
    return out


def sized_epochs(stage: DictConfig, num_train: int) -> int:
    """A stage's epochs for ``num_train`` training images: ``images`` over them, rounded up, at
    most ``epochs`` (``epochs`` alone without ``images``)."""
    images = stage.get("images")
    if images is None:
        return int(stage.epochs)
    return min(int(stage.epochs), max(1, math.ceil(images / max(1, num_train))))


def size_stages(plan: list[Stage], cfg: DictConfig, num_train: int) -> None:
    """Give each stage with ``images`` its epochs for a training set of ``num_train`` images
    (the same on every rank and on resume, as the images are), under the debug presets' cap."""
    cap = cfg.get("max_stage_epochs")
    for stage in plan:
        if cfg.stages[stage.name].get("images") is None:
            continue
        epochs = sized_epochs(cfg.stages[stage.name], num_train)
        with open_dict(stage.cfg):
            stage.cfg.trainer.max_epochs = epochs if cap is None else min(epochs, int(cap))


def one_stage(cfg: DictConfig) -> Stage:
    """A run without ``stages`` as a plan of one stage: the run's own settings, named ``""`` (its
    checkpoints and history in the run directory itself)."""
    weights = {str(t): float(task.get("weight", 1.0)) for t, task in (cfg.task or {}).items()}
    return Stage("", 0, cfg, weights)


def run_stages(cfg: DictConfig) -> list[Stage]:
    """The stages of any run: those of ``stages``, or the run as one stage."""
    return plan_stages(cfg) if cfg.get("stages") else [one_stage(cfg)]


def plan_stages(cfg: DictConfig) -> list[Stage]:
    """The stages of a run with ``stages``, in order."""
    plan = []
    for index, (name, stage) in enumerate(cfg.stages.items()):
        weights = {str(t): float((given or {}).get("weight", cfg.task[t].get("weight", 1.0)))
                   for t, given in stage.tasks.items()}
        plan.append(Stage(str(name), index, stage_config(cfg, name), weights, task_settings(cfg, stage),
                          float(stage.get("backbone_lr", 1.0)), str(stage.get("refresh", "every"))))
    return plan
