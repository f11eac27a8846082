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
from typing import TYPE_CHECKING, Any

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from mtl_unsup.atomic import atomic_path
from mtl_unsup.cli import hydra_command
from mtl_unsup.config import ConfigValueError, PathsConfig, TrainingOnly, register_configs
from mtl_unsup.errors import UserError

if TYPE_CHECKING:  # torch loads when a command runs, not for --help or a config error
    from mtl_unsup.inference import Predictions
    from mtl_unsup.model_inputs import Inputs

log = logging.getLogger(__name__)
SORT_MODES = ("none", "copy", "symlink")


class OutputExistsError(UserError, FileExistsError):
    """An output file is already there and ``overwrite`` is false."""


@dataclass
class PredictConfig(TrainingOnly):
    ckpt: str = MISSING
    # The training schema's data group (images: root, builtin, labels, eval_batch_size, num_workers
    # and on_bad_image are read; image size, channels and normalisation are the checkpoint's), or
    # data=embeddings for a model trained on rows.
    data: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    out_dir: str = "${hydra:runtime.output_dir}"
    save_embeddings: bool = False
    sort: str = "none"
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    # report.html (and its thumbnails in report_files/) in out_dir
    report: bool = True


register_configs()  # the data options' schemas
ConfigStore.instance().store(name="predict_schema", node=PredictConfig)


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


def write_outputs(out_dir: Path, root: Path, paths: list[Path] | None, preds: Predictions,
                  save_embeddings: bool, sort: str) -> None:
    """``predictions.csv`` (a ``path`` column, or ``row`` for rows of a file without paths), and
    what ``save_embeddings`` and ``sort`` ask for."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = [str(p) for p in paths] if paths is not None else [str(i) for i in range(len(preds.clusters))]
    with atomic_path(out_dir / "predictions.csv") as partial, open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path" if paths is not None else "row", "cluster", "confidence", "distance"])
        for p, c, conf, d in zip(names, preds.clusters, preds.confidence, preds.distance, strict=True):
            writer.writerow([p, int(c), f"{conf:.6f}", f"{d:.6f}"])
    if save_embeddings:
        np.save(out_dir / "embeddings.npy", preds.features)
        if paths is not None:
            # absolute: data=embeddings data.paths_file=... reads them from anywhere
            (out_dir / "embedding_paths.txt").write_text("".join(f"{Path(p).resolve()}\n" for p in paths))
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
    out_dir = Path(cfg.out_dir)
    if not cfg.overwrite:
        refuse_to_overwrite(output_paths(out_dir, cfg.save_embeddings, cfg.sort)
                            + ([out_dir / "report.html"] if cfg.report else []))
    from mtl_unsup.inference import model_from_checkpoint
    from mtl_unsup.model_inputs import run_model

    module, train_cfg = model_from_checkpoint(cfg.ckpt)

    def sortable(inputs: Inputs) -> None:  # checked before the model runs
        if cfg.sort != "none" and inputs.paths is None:
            raise ConfigValueError(f"sort={cfg.sort} files images into clusters/, but {inputs.source} has "
                                   "no paths: add them (data.paths_file, or a paths column), or sort=none.")

    inputs, preds = run_model(module, train_cfg, cfg.data, cfg.ckpt, "predict", cfg.device, cfg.progress,
                              check=sortable)
    root = (Path(cfg.data.root).expanduser() if "root" in cfg.data else
            Path(os.path.commonpath([str(p.parent) for p in inputs.paths])) if inputs.paths else out_dir)
    write_outputs(out_dir, root, None if inputs.paths is None else list(inputs.paths), preds,
                  cfg.save_embeddings, cfg.sort)
    sizes = np.bincount(preds.clusters, minlength=module.k)
    what = "images" if "root" in cfg.data else "rows"
    print(f"{len(inputs)} {what} -> {int((sizes > 0).sum())} clusters; sizes: {sizes.tolist()}")
    if cfg.report:
        from mtl_unsup.embedding_outputs import viewable
        from mtl_unsup.html.outputs import write_prediction_report

        labels = np.asarray(inputs.labels) if inputs.has_labels else None
        report = write_prediction_report(out_dir, "predict", module, train_cfg, viewable(inputs.paths),
                                         preds, labels, inputs.classes if labels is not None else ())
        print(f"report:      {report}")
    print(f"predictions: {out_dir / 'predictions.csv'}")
    return out_dir / "predictions.csv"


@hydra_command("predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
