"""Build a run from its composed config: tasks, data (read and checked), backbone, model, callbacks
and trainer, each checked before any training; a wrong value stops the run naming its key."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_unsup.checkpoint_io import AtomicCheckpointIO
from mtl_unsup.clustering.callback import PseudoLabelCallback
from mtl_unsup.clustering.refresh import ClusterSettings
from mtl_unsup.clustering.sharded import check_sharded_tasks
from mtl_unsup.config import ConfigValueError, check_config, max_clusters
from mtl_unsup.data.datamodule import ImageFolderDataModule
from mtl_unsup.data.embedding_datamodule import EmbeddingFileDataModule
from mtl_unsup.data.embeddings import EmbeddingCache
from mtl_unsup.data.images import DataError
from mtl_unsup.extensions import build_extra_callbacks, build_loggers
from mtl_unsup.history import EpochHistory
from mtl_unsup.logged_pictures import PicturesEveryNEpochs
from mtl_unsup.metrics import reads_labels
from mtl_unsup.models.backbones import expected_input
from mtl_unsup.models.evaluation import split_metric_names
from mtl_unsup.models.factory import model_factory
from mtl_unsup.models.feature_input import FEATURES_TARGET
from mtl_unsup.models.module import MultiTaskModule
from mtl_unsup.schedule import check_schedule
from mtl_unsup.signals import StopOnSignal

log = logging.getLogger(__name__)


def build_tasks(cfg: DictConfig) -> dict[str, Any]:
    """Instantiate every task; a value a task rejects stops the run, naming ``task.<name>``."""
    tasks = {}
    for name, task_cfg in cfg.task.items():
        try:
            tasks[name] = instantiate(task_cfg)
        except InstantiationException as err:
            if not isinstance(err.__cause__, ValueError):
                raise
            raise ConfigValueError(f"task.{name}: {err.__cause__}") from None
    return tasks


def fill_input_settings(cfg: DictConfig) -> None:
    """Write into ``cfg`` the ``data.image_size``, ``mean`` and ``std`` left null: those the
    backbone's weights expect (:func:`~mtl_unsup.models.backbones.expected_input`)."""
    if "image_size" in cfg.data and any(cfg.data.get(k) is None for k in ("image_size", "mean", "std")):
        expected = expected_input(cfg.backbone, cfg.data.channels)
        for key, value in expected.items():
            if cfg.data.get(key) is None:
                cfg.data[key] = value


def build_datamodule(cfg: DictConfig) -> Any:
    """Instantiate the data module and read and check every image now, before any training.

    ``data.image_size``, ``mean`` and ``std`` left null become those the backbone's weights
    expect (:func:`~mtl_unsup.models.backbones.expected_input`), written into ``cfg``.
    """
    fill_input_settings(cfg)
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.shuffle_seed = cfg.seed
    datamodule.prepare_data()
    datamodule.setup("fit")
    n = datamodule.num_train
    if max_clusters(cfg.cluster) > n:
        key = "cluster.k_range" if cfg.cluster.k == "auto" else "cluster.k"
        value = list(cfg.cluster.k_range) if cfg.cluster.k == "auto" else cfg.cluster.k
        raise DataError(f"{key}={value} is larger than the {n} training images. Lower {key} or "
                        "add images.")
    return datamodule


def check_sizes(module: MultiTaskModule, num_train: int) -> None:
    """Every clustering head's k and every provider's targets fit the training set, checked now
    rather than at the first refresh."""
    for head, (task, _, k) in module.heads.items():
        if k > num_train and module.tasks[task].refreshes:
            raise DataError(f"The {head} head has {k} clusters, more than the {num_train} training "
                            f"images. Lower task.{task}.k / k_factor, or cluster.k.")
    for name, task in module.tasks.items():
        problem = task.size_problem(num_train) if task.refreshes else None
        if problem:
            raise DataError(f"task.{name}.{problem}")


