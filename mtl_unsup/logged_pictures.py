"""The pictures, in every active logger in its own way: TensorBoard images, W&B images, MLflow
artifacts. The CSV logger has no place for pictures: the PNG files in ``pictures/`` are its copy.

They go at the end of a run (whatever ``pictures/`` holds then) and, with
``pictures_every_n_epochs=n``, every n epochs during training (:class:`PicturesEveryNEpochs`: the
cluster grid and, with labels, the confusion of the held-out split under the current model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image

# the pictures that go to the loggers: what the model found, not how long it took
LOGGED = ("cluster_grid", "confusion", "embedding", "training_curves", "k_selection")


def log_pictures(loggers: Sequence[Any], pictures: Mapping[str, Path], step: int) -> list[str]:
    """Each picture (name -> PNG file) to every logger that takes pictures; returns the kinds of
    logger that got them."""
    reached = []
    for logger in loggers:
        kind = type(logger).__name__
        if kind == "TensorBoardLogger":
            for name, path in pictures.items():
                image = np.asarray(Image.open(path).convert("RGB"))
                logger.experiment.add_image(f"pictures/{name}", image, global_step=step, dataformats="HWC")
            logger.experiment.flush()
        elif kind == "WandbLogger":
            for name, path in pictures.items():
                logger.log_image(key=f"pictures/{name}", images=[str(path)], step=step)
        elif kind == "MLFlowLogger":
            for path in pictures.values():
                logger.experiment.log_artifact(logger.run_id, str(path),
                                               artifact_path=f"pictures/step-{step:07d}")
        else:
            continue
        reached.append(kind)
    return reached


def drawn_pictures(folder: Path) -> dict[str, Path]:
    return {name: folder / f"{name}.png" for name in LOGGED if (folder / f"{name}.png").is_file()}


class PicturesEveryNEpochs(L.Callback):
    """Every ``every_n_epochs`` epochs: the cluster grid and the confusion of the held-out split
    under the current model, into ``<out_dir>/pictures/epochs/`` and every logger (rank 0). In a
    run of stages ``tag`` (the stage) prefixes the files and the loggers' names. It draws from no
    random stream the training reads (a rank apart from the others would change the run)."""

    def __init__(self, every_n_epochs: int, out_dir: Path, cfg: Any, tag: str = "") -> None:
        self.every_n_epochs, self.out_dir, self.cfg = every_n_epochs, Path(out_dir), cfg
        self.tag = tag

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs or not trainer.is_global_zero or trainer.sanity_checking:
            return
        import torch

        from mtl_unsup.data.datamodule import ImageFolderDataModule
        from mtl_unsup.inference import predict_images
        from mtl_unsup.visualize import cluster_grid, hungarian_confusion

        datamodule = trainer.datamodule
        if not isinstance(datamodule, ImageFolderDataModule) or (module.cluster_state is None
                                                                 and module.answer() is None):
            return  # rows of features (no images to read), or no clustering yet (a warm-up)
        images = datamodule.splits[datamodule.eval_splits()[0]]
        devices = [module.device] if module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # the loader draws a seed: not from training's
            preds = predict_images(module, self.cfg, images, datamodule.eval_batch_size, progress=False,
                                   device=module.device)
        folder, prefix = self.out_dir / "pictures" / "epochs", f"{self.tag}_" if self.tag else ""
        name = f"{prefix}epoch{epoch:03d}"
        drawn = {"cluster_grid": cluster_grid(images.paths, preds.clusters, preds.confidence,
                                              folder / f"{name}_cluster_grid.png")}
        if images.has_labels:
            labels = np.asarray(images.labels)
            drawn["confusion"] = hungarian_confusion(preds.clusters, labels, images.classes,
                                                     folder / f"{name}_confusion.png")
        log_pictures(trainer.loggers, {f"{prefix}{k}": v for k, v in drawn.items()}, trainer.global_step)
