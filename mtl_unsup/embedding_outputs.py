"""What a ``data=embeddings`` run writes beside its metrics: every row's cluster, and pictures.

``predictions.csv`` has one line per row of the embedding file, in the file's order: ``row``,
``split``, ``path`` (when the file has paths), ``cluster``, ``confidence`` and ``distance`` (to
the k-means centroid), as ``mtl-predict`` writes for images. The pictures are those of an image
run; the cluster grid only where the paths are images that can be read here.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import numpy as np

from mtl_unsup.atomic import atomic_path
from mtl_unsup.data.embedding_datamodule import EmbeddingFileDataModule
from mtl_unsup.data.images import load_image
from mtl_unsup.history import HISTORY
from mtl_unsup.html import ReportInputs, write_report
from mtl_unsup.html.run_files import run_files
from mtl_unsup.inference import Predictions, predict_loader
from mtl_unsup.models.module import MultiTaskModule
from mtl_unsup.visualize import save_pictures, tsne_sample

log = logging.getLogger(__name__)


def viewable(paths: tuple[Path, ...] | None) -> tuple[Path, ...] | None:
    """The paths, if they are images this machine can read (checked on the first and the last)."""
    if not paths:
        return None
    try:
        for path in {paths[0], paths[-1]}:
            load_image(path, 3)
    except Exception as err:  # not found, not an image, a decompression bomb, ...
        log.warning("No cluster grid: the rows' paths are not images that can be read here (%s).", err)
        return None
    return paths


def write_row_predictions(out_dir: Path, module: MultiTaskModule, datamodule: EmbeddingFileDataModule,
                          pictures: bool, report: bool = False, seed: int = 0,
                          history: Path | None = None) -> Path:
    """``predictions.csv`` for every row and, with ``pictures`` and ``report``, the held-out split's
    pictures and ``report.html`` (thumbnails when the rows' paths are images readable here)."""
    preds: dict[str, Predictions] = {
        split: predict_loader(module, datamodule.split_loader(split), progress=False, device=module.device)
        for split in datamodule.splits}
    table = datamodule.table
    order = sorted((int(row), split, i) for split in preds
                   for i, row in enumerate(datamodule.splits[split].rows))
    path = out_dir / "predictions.csv"
    with atomic_path(path) as partial, open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        path_column = ["path"] if table.paths else []
        writer.writerow(["row", "split", *path_column, "cluster", "confidence", "distance"])
        for row, split, i in order:
            p = preds[split]
            writer.writerow([row, split, *([str(table.paths[row])] if table.paths else []),
                             int(p.clusters[i]), f"{p.confidence[i]:.6f}", f"{p.distance[i]:.6f}"])
    split = datamodule.eval_splits()[0]
    part, p = datamodule.splits[split], preds[split]
    labels = np.asarray(part.labels) if part.has_labels else None
    sample = tsne_sample(p.features, seed=seed) if (pictures or report) and len(p.features) >= 10 else None
    paths = viewable(part.paths) if pictures or report else None
    if pictures:
        save_pictures(out_dir / "pictures", paths, p.clusters, p.confidence, p.features,
                      labels, part.classes, history or out_dir / HISTORY, sample=sample)
    if report:
        write_report(out_dir, ReportInputs(
            out_dir.name, "training", p.clusters, p.confidence, paths, labels, part.classes, sample,
            answer=module.explain_answer(), split=split, k=module.k, **run_files(out_dir, history)))
    return path
