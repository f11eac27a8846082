"""The main job: compose the config, build data, model and callbacks, fit, test, write metrics.

Run ``python -m mtl_unsup.train`` (digits, the default) or, for instance,
``python -m mtl_unsup.train data=folder data.root=/path/to/images cluster.k=20``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_unsup.clustering.callback import PseudoLabelCallback
from mtl_unsup.clustering.refresh import ClusterSettings
from mtl_unsup.clustering.sharded import check_sharded_tasks
from mtl_unsup.config import ConfigValueError, check_config, max_clusters, register_configs
from mtl_unsup.console import lightning_prints_once
from mtl_unsup.data.datamodule import ImageFolderDataModule
from mtl_unsup.data.embedding_datamodule import EmbeddingFileDataModule
from mtl_unsup.data.embeddings import EmbeddingCache
from mtl_unsup.data.images import DataError
from mtl_unsup.embedding_outputs import write_row_predictions
from mtl_unsup.extensions import build_extra_callbacks, build_loggers, finish_loggers
from mtl_unsup.history import HISTORY, EpochHistory
from mtl_unsup.inference import load_checkpoint, predict_images
from mtl_unsup.metrics import reads_labels
from mtl_unsup.models.backbones import expected_input
from mtl_unsup.models.evaluation import split_metric_names
from mtl_unsup.models.feature_input import FEATURES_TARGET
from mtl_unsup.models.module import MultiTaskModule, NonFiniteLossError
from mtl_unsup.resume import resolve_start
from mtl_unsup.runinfo import run_info
from mtl_unsup.schedule import check_schedule
from mtl_unsup.visualize import k_selection, save_pictures

log = logging.getLogger(__name__)
register_configs()
lightning_prints_once()


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


def build_datamodule(cfg: DictConfig) -> Any:
    """Instantiate the data module and read and check every image now, before any training.

    ``data.image_size``, ``mean`` and ``std`` left null become those the backbone's weights
    expect (:func:`~mtl_unsup.models.backbones.expected_input`), written into ``cfg``.
    """
    if "image_size" in cfg.data and any(cfg.data.get(k) is None for k in ("image_size", "mean", "std")):
        expected = expected_input(cfg.backbone, cfg.data.channels)
        for key, value in expected.items():
            if cfg.data.get(key) is None:
                cfg.data[key] = value
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


def check_selection(cfg: DictConfig, datamodule: ImageFolderDataModule, tasks: dict[str, Any]) -> None:
    """The checkpoint monitor and the sweep objective: label-free unless named on purpose.

    Each must be a metric this run logs (during training for the monitor, at the end for the
    objective), checked before training: a misspelt or impossible one stops the run naming the
    choices. One that reads ground-truth labels is allowed when named, and the run says so.
    """
    has_head = any(task.has_cluster_heads and task.weight > 0 for task in tasks.values())
    during_fit = {"train/loss", *(f"train/loss_{n}" for n, t in tasks.items() if t.weight > 0)}

    def names(split: str) -> set[str]:
        size = len(datamodule.splits.get(split, ()))
        return split_metric_names(split, size, has_head, datamodule.has_labels)

    during_fit |= names("val")
    at_end = set().union(*(names(split) for split in datamodule.eval_splits()))
    for key, choices in (("checkpoint.monitor", during_fit), ("callbacks.early_stopping.monitor", during_fit),
                         ("optimized_metric", at_end)):
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
        last,
    ]
    if monitor:
        callbacks.append(ModelCheckpoint(
            dirpath=ckpt_dir, filename="best-epoch{epoch:03d}", auto_insert_metric_name=False,
            monitor=monitor, mode=cfg.checkpoint.mode, save_top_k=cfg.checkpoint.save_top_k,
            every_n_epochs=cfg.checkpoint.every_n_epochs,
        ))
    return callbacks, callbacks[-1] if monitor else last


def flatten_results(results: list[dict[str, float]]) -> dict[str, float]:
    merged: dict[str, float] = {}
    for result in results:
        for key, value in result.items():
            merged[key.split("/dataloader_idx_")[0]] = float(value)
    return dict(sorted(merged.items()))


def format_table(metrics: dict[str, float]) -> str:
    """Rows per split; label-free silhouette, then ACC/NMI/ARI of the clustering head and of
    k-means on the features (ground truth, reported only)."""
    cols = ["silhouette", "acc", "nmi", "ari", "kmeans_acc", "kmeans_nmi", "kmeans_ari"]
    splits = [s for s in ("test", "val", "train") if any(k.startswith(f"{s}/") for k in metrics)]
    lines = ["| split | " + " | ".join(c.replace("_", " ").upper() for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for split in splits:
        vals = [metrics.get(f"{split}/{c}") for c in cols]
        lines.append(f"| {split} | " + " | ".join("-" if v is None else f"{v:.4f}" for v in vals) + " |")
    return "\n".join(lines)


@rank_zero_only
def write_run_info(out_dir: Path) -> None:
    """``run_info.json``; a resumed run adds ``run_info.resumed-N.json`` beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path, n = out_dir / "run_info.json", 0
    while path.exists():
        n += 1
        path = out_dir / f"run_info.resumed-{n}.json"
    path.write_text(json.dumps(run_info(), indent=2) + "\n")


