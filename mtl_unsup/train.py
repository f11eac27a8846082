"""The main job: compose the config, build data, model and callbacks, fit, test, write metrics.

Run ``python -m mtl_unsup.train`` (digits, the default) or, for instance,
``python -m mtl_unsup.train data=folder data.root=/path/to/images cluster.k=20``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from omegaconf import DictConfig, OmegaConf, open_dict

from mtl_unsup.clustering.callback import PseudoLabelCallback
from mtl_unsup.config import CONF_DIR, check_config, register_configs
from mtl_unsup.data.datamodule import ImageFolderDataModule
from mtl_unsup.data.images import DataError
from mtl_unsup.inference import predict_images
from mtl_unsup.models.module import MultiTaskModule, NonFiniteLossError
from mtl_unsup.resume import resolve_start
from mtl_unsup.runinfo import run_info
from mtl_unsup.visualize import save_pictures

register_configs()


def build_tasks(cfg: DictConfig) -> dict[str, Any]:
    return {name: instantiate(task_cfg) for name, task_cfg in cfg.task.items()}


def build_datamodule(cfg: DictConfig) -> Any:
    """Instantiate the data module and read and check every image now, before any training."""
    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.shuffle_seed = cfg.seed
    datamodule.prepare_data()
    datamodule.setup("fit")
    n = datamodule.num_train
    if cfg.cluster.k > n:
        raise DataError(
            f"cluster.k={cfg.cluster.k} is larger than the {n} training images. "
            "Lower cluster.k or add images."
        )
    return datamodule


def build_callbacks(
    cfg: DictConfig, has_val_labels: bool, has_head: bool
) -> tuple[list[L.Callback], ModelCheckpoint]:
    """Pseudo-labels, ``last.ckpt`` every few steps (for resuming), and the best checkpoint."""
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    monitor = cfg.checkpoint.monitor if has_val_labels else None
    if monitor and not has_head:  # no clustering head: its metrics are those of k-means
        monitor = monitor.replace("/", "/kmeans_", 1) if "kmeans" not in monitor else monitor
    last = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                           every_n_train_steps=cfg.checkpoint.every_n_train_steps)
    callbacks: list[L.Callback] = [
        PseudoLabelCallback(
            k=cfg.cluster.k, pca_dim=cfg.cluster.pca_dim, niter=cfg.cluster.niter,
            nredo=cfg.cluster.nredo, every_n_epochs=cfg.cluster.every_n_epochs, seed=cfg.seed,
            warm_start=cfg.cluster.warm_start,
        ),
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
    """Rows per split; columns ACC/NMI/ARI of the clustering head and of k-means on features."""
    cols = ["acc", "nmi", "ari", "kmeans_acc", "kmeans_nmi", "kmeans_ari"]
    splits = [s for s in ("test", "train") if any(k.startswith(f"{s}/") for k in metrics)]
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
                  datamodule: ImageFolderDataModule) -> None:
    """PNGs of the held-out split (the training set when there is none) into ``pictures/``."""
    split = datamodule.eval_splits()[0]
    images = datamodule.splits[split]
    preds = predict_images(module, cfg, images, datamodule.eval_batch_size, progress=False,
                           device=module.device)
    labels = np.asarray(images.labels) if images.has_labels else None
    save_pictures(out_dir / "pictures", images.paths, preds.clusters, preds.confidence,
                  preds.features, labels, images.classes, out_dir / "csv" / "metrics.csv")


@dataclass
class Run:
    """Everything one training run is made of, built and checked before any training."""

    datamodule: ImageFolderDataModule
    module: MultiTaskModule
    trainer: L.Trainer
    checkpoint: ModelCheckpoint


def build_run(cfg: DictConfig) -> Run:
    """Instantiate data, model, callbacks and trainer from the composed config."""
    check_config(cfg)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg)
    tasks = build_tasks(cfg)
    backbone = instantiate(cfg.backbone, in_channels=datamodule.channels)
    module = MultiTaskModule(
        backbone, tasks, num_clusters=cfg.cluster.k, optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.scheduler else None,
        num_classes=datamodule.num_classes, eval_splits=tuple(datamodule.eval_splits()),
        augmentations=datamodule.augmentations, mean=datamodule.mean, std=datamodule.std,
        config=OmegaConf.to_container(cfg, resolve=True),
    )
    has_val_labels = datamodule.has_labels and "val" in datamodule.splits
    callbacks, checkpoint = build_callbacks(cfg, has_val_labels, module.cluster_task is not None)
    logger = instantiate(cfg.logger) if cfg.logger else False
    extra = {}
    on_cpu = cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()
    if cfg.trainer.get("sync_batchnorm") and on_cpu:
        rank_zero_warn("trainer.sync_batchnorm needs GPUs (SyncBatchNorm); off for this CPU run.")
        extra["sync_batchnorm"] = False
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, **extra)
    return Run(datamodule, module, trainer, checkpoint)


def train(cfg: DictConfig, extra_callbacks: tuple[L.Callback, ...] = ()) -> dict[str, float]:
    """Fit and test one model; returns the final metrics (also written to ``metrics.json``)."""
    check_config(cfg)
    ckpt_path, out_dir = resolve_start(cfg.ckpt_path, cfg.resume, Path(cfg.paths.output_dir))
    if out_dir != Path(cfg.paths.output_dir):
        with open_dict(cfg):
            cfg.paths.output_dir = str(out_dir)
    if cfg.print_config:
        rank_zero_only(print)(OmegaConf.to_yaml(cfg, resolve=True))
    write_run_info(out_dir)
    run = build_run(cfg)
    trainer, module, datamodule = run.trainer, run.module, run.datamodule
    trainer.callbacks.extend(extra_callbacks)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except NonFiniteLossError as err:
        last = out_dir / "checkpoints" / "last.ckpt"
        kept = (f"The last good checkpoint is {last}; continue from it with resume=true "
                "after lowering optimizer.lr or a task weight." if last.is_file()
                else "No checkpoint had been saved yet.")
        raise NonFiniteLossError(f"{err} {kept}") from None
    # The final clustering (refreshed at the end of fit) goes into last.ckpt with the final weights.
    last_path = out_dir / "checkpoints" / "last.ckpt"
    trainer.save_checkpoint(last_path)
    metrics = flatten_results(trainer.test(module, datamodule=datamodule, verbose=False))
    if trainer.is_global_zero:
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        if cfg.pictures:
            draw_pictures(out_dir, module, cfg, datamodule)
        print(format_table(metrics))
        print(f"run dir:    {out_dir}")
        best = run.checkpoint.best_model_path if run.checkpoint.monitor else ""
        print(f"checkpoint: {last_path}" + (f" (best by {run.checkpoint.monitor}: {best})" if best else ""))
        print(f"metrics:    {out_dir / 'metrics.json'}")
    return metrics


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    return metrics.get("test/acc")


if __name__ == "__main__":
    main()
