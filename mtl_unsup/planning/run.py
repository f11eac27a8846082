"""A run's plan in the run: probe, plan and size the stages before training, keep the plan true
as stages end, record it in ``plan.json``, and show the time left on the progress bar.

The arithmetic is :mod:`mtl_unsup.planning.budget`, the measuring :mod:`mtl_unsup.planning.probe`.
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, ListConfig, open_dict

from mtl_unsup.data.datamodule import ImageFolderDataModule
from mtl_unsup.planning.budget import (
    PLAN_FILE,
    Plan,
    StageCost,
    StagePlan,
    describe,
    hms,
    make_plan,
    read_plan,
    replan,
    run_seconds,
    write_plan,
)
from mtl_unsup.stages import Stage, as_timedelta

# How far a finished stage's speed may move the estimate of the stages after it.
SPEED_RANGE = (0.5, 3.0)


def no_plan_reason(cfg: DictConfig, datamodule: Any) -> str | None:
    """Why this run is not planned (None: it is): the debug presets, several processes, or rows
    of features (whose steps cost next to nothing)."""
    trainer = cfg.trainer
    if trainer.get("fast_dev_run") or cfg.get("max_stage_epochs") is not None:
        return "a debug preset sets the epochs"
    if not one_process(trainer):
        return "the probe measures one process, and this run may have several"
    if not isinstance(datamodule, ImageFolderDataModule) or datamodule.embeddings is not None:
        return "it trains on rows of features"
    return None


def one_process(trainer: DictConfig) -> bool:
    """Whether the trainer runs one process: one device (``1``, ``[0]``, ``"1"``; ``auto`` where
    at most one GPU is seen) on one node."""
    import torch

    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1)
    if str(nodes) != "1":
        return False
    text = str(devices).strip()
    alone = trainer.get("accelerator") == "cpu" or torch.cuda.device_count() <= 1
    if text == "1" or (text in ("auto", "-1") and alone):
        return True
    return isinstance(devices, ListConfig | list | tuple) and len(devices) == 1


def machine() -> str:
    return f"{os.cpu_count()} cores ({platform.machine()})"


def budget_seconds(cfg: DictConfig) -> float | None:
    budget = as_timedelta(cfg.trainer.get("max_time"))
    return None if budget is None else budget.total_seconds()


def decode_all(datamodule: Any) -> None:
    """Decode every split now (training would at its start): its time counts as start-up."""
    for split in datamodule.splits:
        datamodule._dataset(split)


def stage_shares(cfg: DictConfig, stages: list[Stage]) -> list[float | None]:
    return [(cfg.stages[s.name].get("time_share") if cfg.get("stages") else None) for s in stages]


def scale_start_epochs(stage: Stage, module: Any, epochs: int) -> None:
    """A stage cut to ``epochs`` of its ``trainer.max_epochs`` starts and stops its tasks at the
    same points of its schedule (a task that starts after 20 of 80 epochs starts after 5 of 20)."""
    asked = int(stage.cfg.trainer.max_epochs)
    for name in stage.weights:
        task = module.tasks[name]
        values = stage.settings.setdefault(name, {})
        for key in ("start_epoch", "stop_epoch"):
            given = values.get(key, getattr(task, key, None))
            if given is not None:
                scaled = int(round(int(given) * epochs / asked))
                values[key] = min(epochs - 1, scaled) if key == "start_epoch" else max(1, scaled)


def apply_plan(stages: list[Stage], parts: list[StagePlan], module: Any) -> None:
    """Give each stage its planned epochs (its scheduler's ``T_max`` follows them)."""
    for stage, part in zip(stages, parts, strict=True):
        if part.epochs != int(stage.cfg.trainer.max_epochs):
            scale_start_epochs(stage, module, part.epochs)
            with open_dict(stage.cfg):
                stage.cfg.trainer.max_epochs = part.epochs


class RunPlan:
    """The plan of one run as it goes: made before the first stage trains, re-made after each."""

    def __init__(self, plan: Plan, costs: list[StageCost], shares: list[float | None],
                 stages: list[Stage], module: Any, out_dir: Path, before: float) -> None:
        self.plan, self.costs, self.shares = plan, costs, shares
        self.stages, self.module, self.path, self.before = stages, module, out_dir / PLAN_FILE, before
        self.started: dict[str, float] = {}

    def elapsed(self) -> float:
        """Seconds of the run so far, earlier sittings of a resumed run included."""
        return self.before + run_seconds()

    def left(self, stage: str | None = None, share_done: float = 0.0) -> float:
        """Seconds the run still needs: with ``stage`` running and ``share_done`` of its epochs
        done, the rest of it at the speed it has had so far, then the stages after it and the
        report as planned; without, what the plan still expects."""
        if stage is None or stage not in self.started or share_done <= 0:
            return max(0.0, self.plan.estimate - self.elapsed())
        index = next(i for i, s in enumerate(self.plan.stages) if s.name == stage)
        spent = time.monotonic() - self.started[stage]
        later = sum(p.seconds for p in self.plan.stages[index + 1:])
        return spent / share_done * (1 - share_done) + self.costs[index].end + later + self.plan.report

    def stage_started(self, stage: Stage) -> KeepToPlan | None:
        """Note the stage's start; with a budget, the callback that keeps it to its time."""
        self.started[stage.name] = time.monotonic()
        if self.plan.budget is None:
            return None
        index = next(i for i, s in enumerate(self.stages) if s.name == stage.name)
        part, cost = self.plan.stages[index], self.costs[index]
        slack = max(0.0, self.plan.budget - self.plan.estimate)  # what the plan kept in hand
        # a cut is written at once: a stage resumed inside keeps the epochs its scheduler has
        return KeepToPlan(part, time.monotonic() + part.seconds - cost.end + slack,
                          lambda: write_plan(self.path, self.plan))

    def stage_done(self, stage: Stage, epochs: int, sitting: int | None = None) -> None:
        """Record what ``stage`` did (``epochs`` in all, ``sitting`` of them in this process) and
        plan the stages after it from the time really left."""
        part = self.plan.stage(stage.name)
        part.actual_epochs = epochs
        part.actual_seconds = time.monotonic() - self.started.get(stage.name, time.monotonic())
        index = next(i for i, s in enumerate(self.stages) if s.name == stage.name)
        cost = self.costs[index]
        expected = cost.seconds(max(1, epochs if sitting is None else sitting))
        speed = min(max(part.actual_seconds / expected, SPEED_RANGE[0]), SPEED_RANGE[1]) if expected else 1.0
        later = index + 1
        if later < len(self.stages) and self.plan.budget is not None:
            replan(self.plan, self.costs, self.shares, later, self.elapsed(), speed)
            apply_plan(self.stages[later:], self.plan.stages[later:], self.module)
            rank_zero_info(f"re-planned after {stage.name or 'training'} ({speed:.2f}x the probe's time): "
                           + ", ".join(f"{p.name} {p.epochs} epochs" for p in self.plan.stages[later:]))
        write_plan(self.path, self.plan)

    def finish(self) -> None:
        """The whole command's time, once the results and the report are written."""
        self.plan.total_seconds = round(self.elapsed(), 1)
        write_plan(self.path, self.plan)
        budget = self.plan.budget
        rank_zero_only(print)(f"run time:   {hms(self.plan.total_seconds)}"
                       + (f" of trainer.max_time={hms(budget)}" if budget is not None else
                          f" (estimated {hms(self.plan.estimate)})") + f" ({PLAN_FILE})")


def plan_run(cfg: DictConfig, stages: list[Stage], first: int, module: Any, datamodule: Any,
             out_dir: Path, before: float, resumed_inside: bool, done_epochs: int = 0) -> RunPlan | None:
    """Probe the stages from ``first`` on, plan them within ``trainer.max_time`` (or estimate
    them without one), size their epochs, print the plan and write ``plan.json``. ``before``:
    seconds earlier sittings of this run spent; ``resumed_inside``: the first stage continues
    from its own checkpoint, ``done_epochs`` of it done, and keeps the epochs it was planned with
    (its scheduler was sized by them); a budget spent by then leaves each later stage one epoch."""
    from mtl_unsup.planning.probe import probe_costs

    todo = stages[first:]
    budget = budget_seconds(cfg)
    reason = no_plan_reason(cfg, datamodule) if todo else "every stage is done"
    if reason is None and budget is None and not cfg.get("estimate", True):
        return None
    if reason is not None:
        if budget is not None and todo:
            rank_zero_info(f"trainer.max_time={hms(budget)} caps each stage; no plan, as {reason}.")
        return None
    decode_all(datamodule)
    probe_start = time.monotonic()
    costs, report = probe_costs(todo, module, datamodule, cfg)
    probe = time.monotonic() - probe_start
    asked = [int(s.cfg.trainer.max_epochs) for s in todo]
    shares = stage_shares(cfg, todo)
    keep = None
    if resumed_inside:  # the stage resumed inside keeps its epochs; only what is left of it costs
        earlier = {s["name"]: s["epochs"] for s in (read_plan(out_dir / PLAN_FILE) or {}).get("stages", [])}
        keep = int(earlier.get(todo[0].name, asked[0]))
        asked, shares[0] = [max(1, keep - done_epochs), *asked[1:]], None
    # a resumed run whose budget is spent still ends its stage, then gives each later one an epoch
    plan = make_plan(costs, asked, shares, budget, before + run_seconds(), report, probe,
                     at_least=keep is not None)
    if keep is not None:
        plan.stages[0].epochs, plan.stages[0].asked = keep, int(todo[0].cfg.trainer.max_epochs)
    apply_plan(todo, plan.stages, module)
    rank_zero_only(print)(describe(plan, machine()), flush=True)
    run_plan = RunPlan(plan, costs, shares, todo, module, out_dir, before)
    write_plan(run_plan.path, plan)
    return run_plan


def shows_progress(cfg: DictConfig) -> bool:
    """Whether Lightning's own progress bar is on (not off, nor replaced by another)."""
    callbacks = cfg.get("callbacks") or {}
    return bool(cfg.trainer.get("enable_progress_bar", True)) and not any(
        "ProgressBar" in str((c or {}).get("_target_", "")) for c in callbacks.values())


class KeepToPlan(L.Callback):
    """Keeps a planned stage to its time: after each epoch of the first half of the stage, when
    its epochs run slower than planned, the epochs left are cut to what the time left holds at
    the speed they really had (the first epoch, which holds the stage's start, aside). The
    scheduler's ``T_max`` follows, so a cosine schedule still ends at its final learning rate (it
    bends where the plan changed, and goes on to the new end). It never lengthens a stage: the
    probe times every task of the stage active, and a task that starts later (a clustering task
    after its warm-up) makes the later epochs dearer than the first. Past half way the plan holds
    (the run's time cap guards the budget): a schedule cut late would end far from its final rate."""

    def __init__(self, part: StagePlan, deadline: float, on_cut: Any = None) -> None:
        self.part, self.deadline, self.on_cut = part, deadline, on_cut
        self._first: int | None = None  # this sitting's first epoch (a resumed stage's is not 0)
        self._second: float | None = None

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self._first is None:
            self._first = trainer.current_epoch
        elif self._second is None:
            self._second = time.monotonic()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epoch, now = trainer.current_epoch, time.monotonic()
        if self._second is None or self._first is None or epoch <= self._first:
            return
        rate = (now - self._second) / (epoch - self._first)  # the sitting's epochs after its first
        planned = int(trainer.fit_loop.max_epochs)
        if 2 * (epoch + 1) > planned:
            return
        fits = epoch + 1 + max(0, int((self.deadline - now) / rate)) if rate > 0 else planned
        # never below the latest task start (and a second epoch of it): each task trains
        starts = [module.tasks[n].start_epoch for n in module.tasks if module.task_weight(n) > 0] \
            if module is not None else []
        floor = max(starts, default=0) + 2 if any(starts) else 1
        epochs = max(epoch + 1, min(planned, max(fits, floor)))
        if planned - epochs < max(1, 0.05 * planned):
            return
        trainer.fit_loop.max_epochs = epochs
        for config in trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "T_max"):
                config.scheduler.T_max = epochs
        self.part.epochs = epochs
        if self.on_cut is not None and trainer.is_global_zero:
            self.on_cut()


class TimeLeftBar(TQDMProgressBar):
    """Lightning's progress bar with the whole run's time left (all stages, the report) beside it."""

    def __init__(self, run_plan: RunPlan, stage: str) -> None:
        super().__init__()
        self.run_plan, self.stage = run_plan, stage

    def get_metrics(self, trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, module)
        total = trainer.num_training_batches
        batches = max(1, int(total)) if total != float("inf") else 1
        done = trainer.current_epoch + trainer.fit_loop.epoch_loop.batch_progress.current.ready / batches
        share = done / max(1, int(trainer.max_epochs or 1))
        metrics["run left"] = hms(self.run_plan.left(self.stage, min(share, 1.0)))
        return metrics
