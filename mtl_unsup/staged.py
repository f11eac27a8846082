"""Run the stages of a run in turn, into one run directory (see :mod:`mtl_unsup.stages`).

One model holds every task of every stage, so a later stage keeps what an earlier one built (the
SCAN heads a self-labelling stage trains, the neighbours mined at a stage's start). Each stage
gets its own trainer (epochs, optimiser, scheduler, batch size, refresh policy), writes its
checkpoints to ``checkpoints/<stage>/`` and its epoch history to ``<stage>/epochs.jsonl``, and is
tested when it ends: its metrics are ``<stage>/<split>/<metric>`` in ``metrics.json``, where the
last stage's are also the run's own (``test/acc``, ...). ``stages.json`` records the stages done,
so ``resume=true`` continues inside the stage that was running.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_unsup.build import Run, build_model, build_trainer
from mtl_unsup.config import ConfigValueError
from mtl_unsup.extensions import finish_loggers
from mtl_unsup.history import HISTORY
from mtl_unsup.inference import load_checkpoint
from mtl_unsup.models.module import MultiTaskModule
from mtl_unsup.results import format_table, write_results, write_run_info
from mtl_unsup.schedule import check_schedule
from mtl_unsup.stages import Stage, plan_stages
from mtl_unsup.training import adopt_checkpoint, fit_and_test, start_run

PROGRESS = "stages.json"


def read_progress(out_dir: Path) -> dict[str, dict[str, float]]:
    """Stage name -> its metrics, for the stages this run has finished."""
    path = out_dir / PROGRESS
    return json.loads(path.read_text())["done"] if path.is_file() else {}


@rank_zero_only
def write_progress(out_dir: Path, done: dict[str, dict[str, float]]) -> None:
    path = out_dir / PROGRESS
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"done": done}, indent=2) + "\n")
    tmp.replace(path)


def enter_stage(stage: Stage, module: MultiTaskModule, datamodule, seed: int, fresh: bool) -> None:
    """Set the model and data up for ``stage``; ``fresh``: the stage starts now (not resumed),
    so the targets its policy makes at its start are due at its first epoch."""
    cfg = stage.cfg
    module.enter_stage(stage.index, stage.weights, stage.settings, instantiate(cfg.optimizer),
                       instantiate(cfg.scheduler) if cfg.scheduler else None, stage.backbone_lr)
    datamodule.batch_size = int(cfg.data.batch_size)
    datamodule.shuffle_seed = seed + 1000 * stage.index  # each stage its own order of batches
    for name in stage.weights:
        task = module.tasks[name]
        if not task.refreshes:
            continue
        if stage.refresh == "never" and task.dataset_state() is None:
            raise ConfigValueError(
                f"stages.{stage.name} trains task {name} with refresh=never, but no earlier stage "
                f"made its targets. Use refresh=once (targets from the previous stage's model) or "
                "train the task in an earlier stage.")
        if fresh and stage.refresh != "never":
            task.refreshed_epoch = None
    check_schedule(cfg, {n: module.tasks[n] for n in stage.weights})


def where_to_start(plan: list[Stage], ckpt_path: str | None, resuming: bool,
                   done: dict[str, dict[str, float]], start_stage: str | None) -> tuple[int, str | None]:
    """The index of the first stage to run, and the checkpoint its fit continues (None: the
    stage starts afresh from the model as it is)."""
    names = [s.name for s in plan]
    if resuming and ckpt_path:
        stage = Path(ckpt_path).parent.name
        if stage in names and stage not in done:
            return names.index(stage), ckpt_path
    first = names.index(start_stage) if start_stage else 0
    while first < len(plan) and plan[first].name in done:
        first += 1
    return first, None


def last_done_checkpoint(out_dir: Path, plan: list[Stage], first: int) -> Path | None:
    """The final checkpoint of the stage before ``first`` (where a resumed run picks up)."""
    if first == 0:
        return None
    path = out_dir / "checkpoints" / plan[first - 1].name / "last.ckpt"
    return path if path.is_file() else None


def as_timedelta(value: Any) -> timedelta | None:
    """A ``trainer.max_time`` value (``DD:HH:MM:SS`` or a dict such as ``{hours: 1}``)."""
    if value is None:
        return None
    if isinstance(value, str):
        days, hours, minutes, seconds = (int(v) for v in value.split(":"))
        return timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)
    return timedelta(**OmegaConf.to_container(value) if isinstance(value, DictConfig) else value)


def cap_stage_time(stage: Stage, deadline: float | None) -> None:
    """A run's ``trainer.max_time`` is the whole run's budget: each stage gets at most what is
    left of it (and at most its own ``max_time``)."""
    if deadline is None:
        return
    left = timedelta(seconds=max(1, int(deadline - time.monotonic())))
    own = as_timedelta(stage.max_time)
    cap = min(left, own) if own is not None else left
    with open_dict(stage.cfg):
        stage.cfg.trainer.max_time = max_time_string(cap)


def max_time_string(value: timedelta) -> str:
    """``DD:HH:MM:SS``, as ``trainer.max_time`` takes it."""
    seconds = int(value.total_seconds())
    return f"{seconds // 86400:02d}:{seconds // 3600 % 24:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def stage_table(plan: list[Stage], metrics: dict[str, dict[str, float]]) -> str:
    """One table per stage, in order."""
    blocks = []
    for stage in plan:
        if stage.name in metrics:
            blocks.append(f"stage {stage.index + 1} of {len(plan)}: {stage.name}\n"
                          + format_table(metrics[stage.name]))
    return "\n\n".join(blocks)


def train_stages(cfg: DictConfig, extra_callbacks: tuple[L.Callback, ...] = ()) -> dict[str, float]:
    """Run every stage of ``cfg.stages`` in order; returns the metrics written to ``metrics.json``."""
    ckpt_path, out_dir = start_run(cfg)
    plan = plan_stages(cfg)
    datamodule, module = build_model(plan[0].cfg, staged=True)
    resuming = bool(ckpt_path) and (bool(cfg.resume) or
                                    Path(ckpt_path).resolve().is_relative_to(out_dir.resolve()))
    done = read_progress(out_dir) if resuming else {}
    first, resume_from = where_to_start(plan, ckpt_path, resuming, done, cfg.get("start_stage"))
    if first == len(plan):
        raise ConfigValueError(f"Every stage of the run in {out_dir} is done ({', '.join(done)}); "
                               "its results are in metrics.json.")
    previous = last_done_checkpoint(out_dir, plan, first) if resuming and resume_from is None else None
    if ckpt_path and not resuming:  # another run's weights (and targets), e.g. a pretext stage's
        probe = Run(datamodule, module, None, None)  # type: ignore[arg-type]
        adopt_checkpoint(ckpt_path, False, probe)
    elif previous is not None:
        module.load_weights(load_checkpoint(str(previous), key="resume"), str(previous))
    write_run_info(out_dir)
    budget = as_timedelta(cfg.trainer.get("max_time"))
    deadline = time.monotonic() + budget.total_seconds() if budget is not None else None
    run = None
    for stage in plan[first:]:
        cap_stage_time(stage, deadline)
        fresh = stage.name != Path(resume_from or "").parent.name
        enter_stage(stage, module, datamodule, cfg.seed, fresh)
        ckpt_dir = out_dir / "checkpoints" / stage.name
        trainer, checkpoint = build_trainer(stage.cfg, ckpt_dir, out_dir / stage.name, stage.refresh)
        trainer.callbacks.extend(extra_callbacks)
        run = Run(datamodule, module, trainer, checkpoint)
        rank_zero_info(f"stage {stage.index + 1} of {len(plan)}: {stage.name} "
                       f"({', '.join(stage.weights)}; {stage.cfg.trainer.max_epochs} epochs)")
        done[stage.name] = fit_and_test(run, None if fresh else resume_from, ckpt_dir / "last.ckpt")
        write_progress(out_dir, done)
        finish_loggers(trainer)
    metrics = dict(done[plan[-1].name])
    for name, values in done.items():
        metrics.update({f"{name}/{k}": v for k, v in values.items()})
    last = plan[-1]
    write_results(run, last.cfg, out_dir, dict(sorted(metrics.items())),
                  out_dir / "checkpoints" / last.name / "last.ckpt", out_dir / last.name / HISTORY,
                  stage_table(plan, done))
    return metrics
