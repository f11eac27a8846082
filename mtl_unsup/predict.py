"""Assign every image of a folder to a cluster with a trained model.

``python -m mtl_unsup.predict ckpt=<run>/checkpoints/last.ckpt data.root=<folder>`` (or
``mtl-predict``) writes ``predictions.csv`` (path, cluster, confidence, distance to the
centroid) into the output folder; ``save_embeddings=true`` adds ``embeddings.npy`` with
``embedding_paths.txt``; ``sort=copy|symlink`` files the images into ``clusters/<cluster>/``.
Nothing is written outside the output folder, and no existing file is replaced unless
``overwrite=true``.

The images come in through the ``data`` group, as for training (``data=folder``, the default, or
``data=digits``); image size, channels and normalisation always come from the checkpoint.
"""

from __future__ import annotations

import csv
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from mtl_unsup.cli import hydra_command
from mtl_unsup.config import ConfigValueError, DataConfig, PathsConfig, register_configs
from mtl_unsup.data.datamodule import ImageFolderDataModule
from mtl_unsup.data.images import ImageList, drop_bad_images, scan_folder
from mtl_unsup.errors import UserError
from mtl_unsup.inference import Predictions, model_from_checkpoint, predict_images

log = logging.getLogger(__name__)
SORT_MODES = ("none", "copy", "symlink")


class OutputExistsError(UserError, FileExistsError):
    """An output file is already there and ``overwrite`` is false."""


@dataclass
class PredictConfig:
    ckpt: str = MISSING
    # The training schema's data group; only root, builtin, labels, eval_batch_size, num_workers
    # and on_bad_image are read (image size, channels and normalisation are the checkpoint's).
    data: DataConfig = field(default_factory=DataConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    out_dir: str = "${hydra:runtime.output_dir}"
    save_embeddings: bool = False
    sort: str = "none"
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True


register_configs()  # the data options' schemas
ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


def read_images(data: DictConfig, purpose: str) -> ImageList:
    """The images the ``data`` group names (a built-in set is written first), bad files dropped."""
    ImageFolderDataModule(root=data.root, builtin=data.builtin).prepare_data()
    images = scan_folder(data.root, labels=data.labels)
    return drop_bad_images(images, data.on_bad_image, purpose)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def output_paths(out_dir: Path, save_embeddings: bool, sort: str) -> list[Path]:
    paths = [out_dir / "predictions.csv"]
    if save_embeddings:
        paths += [out_dir / "embeddings.npy", out_dir / "embedding_paths.txt"]
    if sort != "none":
        paths.append(out_dir / "clusters")
    return paths


def refuse_to_overwrite(paths: list[Path]) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
        raise OutputExistsError(
            f"Would overwrite {', '.join(existing)}. Choose another out_dir (or hydra.run.dir), "
            "or pass overwrite=true."
        )


def sorted_name(path: Path, root: Path) -> str:
    """A file name inside clusters/<c>/ that keeps images of equal names in subfolders apart."""
    return "__".join(path.relative_to(root).parts)


def write_outputs(out_dir: Path, root: Path, paths: list[Path], preds: Predictions,
                  save_embeddings: bool, sort: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "predictions.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "cluster", "confidence", "distance"])
        for p, c, conf, d in zip(paths, preds.clusters, preds.confidence, preds.distance, strict=True):
            writer.writerow([str(p), int(c), f"{conf:.6f}", f"{d:.6f}"])
    if save_embeddings:
        np.save(out_dir / "embeddings.npy", preds.features)
        (out_dir / "embedding_paths.txt").write_text("".join(f"{p}\n" for p in paths))
    if sort != "none":
        clusters_dir = out_dir / "clusters"
        if clusters_dir.exists():  # only reached with overwrite=true
            shutil.rmtree(clusters_dir)
        for p, c in zip(paths, preds.clusters, strict=True):
            target = clusters_dir / str(int(c)) / sorted_name(p, root)
            target.parent.mkdir(parents=True, exist_ok=True)
            if sort == "copy":
                shutil.copy2(p, target)
            else:
                os.symlink(p.resolve(), target)


def predict(cfg: DictConfig) -> Path:
    if cfg.sort not in SORT_MODES:
        raise ConfigValueError(f"sort={cfg.sort!r} is not one of {', '.join(SORT_MODES)}.")
    out_dir, root = Path(cfg.out_dir), Path(cfg.data.root).expanduser()
    if not cfg.overwrite:
        refuse_to_overwrite(output_paths(out_dir, cfg.save_embeddings, cfg.sort))
    module, train_cfg = model_from_checkpoint(cfg.ckpt)
    images = read_images(cfg.data, "predict")
    preds = predict_images(module, train_cfg, images, cfg.data.eval_batch_size, cfg.data.num_workers,
                           progress=cfg.progress, device=pick_device(cfg.device))
    write_outputs(out_dir, root, list(images.paths), preds, cfg.save_embeddings, cfg.sort)
    sizes = np.bincount(preds.clusters, minlength=module.k)
    print(f"{len(images)} images -> {int((sizes > 0).sum())} clusters; sizes: {sizes.tolist()}")
    print(f"predictions: {out_dir / 'predictions.csv'}")
    return out_dir / "predictions.csv"


@hydra_command("predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
