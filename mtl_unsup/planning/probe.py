"""Measure what each stage of a run costs on this machine, before it trains (see
:mod:`mtl_unsup.planning.budget`).

For each stage, a copy of the model trains a few steps of that stage (its tasks, all active, at
its batch size and views, its targets refreshed once) on a few batches' worth of the training
images, in a trainer of its own; the model the run trains, its targets and the random streams are
left as they were. The steps give the cost of a training step, the refresh the cost of a feature
pass and of the clustering per image; a pass over the held-out images and the rest of the stage's
end are reckoned from them.
"""

from __future__ import annotations

import copy
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate

from mtl_unsup.clustering.callback import PseudoLabelCallback
from mtl_unsup.inference import eval_mode
from mtl_unsup.planning.budget import StageCost
from mtl_unsup.rng import collect_rng_states, set_rng_states
from mtl_unsup.stages import Stage

# Steps of each stage's probe (two epochs of this many batches; the first step is warm-up).
PROBE_STEPS = 4
# The report: seconds per held-out image (predictions, thumbnails) and for its t-SNE and pictures.
# Set by hand, not measured one by one: with them the whole command's estimate came within 1% of
# what it took on Imagenette at 10 minutes (573 s against 574) and 14% over on make train's digits.
REPORT_PER_IMAGE, REPORT_FIXED = 2e-4, 12.0


class _Clock(L.Callback):
    """Times each training step, the gaps between them, and the refresh at the first epoch start."""

    def __init__(self) -> None:
        self.steps: list[float] = []
        self.gaps: list[float] = []
        self.refresh = 0.0
        self.prelude = 0.0  # the second epoch's, from its start to its first step
        self.inside = 0.0  # the second epoch's steps and the gaps between them
        self.epoch = 0.0  # the second epoch, whole
        self._epoch_start = self._end = self._start = None

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._epoch_start, self._end = time.perf_counter(), None

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, i: int) -> None:
        now = time.perf_counter()
        if i == 0 and self._epoch_start is not None:  # the refresh ran between (callback order)
            if trainer.current_epoch == 0:
                self.refresh = now - self._epoch_start
            else:
                self.prelude = now - self._epoch_start
        if self._end is not None:
            self.gaps.append(now - self._end)
            if trainer.current_epoch > 0:
                self.inside += now - self._end
        self._start = now

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.current_epoch > 0 and self._epoch_start is not None:
            self.epoch = time.perf_counter() - self._epoch_start

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, *args: Any) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)
        self._end = time.perf_counter()
        if trainer.current_epoch > 0:
            self.inside += self._end - self._start
        if trainer.global_step > 1 or trainer.current_epoch > 0:  # the first step warms up
            self.steps.append(self._end - self._start)

    def overhead(self, refreshes: bool) -> float:
        """What an epoch costs beyond its steps (and its refresh, counted apart): Lightning's
        loops, the loader, the hooks."""
        return max(0.0, self.epoch - self.inside - (self.prelude if refreshes else 0.0))


class _RefreshStart(L.Callback):
    """Marks the start of the first epoch before the refresh callback runs."""

    def __init__(self, clock: _Clock) -> None:
        self.clock = clock

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.clock.on_train_epoch_start(trainer, module)


def sample_datamodule(datamodule: Any, images: int) -> Any:
    """The data module with its training split cut to its first ``images`` images (nothing else)."""
    sub = copy.copy(datamodule)
    sub.splits = {"train": datamodule.splits["train"].subset(range(min(images, datamodule.num_train)))}
    sub._datasets, sub._fingerprints = {}, {"train": "probe"}
    return sub


@torch.no_grad()
def pass_seconds(module: L.LightningModule, datamodule: Any, trainer: L.Trainer) -> float:
    """Seconds of the eval-mode feature pass per training image (the second batch, after warm-up),
    on the device the run trains on and at its precision (``fit`` has moved the model back)."""
    device = trainer.strategy.root_device
    module.to(device)
    loader = datamodule.cluster_dataloader()
    times = []
    with eval_mode(module), trainer.precision_plugin.forward_context():
        for batch in loader:
            start = time.perf_counter()
            module.features(batch["image"].to(device))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append((time.perf_counter() - start) / len(batch["index"]))
            if len(times) == 2:
                break
    module.cpu()
    return times[-1]


def probe_images(stage: Stage, module: L.LightningModule, datamodule: Any) -> int:
    """How many training images a stage's probe reads: a few batches, and at least a few times
    the largest k a refresh clusters at (or the neighbours it mines), so its targets can be made."""
    largest = max([int(module.num_clusters), *(k for *_, k in module.heads.values())])
    neighbours = max([int(getattr(t, "num_neighbors", 0)) for t in module.tasks.values()] or [0])
    wanted = max(PROBE_STEPS * int(stage.cfg.data.batch_size), 4 * largest, 4 * (neighbours + 1))
    return min(datamodule.num_train, wanted)


