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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, open_dict

from mtl_unsup.answer.choice import keep_stage, load_stage, settle_answer
from mtl_unsup.atomic import write_text
from mtl_unsup.build import Run, build_model, build_trainer, check_selection, fill_input_settings
from mtl_unsup.config import ConfigValueError
from mtl_unsup.extensions import finish_loggers
from mtl_unsup.history import HISTORY
from mtl_unsup.inference import load_checkpoint
from mtl_unsup.models.module import MultiTaskModule
from mtl_unsup.planning.budget import run_seconds
from mtl_unsup.planning.run import TimeLeftBar, plan_run, shows_progress
from mtl_unsup.results import format_table, write_results, write_run_info
from mtl_unsup.schedule import check_schedule
from mtl_unsup.stages import (
    Stage,
    as_timedelta,
    drop_unstaged_tasks,
    max_time_string,
    run_stages,
    size_stages,
)
from mtl_unsup.training import adopt_checkpoint, fit_and_test

PROGRESS = "stages.json"


def read_progress(out_dir: Path) -> tuple[dict[str, dict[str, float]], float]:
    """Stage name -> its metrics, for the stages this run has finished, and the seconds they took
    (what a resumed run has already spent of ``trainer.max_time``)."""
    path = out_dir / PROGRESS
    if not path.is_file():
        return {}, 0.0
    progress = json.loads(path.read_text())
    return progress["done"], float(progress.get("seconds", 0.0))


@rank_zero_only
def write_progress(out_dir: Path, done: dict[str, dict[str, float]], seconds: float) -> None:
    path = out_dir / PROGRESS
    write_text(path, json.dumps({"done": done, "seconds": round(seconds, 1)}, indent=2) + "\n")


def refuse_one_stage_run(out_dir: Path, plan: list[Stage]) -> None:
    """A run directory of one stage (``checkpoints/last.ckpt``, no stage's) is not resumed as
    stages: this command would start them from scratch beside it."""
    ckpts = out_dir / "checkpoints"
    if (ckpts / "last.ckpt").is_file() and not any((ckpts / s.name).is_dir() for s in plan):
        raise ConfigValueError(
            f"{out_dir} holds a run of one stage (checkpoints/last.ckpt), but this command trains "
            f"stages ({', '.join(s.name for s in plan)}): resume it with protocol=single (data=folder "
            "trains stages since 2026-12-05), or start a new run without resume=true.")


def check_stage_settings(plan: list[Stage], module: MultiTaskModule) -> None:
    """Every stage's task settings and views exist, checked before the first stage trains (a
    mistake in the last stage would otherwise surface hours later)."""
    for stage in plan:
        for name, values in stage.settings.items():
            task = module.tasks[name]
            for key in values:
                if not hasattr(task, key):
                    raise ConfigValueError(f"stages.{stage.name}.tasks.{name}.{key}: task {name} has no "
                                           f"setting {key}.")
            views = {values.get(k, getattr(task, k)) for k in ("view", "weak_view") if hasattr(task, k)}
            missing = sorted(v for v in views if v not in module.augmentations)
            if missing:
                raise ConfigValueError(
                    f"stages.{stage.name}.tasks.{name} reads the view {missing[0]!r}, which is not in "
                    f"data.augmentations ({', '.join(sorted(module.augmentations))}).")


def enter_stage(stage: Stage, module: MultiTaskModule, datamodule, seed: int, fresh: bool) -> None:
    """Set the model and data up for ``stage``; ``fresh``: the stage starts now (not resumed),
    so the targets its policy makes at its start are due at its first epoch."""
    cfg = stage.cfg
    module.enter_stage(stage.index, stage.weights, stage.settings, instantiate(cfg.optimizer),
                       instantiate(cfg.scheduler) if cfg.scheduler else None, stage.backbone_lr,
                       stage.refresh)
    datamodule.batch_size = int(cfg.data.batch_size)
    datamodule.shuffle_seed = seed + 1000 * stage.index  # each stage its own order of batches
    for name in stage.weights:
        task = module.tasks[name]
        if not task.refreshes or not fresh:  # a resumed stage's targets come with its checkpoint
            continue
        if stage.refresh == "never" and name not in module.targets.states:
            raise ConfigValueError(
                f"stages.{stage.name} trains task {name} with refresh=never, but no earlier stage "
                f"(nor the checkpoint it started from) made its targets. Use refresh=once (targets from "
                "the previous stage's model) or "
                "train the task in an earlier stage.")
        if stage.refresh != "never":
            module.targets.mark_due(name)
    check_schedule(cfg, {n: module.tasks[n] for n in stage.weights})


