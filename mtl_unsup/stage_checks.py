"""What is wrong with a run's ``stages`` (:mod:`mtl_unsup.stages` says what each key means),
each problem naming the key and the fix; and command-line overrides the stages would silently
replace. Checked by :func:`~mtl_unsup.config.check_config` and ``mtl-train`` before any library
loads.
"""

from __future__ import annotations

import re
from typing import Any

from omegaconf import DictConfig

from mtl_unsup.stages import listed_tasks

STAGE_KEYS = ("tasks", "epochs", "images", "max_time", "time_share", "optimizer", "scheduler", "batch_size",
              "backbone_lr", "refresh", "every_n_epochs")
TASK_KEYS = ("weight", "view", "weak_view", "start_epoch", "stop_epoch")
REFRESH = ("every", "once", "never")


def protocol_problem(cfg: DictConfig) -> str | None:
    """One message for a task list that lacks the tasks of the protocol in use (a data option's or
    ``protocol=``; ``protocol_name``, set by conf/protocol/<name>.yaml), naming the fix, instead of
    one per key."""
    name, stages = cfg.get("protocol_name"), cfg.get("stages")
    if not name or not isinstance(stages, DictConfig):
        return None
    if cfg.backbone.get("freeze"):
        return (f"backbone.freeze=true leaves the pretext stage of conf/protocol/{name}.yaml nothing to "
                "train: cluster the frozen features in one stage, protocol=single task=[cluster,scan] "
                "warmup_epochs=0 (README, \"Clustering with a pretrained model\").")
    listed = listed_tasks(cfg)
    missing = sorted({str(t) for s in stages.values() if isinstance(s, DictConfig)
                      for t in (s.get("tasks") or {}) if t not in listed})
    if not missing:
        return None
    plan = "; ".join(f"{s} ({', '.join(v.tasks)})" for s, v in stages.items() if isinstance(v, DictConfig))
    return (f"task=[{','.join(listed)}] lacks {', '.join(missing)}, which the stages of "
            f"conf/protocol/{name}.yaml train ({plan}). Add {'it' if len(missing) == 1 else 'them'} "
            f"(task=[{','.join(listed + missing)}]), or protocol=single to train the listed tasks "
            "together in one stage.")


def mixed_protocol(overrides: list[str], experiment: str | None) -> str | None:
    """A protocol named on the command line beside an experiment: Hydra would merge the two
    recipes (the protocol's stages and sizes under the experiment's own settings), which neither
    describes; an experiment sets its protocol itself."""
    named = next((o.split("=", 1)[1] for o in overrides if o.lstrip("+").split("=", 1)[0] == "protocol"),
                 None)
    if named in (None, "single") or experiment in (None, "null"):
        return None
    return (f"protocol={named} with experiment={experiment}: the experiment sets how its tasks "
            f"train, and the two would be merged into a recipe neither describes. Run the experiment "
            f"alone, or protocol={named} without it (e.g. data=folder data.root=...).")


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
    tasks = listed_tasks(cfg)
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
        share = stage.get("time_share")
        if share is not None and (isinstance(share, bool) or not isinstance(share, int | float)
                                  or not 0 < share <= 1):
            problems.append(f"{key}.time_share={share!r}: the largest share of the run's "
                            "trainer.max_time this stage may take, in (0, 1], or null.")
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