def probe_trainer(cfg: Any, refresh: str, clock: _Clock) -> L.Trainer:
    cluster = PseudoLabelCallback(k=cfg.cluster.k, settings=_cluster_settings(cfg), every_n_epochs=1,
                                  seed=cfg.seed, refresh="every" if refresh == "never" else refresh)
    return L.Trainer(accelerator=cfg.trainer.accelerator, devices=1, precision=cfg.trainer.precision,
                     max_epochs=2, limit_val_batches=0, num_sanity_val_steps=0, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                     callbacks=[_RefreshStart(clock), cluster, clock], default_root_dir=cfg.paths.output_dir)


def _cluster_settings(cfg: Any) -> Any:
    from mtl_unsup.build import cluster_settings

    return cluster_settings(cfg)


@dataclass
class Measured:
    """What one stage's probe measured, in seconds."""

    step: float  # one training step and the wait for the next batch
    refresh: float  # the refresh at its start, on the probe's images
    per_image: float  # the eval-mode feature pass, per image
    overhead: float  # an epoch beyond its steps
    save: float  # writing ``last.ckpt`` once


def probe_stage(stage: Stage, module: L.LightningModule, datamodule: Any) -> Measured:
    """A copy of ``module`` trains ``stage`` for two short epochs on a sample of the training
    images, its trainer then saves a checkpoint once."""
    cfg = stage.cfg
    batch = int(cfg.data.batch_size)
    sub = sample_datamodule(datamodule, probe_images(stage, module, datamodule))
    sub.batch_size = batch
    model = copy.deepcopy(module)
    # every task of the stage active from the first step, whatever its start epoch
    settings = {name: {**stage.settings.get(name, {}), "start_epoch": 0, "stop_epoch": None}
                for name in stage.weights}
    model.enter_stage(stage.index, stage.weights, settings, instantiate(cfg.optimizer),
                      None, stage.backbone_lr, stage.refresh)
    for name in stage.weights:
        if model.tasks[name].refreshes:
            model.targets.mark_due(name)
    clock = _Clock()
    trainer = probe_trainer(cfg, stage.refresh, clock)
    trainer.fit(model, datamodule=sub)
    per_image = pass_seconds(model, sub, trainer)
    step = statistics.median(clock.steps) if clock.steps else 0.0
    gap = statistics.median(clock.gaps) if clock.gaps else 0.0
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer.save_checkpoint(Path(tmp) / "probe.ckpt")
        save = time.perf_counter() - start
    refreshes = stage.refresh == "every" and any(model.tasks[t].refreshes for t in stage.weights)
    return Measured(step + gap, clock.refresh, per_image, clock.overhead(refreshes), save)


def stage_cost(stage: Stage, datamodule: Any, module: L.LightningModule, measured: Measured,
               probed_images: int) -> StageCost:
    """What ``stage`` costs on the whole folder, from what its probe measured."""
    step, refresh, per_image = measured.step, measured.refresh, measured.per_image
    cfg, n = stage.cfg, datamodule.num_train
    batch = int(cfg.data.batch_size)
    steps = n // batch if datamodule.drop_last and n > batch else -(-n // batch)
    providers = any(module.tasks[t].refreshes for t in stage.weights)
    pass_n = per_image * n
    compute = max(0.0, refresh - per_image * probed_images) * n / max(1, probed_images)
    bank = getattr(module, "feature_bank", None) is not None
    every = providers and stage.refresh == "every" and not module.features_fixed
    val = len(datamodule.splits.get("val", ()))
    check = cfg.trainer.get("check_val_every_n_epoch") or 1
    held_out = sum(len(datamodule.splits[s]) for s in datamodule.eval_splits())
    saves = steps / max(1, int(cfg.checkpoint.every_n_train_steps or steps or 1))
    return StageCost(
        name=stage.name, step=step, steps_per_epoch=max(1, steps),
        overhead=measured.overhead + saves * measured.save,
        refresh=(compute + (0.0 if bank else pass_n)) if every else 0.0,
        refreshes_per_epoch=1.0 / max(1, int(cfg.cluster.every_n_epochs)) if every else 0.0,
        start=pass_n + compute if providers and stage.refresh == "once" else 0.0,
        validation=per_image * val + compute * val / max(1, n),
        validations_per_epoch=(1.0 / check) if val else 0.0,
        end=pass_n + compute + per_image * held_out + 1.0)


def report_seconds(cfg: Any, datamodule: Any, per_image: float) -> float:
    """The pictures and ``report.html`` at the run's end (0 when neither is asked for)."""
    if not (cfg.get("pictures") or cfg.get("report")):
        return 0.0
    first = len(datamodule.splits[datamodule.eval_splits()[0]])
    return first * (per_image + REPORT_PER_IMAGE) + REPORT_FIXED


def probe_costs(stages: list[Stage], module: L.LightningModule, datamodule: Any,
                cfg: Any) -> tuple[list[StageCost], float]:
    """Each stage's cost on this machine and the report's, leaving the model and the random
    streams as they were."""
    states = collect_rng_states()
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.WARNING)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            costs, per_image = [], 0.0
            for stage in stages:
                measured = probe_stage(stage, module, datamodule)
                per_image = measured.per_image
                images = probe_images(stage, module, datamodule)
                costs.append(stage_cost(stage, datamodule, module, measured, images))
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
        set_rng_states(states)
    return costs, report_seconds(cfg, datamodule, per_image)