def where_to_start(plan: list[Stage], out_dir: Path, resuming: bool, done: dict[str, dict[str, float]],
                   start_stage: str | None) -> tuple[int, Path | None]:
    """The index of the first stage to run, and the checkpoint it continues from: inside that
    stage (its own ``last.ckpt``) or from the end of the stage before (that stage's)."""
    first = next((i for i, s in enumerate(plan) if s.name not in done), len(plan)) if resuming else (
        [s.name for s in plan].index(start_stage) if start_stage else 0)
    if not resuming:
        return first, None
    if first == len(plan):  # every stage done: the last one's model writes the results
        last = out_dir / "checkpoints" / plan[-1].name / "last.ckpt"
        return first, last if last.is_file() else None
    own = out_dir / "checkpoints" / plan[first].name / "last.ckpt"
    before = out_dir / "checkpoints" / plan[first - 1].name / "last.ckpt" if first else None
    return first, own if own.is_file() else before if before is not None and before.is_file() else None


def cap_stage_time(stage: Stage, started: float, budget: float | None,
                   share: float | None, trained: float = 0.0, planned: bool = False) -> None:
    """A run's ``trainer.max_time`` is the whole run's budget (``budget`` seconds from ``started``,
    a ``time.monotonic()`` reading): each stage gets at most what is left of it, at most its own
    ``max_time`` and at most its ``time_share`` of the budget (so a long first stage leaves the
    next its time). A stage resumed after ``trained`` seconds has them counted by its Timer
    already, so its cap adds them. A ``planned`` run's stages are sized to end in time: the cap
    is only the run's budget, a guard against a plan gone wrong, not the share."""
    if budget is None:  # no budget: each stage's own max_time alone
        return
    if planned:
        share = None
    left = max(1, int(started + budget - time.monotonic() + trained))
    own = as_timedelta(stage.cfg.trainer.max_time)
    cap = min(left, own.total_seconds()) if own is not None else left
    if share is not None:
        cap = max(1, min(cap, int(share * budget)))
    with open_dict(stage.cfg):
        stage.cfg.trainer.max_time = max_time_string(cap)


def trained_seconds(ckpt: dict) -> float:
    """The training seconds a stage checkpoint's Timer had counted (0 without one): Lightning
    restores them into the resumed stage's ``max_time``, and the run's budget must count them."""
    callbacks = ckpt.get("callbacks") or {}
    timer = next((v for k, v in callbacks.items() if str(k).startswith("Timer")), {})
    return float(timer.get("time_elapsed", {}).get("train", 0.0))


def stage_table(plan: list[Stage], metrics: dict[str, dict[str, float]]) -> str:
    """One table per stage, in order."""
    blocks = []
    for stage in plan:
        if stage.name in metrics:
            blocks.append(f"stage {stage.index + 1} of {len(plan)}: {stage.name}\n"
                          + format_table(metrics[stage.name]))
    return "\n\n".join(blocks)


def stage_line(stage: Stage, num_stages: int, images: int | None, num_train: int) -> str:
    """The line a stage starts with: its tasks and how long it trains (its epochs, the images they
    read where the stage is sized by ``images``, or the debug preset's batches)."""
    trainer = stage.cfg.trainer
    if trainer.get("fast_dev_run"):
        batches = int(trainer.fast_dev_run)
        length = f"fast_dev_run: {batches} batch{'es' if batches > 1 else ''}"
    else:
        length = f"{trainer.max_epochs} epochs"
        if images:
            reads = trainer.max_epochs * num_train
            length += (f" for {images:,} images over {num_train:,}"
                       + ("" if reads >= images else f": capped, {reads:,} images"))
        for limit in ("overfit_batches", "limit_train_batches"):  # the debug presets' other limits
            value = trainer.get(limit)  # an int is batches; a float a share (1.0: all)
            if value and not (isinstance(value, float) and value == 1.0):
                length += f", {limit}: {value}"
    return f"stage {stage.index + 1} of {num_stages}: {stage.name} ({', '.join(stage.weights)}; {length})"