def draw_pictures(out_dir: Path, module: MultiTaskModule, cfg: DictConfig,
                  datamodule: ImageFolderDataModule, history: Path | None = None) -> None:
    """PNGs of the held-out split (the training set when there is none) into ``pictures/``."""
    split = datamodule.eval_splits()[0]
    images = datamodule.splits[split]
    preds = predict_images(module, cfg, images, datamodule.eval_batch_size, progress=False,
                           device=module.device)
    labels = np.asarray(images.labels) if images.has_labels else None
    save_pictures(out_dir / "pictures", images.paths, preds.clusters, preds.confidence,
                  preds.features, labels, images.classes, history or out_dir / HISTORY)


def write_k_selection(out_dir: Path, module: MultiTaskModule, cfg: DictConfig) -> None:
    """``k_selection.csv`` (and ``pictures/k_selection.png``): the criterion of each k tried."""
    scores, criterion = module.k_selection, cfg.cluster.k_criterion
    rows = [f"{k},{v:.6f},{int(k == module.k)}" for k, v in sorted(scores.items())]
    lines = [f"k,{criterion},chosen", *rows]
    (out_dir / "k_selection.csv").write_text("\n".join(lines) + "\n")
    if cfg.pictures and scores:
        k_selection(scores, module.k, criterion, out_dir / "pictures" / "k_selection.png")
    print(f"cluster.k=auto chose k={module.k} by {criterion} (k_selection.csv)")


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
    check_selection(cfg, datamodule, tasks)
    if not staged:
        check_schedule(cfg, tasks)
    module = MultiTaskModule(
        backbone, tasks, num_clusters=max_clusters(cfg.cluster), optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        eval_splits=tuple(datamodule.eval_splits()),
        augmentations=datamodule.augmentations, mean=datamodule.mean, std=datamodule.std,
        config=OmegaConf.to_container(cfg, resolve=True), seed=cfg.seed,
        cluster_settings={"pca_dim": cfg.cluster.pca_dim, "niter": cfg.cluster.niter,
                          "nredo": cfg.cluster.nredo},
        answer=cfg.cluster.answer, auto_k=cfg.cluster.k == "auto", channels_last=cfg.channels_last,
        feature_bank=datamodule.num_train if cfg.cluster.features == "bank" else 0,
    )
    check_sizes(module, datamodule.num_train)
    return datamodule, module