def check_selection(cfg: DictConfig, datamodule: ImageFolderDataModule, tasks: dict[str, Any],
                    weights: dict[str, float] | None = None, objective: bool = True) -> None:
    """The checkpoint monitor and the sweep objective: label-free unless named on purpose.

    Each must be a metric this run logs (during training for the monitor, at the end for the
    objective), checked before training: a misspelt or impossible one stops the run naming the
    choices. One that reads ground-truth labels is allowed when named, and the run says so.
    ``weights``: of the tasks that train (a stage's; None: each task's own); ``objective``:
    whether the run's end is this one's (a staged run's last stage).
    """
    weights = weights if weights is not None else {n: t.weight for n, t in tasks.items()}
    trained = {n for n, w in weights.items() if w > 0}
    trained |= {h for n in trained for h in tasks[n].trains_heads_of() if h in tasks}  # once bound
    has_head = any(tasks[n].has_cluster_heads for n in trained)
    during_fit = {"train/loss", *(f"train/loss_{n}" for n, w in weights.items() if w > 0)}

    def names(split: str) -> set[str]:
        size = len(datamodule.splits.get(split, ()))
        return split_metric_names(split, size, has_head, datamodule.has_labels)

    during_fit |= names("val")
    at_end = set().union(*(names(split) for split in datamodule.eval_splits()))
    checks = [("checkpoint.monitor", during_fit), ("callbacks.early_stopping.monitor", during_fit)]
    for key, choices in checks + ([("optimized_metric", at_end)] if objective else []):
        metric = OmegaConf.select(cfg, key)
        if not metric:
            continue
        if metric not in choices:
            free = sorted(m for m in choices if not reads_labels(m))
            raise ConfigValueError(
                f"{key}={metric} is not a metric this run gives"
                + (" (it reads labels, and these images have none)" if reads_labels(metric)
                   and not datamodule.has_labels else "")
                + f". Label-free choices: {', '.join(free)}; or {key}=null.")
        if reads_labels(metric):
            warn = rank_zero_only(log.warning)
            warn("%s=%s reads ground-truth labels: what it chooses is chosen with labels and is "
                 "not an unsupervised result.", key, metric)


def cluster_settings(cfg: DictConfig) -> ClusterSettings:
    """The ``cluster`` group as the refresh reads it (a wrong value stops the run, naming it)."""
    try:
        return ClusterSettings.from_config(cfg.cluster)
    except ValueError as err:
        raise ConfigValueError(str(err)) from None


def build_callbacks(cfg: DictConfig, ckpt_dir: Path | None = None,
                    refresh: str = "every") -> tuple[list[L.Callback], ModelCheckpoint]:
    """Pseudo-labels, ``last.ckpt`` every few steps (for resuming), and the best checkpoint by
    ``checkpoint.monitor`` when one is named (none by default: ``last.ckpt`` is the model).
    ``ckpt_dir``: where they go (``<run dir>/checkpoints``); ``refresh``: a stage's policy."""
    ckpt_dir = ckpt_dir or Path(cfg.paths.output_dir) / "checkpoints"
    monitor = cfg.checkpoint.monitor
    last = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                           every_n_train_steps=cfg.checkpoint.every_n_train_steps)
    callbacks: list[L.Callback] = [
        PseudoLabelCallback(k=cfg.cluster.k, settings=cluster_settings(cfg),
                            every_n_epochs=cfg.cluster.every_n_epochs, seed=cfg.seed, refresh=refresh),
        StopOnSignal(ckpt_dir / "last.ckpt"),  # SIGTERM, SIGINT: a checkpoint, then exit 143 / 130
        last,
    ]
    if monitor:
        callbacks.append(ModelCheckpoint(
            dirpath=ckpt_dir, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
            monitor=monitor, mode=cfg.checkpoint.mode, save_top_k=cfg.checkpoint.save_top_k,
            every_n_epochs=cfg.checkpoint.every_n_epochs,
        ))
    return callbacks, callbacks[-1] if monitor else last


def refuse_image_tasks(tasks: dict[str, Any], why: str, fix: str) -> None:
    """Tasks that transform images (rotation) cannot train on rows of features."""
    for name, task in tasks.items():
        if task.needs_images and task.weight > 0:
            raise ConfigValueError(f"task.{name} works on images, but {why}. Drop it (e.g. "
                                   f"task=[cluster,scan]){fix}.")


def use_embedding_cache(cfg: DictConfig, datamodule: ImageFolderDataModule, backbone: Any,
                        tasks: dict[str, Any]) -> None:
    """A frozen backbone's features are computed once and cached; the heads train on them."""
    refuse_image_tasks(tasks, "with backbone.freeze=true the heads train on cached features "
                       "(data.embedding_cache=true)", " or set data.embedding_cache=false to augment "
                       "and embed the images at every step")
    identity = {"backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
                "channels": datamodule.channels, "image_size": datamodule.image_size,
                "invert": datamodule.invert, "channels_last": cfg.channels_last,
                "augmentations": OmegaConf.to_container(cfg.data.augmentations, resolve=True)
                if datamodule.embedding_copies else None}
    # the features are computed at fit time, by the backbone as the module holds it (channels-last)
    datamodule.use_embeddings(EmbeddingCache(
        backbone, datamodule.mean, datamodule.std, datamodule.augmentations, datamodule.embedding_copies,
        cfg.paths.cache_dir, identity, seed=cfg.seed))