def stage_dirs(out_dir: Path, stage: Stage) -> tuple[Path, Path]:
    """Where a stage's checkpoints and epoch history go: ``checkpoints/<stage>/`` and
    ``<stage>/``, or the run directory's own for a run of one stage."""
    return out_dir / "checkpoints" / stage.name, out_dir / stage.name


@dataclass
class Start:
    """Where a run starts: its stages, data and model (built and checked), the stages done,
    the first to run and the checkpoint it continues from (``inside``: its own), and the seconds
    earlier sittings spent (``spent`` on finished stages, ``trained`` inside the first)."""

    plan: list[Stage]
    datamodule: Any
    module: MultiTaskModule
    done: dict[str, dict[str, float]]
    first: int
    start_from: Path | None
    inside: bool
    spent: float
    trained: float
    done_epochs: int = 0  # of the stage resumed inside


def prepare(cfg: DictConfig, ckpt_path: str | None, out_dir: Path, staged: bool) -> Start:
    """Build and check the run's stages, data and model, and find where it starts."""
    unused = drop_unstaged_tasks(cfg)
    if unused:
        rank_zero_info(f"tasks no stage trains, left out: {', '.join(unused)}")
    fill_input_settings(cfg)  # before the stages copy the config: the last one's draws the pictures
    plan = run_stages(cfg)
    # a checkpoint of this run directory is resumed; any other gives its weights (and targets)
    resuming = bool(ckpt_path) and (Path(ckpt_path).resolve().is_relative_to(out_dir.resolve())
                                    or (not staged and bool(cfg.resume)))
    if resuming and staged:  # before any image is decoded
        refuse_one_stage_run(out_dir, plan)
    datamodule, module = build_model(plan[0].cfg, staged=True)
    if staged:
        size_stages(plan, cfg, datamodule.num_train)
        check_stage_settings(plan, module)
    tasks = dict(module.tasks.items())
    for stage in plan:  # the monitor must be logged by every stage, the objective at the end
        check_selection(stage.cfg, datamodule, tasks, stage.weights, objective=stage is plan[-1])
    probe = Run(datamodule, module, None, None)  # type: ignore[arg-type]
    done, spent = read_progress(out_dir) if resuming and staged else ({}, 0.0)
    first, start_from = where_to_start(plan, out_dir, resuming, done, cfg.get("start_stage"))
    own_dir = stage_dirs(out_dir, plan[min(first, len(plan) - 1)])[0]
    inside = start_from is not None and start_from.parent == own_dir
    if not staged and resuming:  # resume=true continues the checkpoint it found, wherever it is
        start_from, inside = Path(ckpt_path), True  # type: ignore[arg-type]
    # stages.json counts finished stages; the one resumed inside, its checkpoint's time and epochs
    trained, done_epochs = 0.0, 0
    if ckpt_path and not resuming:
        adopt_checkpoint(ckpt_path, False, probe)
    elif start_from is not None:  # checks that the run's images are these
        ckpt = load_checkpoint(start_from, key="ckpt_path")
        adopt_checkpoint(str(start_from), True, probe, ckpt)
        trained = trained_seconds(ckpt) if inside else 0.0
        done_epochs = int(ckpt.get("epoch", 0)) if inside else 0
    return Start(plan, datamodule, module, done, first, start_from, inside, spent, trained, done_epochs)