def build_trainer(cfg: DictConfig, ckpt_dir: Path | None = None, history_dir: Path | None = None,
                  refresh: str = "every") -> tuple[L.Trainer, ModelCheckpoint]:
    """The trainer with its callbacks and loggers; checkpoints into ``ckpt_dir`` and the epoch
    history into ``history_dir`` (by default the run directory's)."""
    callbacks, checkpoint = build_callbacks(cfg, ckpt_dir, refresh)
    callbacks += [EpochHistory(history_dir or cfg.paths.output_dir), *build_extra_callbacks(cfg)]
    logger = build_loggers(cfg)
    extra = {}
    on_cpu = cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()
    if cfg.trainer.get("sync_batchnorm") and on_cpu:
        rank_zero_warn("trainer.sync_batchnorm needs GPUs (SyncBatchNorm); off for this CPU run.")
        extra["sync_batchnorm"] = False
    # _convert_: a dict value (trainer.max_time={hours: 12}) reaches Lightning as a dict
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, _convert_="all",
                                     **extra)
    return trainer, checkpoint


def build_run(cfg: DictConfig) -> Run:
    """Instantiate data, model, callbacks and trainer from the composed config."""
    datamodule, module = build_model(cfg)
    trainer, checkpoint = build_trainer(cfg)
    return Run(datamodule, module, trainer, checkpoint)


def adopt_checkpoint(ckpt_path: str, resuming: bool, run: Run) -> str | None:
    """Check a checkpoint against this run; returns what ``fit`` resumes from (None: nothing).

    Resuming continues the whole training state, and must be on the images the pseudo-labels
    belong to: on other images it stops, naming both folders. A new run from a checkpoint
    (``ckpt_path=`` without resuming) takes its weights only and starts at epoch 0; on other
    images it also drops the clustering, and clusters the new images afresh.
    """
    ckpt = load_checkpoint(ckpt_path, key="ckpt_path")  # not an mtl-unsup checkpoint: stop here
    state, datamodule = ckpt.get("cluster_state"), run.datamodule
    saved = (state or {}).get("fingerprint") or ""
    same = not state or (saved == datamodule.fingerprint if saved
                         else len(state["labels"]) == datamodule.num_train)
    if not same:
        data = (ckpt.get("mtl_config") or {}).get("data", {})
        then = data.get("root") or data.get("path", "?")
        what = (f"{ckpt_path} holds pseudo-labels of other training images ({then}: "
                f"{len(state['labels'])} images) than this run's ({datamodule.describe()}: "
                f"{datamodule.num_train} images, or another split of them)")
        if resuming:
            raise DataError(f"{what}. Resume with the data (data.root, split settings) the run "
                            "was started with, or start a new run from its weights with "
                            "ckpt_path=... (without resume=true), which clusters the new images "
                            "afresh.")
        rank_zero_only(log.warning)("%s: its weights are used, its clustering is not; the new "
                                    "images are clustered afresh.", what)
        run.module.ignore_checkpoint_clustering = True
    run.module.load_weights(ckpt, f"ckpt_path={ckpt_path!r}")  # another model stops here
    return ckpt_path if resuming else None


def finish_clustering(run: Run) -> None:
    """The final clustering, if ``fit`` did not get to it (a run resumed after its last epoch)."""
    state, trainer = run.module.cluster_state, run.trainer
    if state is None or state.epoch != trainer.current_epoch:
        callback = next(c for c in trainer.callbacks if isinstance(c, PseudoLabelCallback))
        callback.finish(trainer, run.module)


def start_run(cfg: DictConfig) -> tuple[str | None, Path]:
    """Check the config; the checkpoint to start from and the run directory (set in ``cfg``)."""
    check_config(cfg)
    ckpt_path, out_dir = resolve_start(cfg.ckpt_path, cfg.resume, Path(cfg.paths.output_dir))
    if out_dir != Path(cfg.paths.output_dir):
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
    if cfg.print_config:
        rank_zero_only(print)(OmegaConf.to_yaml(cfg, resolve=True))
    return ckpt_path, out_dir


