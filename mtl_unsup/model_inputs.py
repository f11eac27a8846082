"""What ``mtl-predict`` and ``mtl-evaluate`` run a trained model on: the images of the ``data``
group, or, for a model trained with ``data=embeddings``, the rows of an embedding file.

A model meets the kind of input it was trained on: images for an image backbone, rows of the same
width for ``backbone=features``; anything else stops with one message naming both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from mtl_unsup.data.datamodule import ImageFolderDataModule
from mtl_unsup.data.embedding_file import read_embeddings
from mtl_unsup.data.embeddings import EmbeddingDataset
from mtl_unsup.data.images import DataError, drop_bad_images, scan_folder
from mtl_unsup.data.loaders import loader_workers
from mtl_unsup.errors import CheckpointError
from mtl_unsup.inference import Predictions, predict_images, predict_loader
from mtl_unsup.models.feature_input import FEATURES_TARGET
from mtl_unsup.models.module import MultiTaskModule


@dataclass(frozen=True)
class Inputs:
    """Where each prediction came from: image paths (None: rows of a file without paths)."""

    source: str  # data.root or data.path, for messages
    paths: tuple[Path, ...] | None
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def has_labels(self) -> bool:
        return bool(self.classes)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def read_images(data: DictConfig, purpose: str) -> Any:
    """The images the ``data`` group names (a built-in set is written first), bad files dropped."""
    ImageFolderDataModule(root=data.root, builtin=data.builtin).prepare_data()
    images = scan_folder(data.root, labels=data.labels)
    # every image is decoded once to be predicted anyway: check them all, so that no output row
    # stands for a file that could not be read
    return drop_bad_images(images, data.on_bad_image, purpose, decode=True)


def run_model(module: MultiTaskModule, train_cfg: DictConfig, data: DictConfig, ckpt: str, purpose: str,
              device: str, progress: bool, check: Callable[[Inputs], None] = lambda inputs: None,
              ) -> tuple[Inputs, Predictions]:
    """Read the inputs ``data`` names, ``check`` them, and run the model over them, in order."""
    on_rows = train_cfg.backbone.get("_target_") == FEATURES_TARGET
    if "path" not in data:  # images
        if on_rows:
            raise CheckpointError(f"{ckpt} clusters rows of embeddings (it was trained with "
                                  "data=embeddings): give it rows, data=embeddings data.path=<file>.")
        images = read_images(data, purpose)
        inputs = Inputs(str(data.root), images.paths, images.labels, images.classes)
        check(inputs)
        workers = loader_workers(data.num_workers)
        preds = predict_images(module, train_cfg, images, data.eval_batch_size, workers,
                               progress=progress, device=pick_device(device))
        return inputs, preds
    if not on_rows:
        raise CheckpointError(f"{ckpt} clusters images: give it images (data=folder data.root=...), "
                              "or train a model on the embeddings with data=embeddings.")
    table = read_embeddings(data.path, data.key, data.paths_key, data.labels_key, data.paths_file,
                            data.image_root, data.labels)
    width, expected = table.features.shape[2], module.backbone.feature_dim
    if width != expected:
        raise DataError(f"data.path={data.path} has rows of {width} features; the model ({ckpt}) was "
                        f"trained on rows of {expected}. Embed with the model that made its training rows.")
    inputs = Inputs(str(data.path), table.paths, table.labels, table.classes)
    check(inputs)
    dataset = EmbeddingDataset(table.features, table.labels)
    loader = DataLoader(dataset, batch_size=data.eval_batch_size, collate_fn=dataset.collate)
    return inputs, predict_loader(module, loader, progress=progress, device=pick_device(device))
