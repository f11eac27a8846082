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
    under the current model, into ``<out_dir>/pictures/epochs/`` and every logger (rank 0)."""

    def __init__(self, every_n_epochs: int, out_dir: Path, cfg: Any) -> None:
        self.every_n_epochs, self.out_dir, self.cfg = every_n_epochs, Path(out_dir), cfg

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if (epoch + 1) % self.every_n_epochs or not trainer.is_global_zero or trainer.sanity_checking:
            return
        from mtl_unsup.inference import predict_images
        from mtl_unsup.visualize import cluster_grid, hungarian_confusion

        datamodule = trainer.datamodule
        if not hasattr(datamodule, "splits") or (module.cluster_state is None and module.answer() is None):
            return  # rows of features (no images to show), or no clustering yet (a warm-up)
        images = datamodule.splits[datamodule.eval_splits()[0]]
        preds = predict_images(module, self.cfg, images, datamodule.eval_batch_size, progress=False,
                               device=module.device)
        folder = self.out_dir / "pictures" / "epochs"
        drawn = {"cluster_grid": cluster_grid(images.paths, preds.clusters, preds.confidence,
                                              folder / f"epoch{epoch:03d}_cluster_grid.png")}
        if images.has_labels:
            labels = np.asarray(images.labels)
            drawn["confusion"] = hungarian_confusion(preds.clusters, labels, images.classes,
                                                     folder / f"epoch{epoch:03d}_confusion.png")
        log_pictures(trainer.loggers, drawn, trainer.global_step)