def train_stages(cfg: DictConfig, ckpt_path: str | None, out_dir: Path,
                 extra_callbacks: tuple[L.Callback, ...] = ()) -> dict[str, float]:
    """Run every stage of the run in order (a run without ``stages`` is one), from ``ckpt_path``
    (None: from scratch) into ``out_dir`` (both from :func:`~mtl_unsup.training.start_run`),
    within the plan of :mod:`mtl_unsup.planning.run`; returns the metrics written to
    ``metrics.json``."""
    staged = bool(cfg.get("stages"))
    at = prepare(cfg, ckpt_path, out_dir, staged)
    plan, datamodule, module, done, inside = at.plan, at.datamodule, at.module, at.done, at.inside
    write_run_info(out_dir)
    run_plan = plan_run(cfg, plan, at.first, module, datamodule, out_dir, at.spent + at.trained, inside,
                        at.done_epochs)
    budget = as_timedelta(cfg.trainer.get("max_time"))
    seconds = budget.total_seconds() if budget is not None else None
    started = time.monotonic() - at.spent - at.trained - (run_seconds() if run_plan is not None else 0.0)
    run = Run(datamodule, module, None, None)  # type: ignore[arg-type]
    kept = {s.name: k for s in plan[:at.first] if (k := load_stage(s.name, out_dir / s.name)) is not None}
    for stage in plan[at.first:]:
        cap_stage_time(stage, started, seconds, cfg.stages[stage.name].get("time_share") if staged else None,
                       at.trained if inside else 0.0, planned=run_plan is not None)
        enter_stage(stage, module, datamodule, cfg.seed, fresh=not inside)
        ckpt_dir, history_dir = stage_dirs(out_dir, stage)
        shown = run_plan is not None and shows_progress(stage.cfg)
        bar = TimeLeftBar(run_plan, stage.name) if shown else None  # type: ignore[arg-type]
        # a run of one stage keeps the run directory's own history and picture names
        trainer, checkpoint = build_trainer(stage.cfg, ckpt_dir, history_dir if staged else None,
                                            stage.refresh, bar)
        trainer.callbacks.extend(extra_callbacks)
        run = Run(datamodule, module, trainer, checkpoint)
        if staged:
            rank_zero_info(stage_line(stage, len(plan), cfg.stages[stage.name].get("images"),
                                      datamodule.num_train))
        keeper = run_plan.stage_started(stage) if run_plan is not None else None
        if keeper is not None:
            trainer.callbacks.append(keeper)
        done[stage.name] = fit_and_test(run, str(at.start_from) if inside else None, ckpt_dir / "last.ckpt")
        clusterings = keep_stage(stage.name, module, history_dir if staged else None,
                                 cfg.cluster.get("pca_dim"))
        if clusterings is not None:
            kept[stage.name] = clusterings
        inside = False
        if staged:
            write_progress(out_dir, done, time.monotonic() - started)
        if run_plan is not None:
            run_plan.stage_done(stage, trainer.current_epoch, trainer.current_epoch - (
                at.done_epochs if stage is plan[at.first] and at.inside else 0))
        if stage is not plan[-1]:  # the last stage's loggers still get the final pictures
            finish_loggers(trainer)
    metrics = finish_run(cfg, at, run, kept, out_dir, staged)
    if run_plan is not None and rank_zero_only.rank == 0:
        run_plan.finish()
    return metrics


def finish_run(cfg: DictConfig, at: Start, run: Run, kept: dict[str, Any], out_dir: Path,
               staged: bool) -> dict[str, float]:
    """Choose the answer among every stage's candidates, write ``metrics.json``, the pictures and
    the report; returns the metrics."""
    plan, done, module, last = at.plan, at.done, at.module, at.plan[-1]
    if run.trainer is None:  # every stage was done (killed before metrics.json): write it now
        if (out_dir / "metrics.json").exists():
            raise ConfigValueError(f"Every stage of the run in {out_dir} is done; its results are in "
                                   "metrics.json.")
        run = Run(at.datamodule, module, *build_trainer(last.cfg, *stage_dirs(out_dir, last), last.refresh))
    ordered = [kept[s.name] for s in plan if s.name in kept]
    chosen, answer_ckpt = settle_answer(cfg, ordered, done, module, out_dir,
                                        {s.name: stage_dirs(out_dir, s)[0] for s in plan})
    metrics = chosen or dict(done[last.name])
    if staged:
        for name, values in done.items():
            metrics.update({f"{name}/{k}": v for k, v in values.items()})
    ckpt_dir, history_dir = stage_dirs(out_dir, last)
    write_results(run, last.cfg, out_dir, dict(sorted(metrics.items())),
                  answer_ckpt or ckpt_dir / "last.ckpt", history_dir / HISTORY,
                  stage_table(plan, done) if staged else None)
    finish_loggers(run.trainer)
    return metrics
