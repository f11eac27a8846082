"""A run as a sequence of named stages: the field's protocols as configuration.

SCAN, for instance, is a contrastive pretext stage, a stage that trains clustering heads on
neighbours mined once from the pretext features, and a self-labelling stage, each with its own
optimiser, learning rate, batch size and augmentations. ``stages`` in the config (an
``experiment=`` file declares them) is an ordered mapping from a stage's name to its settings:

- ``tasks``: the tasks this stage trains, each ``{}`` or with overrides of ``weight``, ``view``,
  ``weak_view``, ``start_epoch`` and ``stop_epoch`` (counted from the stage's first epoch);
  every task named must be in the run's ``task`` list, whose settings hold the rest.
- ``epochs`` (required) and ``max_time`` (a time cap, ``DD:HH:MM:SS``). The run's own
  ``trainer.max_time`` is the budget of all the stages together: each gets at most what is left.
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
  a trained task reads it (``source``).

A run without ``stages`` is one stage, today's run. Nothing here loads torch: the plan is checked
before any library loads.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

STAGE_KEYS = ("tasks", "epochs", "images", "max_time", "optimizer", "scheduler", "batch_size", "backbone_lr",
              "refresh", "every_n_epochs")
TASK_KEYS = ("weight", "view", "weak_view", "start_epoch", "stop_epoch")
REFRESH = ("every", "once", "never")


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


def drop_null_stages(cfg: DictConfig) -> None:
    """Leave out the stages set to ``null`` (``stages: {selflabel: null}`` in an experiment that
    extends another); with none left the run is one stage."""
    stages = cfg.get("stages")
    if isinstance(stages, DictConfig) and any(v is None for v in stages.values()):
        with open_dict(cfg):
            cfg.stages = {k: v for k, v in stages.items() if v is not None} or None


def drop_unstaged_tasks(cfg: DictConfig) -> list[str]:
    """Leave out the tasks of the ``task`` list that no stage trains and no trained task reads
    (its ``source``), as data=folder's protocol trains two of the four tasks its list ends up
    with; returns their names (none without stages)."""
    stages = cfg.get("stages")
    if not isinstance(stages, DictConfig) or not all(isinstance(v, DictConfig) for v in stages.values()):
        return []
    named = {str(t) for stage in stages.values() for t in (stage.get("tasks") or {})}
    named |= {str(cfg.task[t].source) for t in named if t in cfg.task and cfg.task[t].get("source")}
    listed = [str(t) for t, v in cfg.task.items() if "_target_" in v]
    unused = [t for t in listed if t not in named]
    if not unused or len(unused) == len(listed):  # none trained: stage_problems names the fix
        return []
    with open_dict(cfg):
        cfg.task = {k: v for k, v in cfg.task.items() if k not in unused}
    return unused


def protocol_problem(cfg: DictConfig) -> str | None:
    """One message for a task list that lacks the tasks of the protocol a data option brings
    (``protocol_name``, set by conf/protocol/<name>.yaml), naming the fix, instead of one per key."""
    name, stages = cfg.get("protocol_name"), cfg.get("stages")
    if not name or not isinstance(stages, DictConfig):
        return None
    if cfg.backbone.get("freeze"):
        return (f"backbone.freeze=true leaves the pretext stage of conf/protocol/{name}.yaml nothing to "
                "train: cluster the frozen features in one stage, protocol=single task=[cluster,scan] "
                "warmup_epochs=0 (README, \"Clustering with a pretrained model\").")
    listed = [str(n) for n, t in (cfg.task or {}).items() if "_target_" in t]
    missing = sorted({str(t) for s in stages.values() if isinstance(s, DictConfig)
                      for t in (s.get("tasks") or {}) if t not in listed})
    if not missing:
        return None
    plan = "; ".join(f"{s} ({', '.join(v.tasks)})" for s, v in stages.items() if isinstance(v, DictConfig))
    return (f"task=[{','.join(listed)}] lacks {', '.join(missing)}, which the stages of "
            f"conf/protocol/{name}.yaml train ({plan}). Add {'it' if len(missing) == 1 else 'them'} "
            f"(task=[{','.join(listed + missing)}]), or protocol=single to train the listed tasks "
            "together in one stage.")


def replaced_overrides(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """Command-line overrides that every stage replaces, so they would change nothing (the run's
    ``optimizer.lr`` when each stage has its own optimiser, a sweep over ``data.batch_size`` when
    each sets its batch size, ``trainer.max_epochs``), each naming the per-stage key instead."""
    stages = cfg.get("stages")
    if not isinstance(stages, DictConfig) or not stages:
        return []
    first = next(iter(stages))
    replaced = {"trainer.max_epochs": "epochs"}
    for part in ("optimizer", "scheduler"):
        if all(part in stage for stage in stages.values()):
            replaced[part] = part
    if all(stage.get("batch_size") is not None for stage in stages.values()):
        replaced["data.batch_size"] = "batch_size"
    out = []
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        hit = next((k for k in replaced if key == k or key.startswith(k + ".")), None)
        if hit is None:
            continue
        per_stage = f"stages.{first}.{replaced[hit]}{key[len(hit):]}"
        single = " or protocol=single for one stage" if cfg.get("protocol_name") else ""
        out.append(f"{override}: every stage of this run sets its own {replaced[hit]}, so this changes "
                   f"nothing; set it per stage (e.g. {per_stage}=...){single}.")
    return out


def stage_problems(cfg: DictConfig) -> list[str]:
    """What is wrong with ``stages`` (and ``start_stage``), each naming the key and the fix."""
    stages, problems = cfg.get("stages"), []
    if stages is None or stages == {}:
        start = cfg.get("start_stage")
        return [f"start_stage={start!r}: this run has no stages."] if start is not None else []
    if not isinstance(stages, DictConfig):
        return [f"stages={stages!r}: give a mapping of stage names to settings (see conf/experiment/"
                "scan_cifar10.yaml), or null for one stage."]
    tasks = [n for n, t in (cfg.task or {}).items() if "_target_" in t]
    for name, stage in stages.items():
        key = f"stages.{name}"
        if not isinstance(stage, DictConfig):
            problems.append(f"{key}: give the stage's settings ({', '.join(STAGE_KEYS)}).")
            continue
        problems += [f"{key}.{k} is not a stage setting; choose from {', '.join(STAGE_KEYS)}."
                     for k in stage if k not in STAGE_KEYS]
        epochs = stage.get("epochs")
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            problems.append(f"{key}.epochs={epochs!r}: give the stage's number of epochs (>= 1).")
        images = stage.get("images")
        if images is not None and (isinstance(images, bool) or not isinstance(images, int) or images < 1):
            problems.append(f"{key}.images={images!r}: the number of training images the stage reads "
                            "(>= 1; its epochs follow from the training set's size), or null.")
        cap = stage.get("max_time")
        if cap is not None and not (isinstance(cap, DictConfig) or isinstance(cap, str)
                                    and re.fullmatch(r"\d+:\d\d:\d\d:\d\d", cap)):
            problems.append(f"{key}.max_time={cap!r}: use DD:HH:MM:SS (00:01:30:00 for 90 "
                            "minutes), a dict such as {minutes: 90}, or null.")
        if stage.get("refresh", "every") not in REFRESH:
            problems.append(f"{key}.refresh={stage.refresh!r}: use {', '.join(REFRESH)}.")
        lr = stage.get("backbone_lr", 1.0)
        if isinstance(lr, bool) or not isinstance(lr, int | float) or lr < 0:
            problems.append(f"{key}.backbone_lr={lr!r}: a share of the optimiser's learning rate, >= 0.")
        every = stage.get("every_n_epochs")
        if every is not None and (not isinstance(every, int) or every < 1):
            problems.append(f"{key}.every_n_epochs={every!r}: must be >= 1.")
        for part in ("optimizer", "scheduler"):
            value = stage.get(part)
            if isinstance(value, DictConfig) and "_target_" not in value:
                problems.append(f"{key}.{part} has no _target_: a stage's {part} replaces the run's "
                                "whole, so give all of it (e.g. _target_: torch.optim.Adam, "
                                "_partial_: true, lr: 0.001).")
        size = stage.get("batch_size")
        if size is not None and (not isinstance(size, int) or size < 2):
            problems.append(f"{key}.batch_size={size!r}: must be >= 2.")
        problems += _task_problems(key, stage.get("tasks"), tasks)
    start = cfg.get("start_stage")
    if start is not None and start not in stages:
        problems.append(f"start_stage={start!r} is not a stage of this run; choose one of "
                        f"{', '.join(stages) or '(none: stages is empty)'}.")
    elif start is not None and start != next(iter(stages)) and not cfg.get("ckpt_path"):
        problems.append(f"start_stage={start} starts from the model the stage before it left: give "
                        "that checkpoint, ckpt_path=<run>/checkpoints/<stage before>/last.ckpt.")
    cap = cfg.get("max_stage_epochs")
    if cap is not None and (not isinstance(cap, int) or cap < 1):
        problems.append(f"max_stage_epochs={cap!r}: must be >= 1, or null.")
    return problems


def _task_problems(key: str, tasks: Any, known: list[str]) -> list[str]:
    if not isinstance(tasks, DictConfig) or not tasks:
        return [f"{key}.tasks: name the tasks this stage trains, e.g. tasks: {{contrastive: {{}}}}."]
    problems = []
    for name, settings in tasks.items():
        if name not in known:
            problems.append(f"{key}.tasks.{name} is not in the run's task list ({', '.join(known)}): add "
                            f"it, e.g. task=[...,{name}].")
            continue
        if settings is None:
            continue
        if not isinstance(settings, DictConfig):
            problems.append(f"{key}.tasks.{name}: give {{}} or overrides of {', '.join(TASK_KEYS)}.")
            continue
        problems += [f"{key}.tasks.{name}.{k} cannot be set per stage; choose from {', '.join(TASK_KEYS)} "
                     f"(set it in task.{name} for the whole run)." for k in settings if k not in TASK_KEYS]
    return problems


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


def plan_stages(cfg: DictConfig) -> list[Stage]:
    """The stages of a run with ``stages``, in order."""
    plan = []
    for index, (name, stage) in enumerate(cfg.stages.items()):
        weights = {str(t): float((given or {}).get("weight", cfg.task[t].get("weight", 1.0)))
                   for t, given in stage.tasks.items()}
        plan.append(Stage(str(name), index, stage_config(cfg, name), weights, task_settings(cfg, stage),
                          float(stage.get("backbone_lr", 1.0)), str(stage.get("refresh", "every"))))
    return plan