def fit_and_test(run: Run, ckpt_path: str | None, last_path: Path) -> dict[str, float]:
    """Fit (continuing ``ckpt_path``, if any), cluster the final features, save ``last_path``,
    test; returns the flat metrics."""
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except NonFiniteLossError as err:
        last = last_path.parent / "last.ckpt"
        kept = (f"The last good checkpoint is {last}; continue from it with resume=true "
                "after lowering optimizer.lr or a task weight." if last.is_file()
                else "No checkpoint had been saved yet.")
        raise NonFiniteLossError(f"{err} {kept}") from None
    finish_clustering(run)
    # The final clustering goes into last.ckpt with the final weights. (weights_only=False is the
    # save side: keep optimizer and loop states too; every load uses weights_only=True.)
    trainer.save_checkpoint(last_path, weights_only=False)
    metrics = flatten_results(trainer.test(module, datamodule=datamodule, verbose=False))
    if module.auto_k:
        metrics["cluster/k"] = float(module.k)
    return metrics


def write_results(run: Run, cfg: DictConfig, out_dir: Path, metrics: dict[str, float],
                  last_path: Path, history: Path | None = None, table: str | None = None) -> None:
    """``metrics.json``, the pictures (or the rows' clusters) and the closing summary (rank 0)."""
    module, datamodule = run.module, run.datamodule
    if not run.trainer.is_global_zero:
        return
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if module.auto_k:
        write_k_selection(out_dir, module, cfg)
    if isinstance(datamodule, EmbeddingFileDataModule):  # every row's cluster, as mtl-predict's
        predictions = write_row_predictions(out_dir, module, datamodule, cfg.pictures)
    elif cfg.pictures:
        draw_pictures(out_dir, module, cfg, datamodule, history)
    print(table or format_table(metrics))
    answer = module.answer()
    print(f"answer:     {answer or 'k-means of the features'}"
          + (f" (of {len(module.heads)} clustering heads, chosen without labels)"
             if len(module.heads) > 1 else ""))
    print(f"run dir:    {out_dir}")
    monitor = run.checkpoint.monitor
    best = run.checkpoint.best_model_path if monitor else ""
    chosen = " (chosen with ground-truth labels)" if monitor and reads_labels(monitor) else ""
    print(f"checkpoint: {last_path}")
    if best:
        print(f"            best by {monitor}{chosen}: {best}")
    print(f"metrics:    {out_dir / 'metrics.json'}")
    if isinstance(datamodule, EmbeddingFileDataModule):
        print(f"clusters:   {predictions}")


def train(cfg: DictConfig, extra_callbacks: tuple[L.Callback, ...] = ()) -> dict[str, float]:
    """Fit and test one model; returns the final metrics (also written to ``metrics.json``).
    A run with ``stages`` runs each in turn (:func:`mtl_unsup.staged.train_stages`)."""
    if cfg.get("stages"):
        from mtl_unsup.staged import train_stages

        return train_stages(cfg, extra_callbacks)
    ckpt_path, out_dir = start_run(cfg)
    run = build_run(cfg)
    if ckpt_path:  # resuming: resume=true, or a requeued job continuing its own run
        resuming = bool(cfg.resume) or Path(ckpt_path).resolve().is_relative_to(out_dir.resolve())
        ckpt_path = adopt_checkpoint(ckpt_path, resuming, run)
    write_run_info(out_dir)
    run.trainer.callbacks.extend(extra_callbacks)
    last_path = out_dir / "checkpoints" / "last.ckpt"
    metrics = fit_and_test(run, ckpt_path, last_path)
    write_results(run, cfg, out_dir, metrics, last_path)
    finish_loggers(run.trainer)
    return metrics


def objective(cfg: DictConfig, metrics: dict[str, float]) -> float | None:
    """The value a sweeper optimises: ``metrics[optimized_metric]`` (None when unset)."""
    return metrics[cfg.optimized_metric] if cfg.optimized_metric else None