def build_backbone(cfg: DictConfig, datamodule: Any, tasks: dict[str, Any]) -> Any:
    """The backbone for the data: an image model, or the rows themselves for ``data=embeddings``
    (``backbone=features``, sized here from the file and recorded in ``cfg``)."""
    if isinstance(datamodule, EmbeddingFileDataModule):
        if cfg.backbone.get("_target_") != FEATURES_TARGET:
            raise ConfigValueError(
                f"data=embeddings clusters rows of features, so it takes no image backbone "
                f"({cfg.backbone.get('_target_')}): drop the backbone= override (data=embeddings "
                "sets backbone=features).")
        refuse_image_tasks(tasks, f"data=embeddings clusters rows of features ({datamodule.describe()})", "")
        with open_dict(cfg):
            cfg.backbone.dim = datamodule.feature_dim
        return instantiate(cfg.backbone)
    backbone = instantiate(cfg.backbone, in_channels=datamodule.channels)
    if getattr(backbone, "frozen", False) and datamodule.embedding_cache:
        use_embedding_cache(cfg, datamodule, backbone, tasks)
    return backbone


@dataclass
class Run:
    """Everything one training run is made of, built and checked before any training."""

    datamodule: ImageFolderDataModule
    module: MultiTaskModule
    trainer: L.Trainer
    checkpoint: ModelCheckpoint


def build_model(cfg: DictConfig, staged: bool = False) -> tuple[ImageFolderDataModule, MultiTaskModule]:
    """Instantiate and check the data (every image read now) and the model with every task
    (``staged``: of every stage, whose schedules are checked as each stage starts)."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    tasks = build_tasks(cfg)
    if cfg.cluster.get("sharded"):  # before any image is read
        check_sharded_tasks(tasks)
    datamodule = build_datamodule(cfg)
    backbone = build_backbone(cfg, datamodule, tasks)
    if not staged:  # a staged run checks them stage by stage (mtl_unsup.staged)
        check_selection(cfg, datamodule, tasks)
        check_schedule(cfg, tasks)
    module = model_factory(cfg)(  # the model group sets the rest (conf/train.yaml, model:)
        backbone, tasks, num_clusters=max_clusters(cfg.cluster), optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        eval_splits=tuple(datamodule.eval_splits()),
        augmentations=datamodule.augmentations, mean=datamodule.mean, std=datamodule.std,
        config=OmegaConf.to_container(cfg, resolve=True), auto_k=cfg.cluster.k == "auto",
        feature_bank=datamodule.num_train if cfg.cluster.features == "bank" else 0,
    )
    check_sizes(module, datamodule.num_train)
    return datamodule, module


def build_trainer(cfg: DictConfig, ckpt_dir: Path | None = None, history_dir: Path | None = None,
                  refresh: str = "every",
                  progress_bar: L.Callback | None = None) -> tuple[L.Trainer, ModelCheckpoint]:
    """The trainer with its callbacks and loggers; checkpoints into ``ckpt_dir`` and the epoch
    history into ``history_dir`` (by default the run directory's); ``progress_bar`` in place of
    Lightning's own."""
    callbacks, checkpoint = build_callbacks(cfg, ckpt_dir, refresh)
    if progress_bar is not None:
        callbacks.append(progress_bar)
    callbacks += [EpochHistory(history_dir or cfg.paths.output_dir), *build_extra_callbacks(cfg)]
    if cfg.get("pictures_every_n_epochs"):  # a stage's (history_dir: <run>/<stage>) are named after it
        tag = Path(history_dir).name if history_dir is not None else ""
        out_dir = Path(cfg.paths.output_dir)
        callbacks.append(PicturesEveryNEpochs(cfg.pictures_every_n_epochs, out_dir, cfg, tag))
    logger = build_loggers(cfg)
    extra = {}
    on_cpu = cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()
    if cfg.trainer.get("sync_batchnorm") and on_cpu:
        rank_zero_warn("trainer.sync_batchnorm needs GPUs (SyncBatchNorm); off for this CPU run.")
        extra["sync_batchnorm"] = False
    # _convert_: a dict value (trainer.max_time={hours: 12}) reaches Lightning as a dict; every
    # checkpoint is written whole, beside the one it replaces (mtl_unsup/checkpoint_io.py)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, _convert_="all",
                                     plugins=[AtomicCheckpointIO()], **extra)
    return trainer, checkpoint


def build_run(cfg: DictConfig) -> Run:
    """Instantiate data, model, callbacks and trainer from the composed config."""
    datamodule, module = build_model(cfg)
    trainer, checkpoint = build_trainer(cfg)
    return Run(datamodule, module, trainer, checkpoint)
