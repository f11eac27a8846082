"""What a finished run leaves: ``metrics.json``, the tables, the pictures, ``run_info.json``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from mtl_unsup.atomic import write_text
from mtl_unsup.build import Run
from mtl_unsup.data.datamodule import ImageFolderDataModule
from mtl_unsup.data.embedding_datamodule import EmbeddingFileDataModule
from mtl_unsup.embedding_outputs import write_row_predictions
from mtl_unsup.history import HISTORY
from mtl_unsup.html import ReportInputs, write_report
from mtl_unsup.html.run_files import run_files
from mtl_unsup.inference import predict_images
from mtl_unsup.logged_pictures import drawn_pictures, log_pictures
from mtl_unsup.metrics import reads_labels
from mtl_unsup.models.module import MultiTaskModule
from mtl_unsup.runinfo import run_info
from mtl_unsup.visualize import k_selection, save_pictures, tsne_sample


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
    write_text(path, json.dumps(run_info(), indent=2) + "\n")


def draw_pictures(out_dir: Path, module: MultiTaskModule, cfg: DictConfig,
                  datamodule: ImageFolderDataModule, history: Path | None = None) -> None:
    """PNGs of the held-out split (the training set when there is none) into ``pictures/`` and
    ``report.html`` of it, as ``pictures`` and ``report`` ask; one t-SNE serves both."""
    split = datamodule.eval_splits()[0]
    images = datamodule.splits[split]
    preds = predict_images(module, cfg, images, datamodule.eval_batch_size, progress=False,
                           device=module.device)
    labels = np.asarray(images.labels) if images.has_labels else None
    history = history or out_dir / HISTORY
    sample = tsne_sample(preds.features, seed=cfg.seed) if len(preds.features) >= 10 else None
    if cfg.pictures:
        save_pictures(out_dir / "pictures", images.paths, preds.clusters, preds.confidence,
                      preds.features, labels, images.classes, history, sample=sample)
    if cfg.report:
        write_report(out_dir, ReportInputs(
            out_dir.name, "training", preds.clusters, preds.confidence, images.paths, labels, images.classes,
            sample, answer=module.explain_answer(), split=split, k=module.k, **run_files(out_dir, history)))


def write_k_selection(out_dir: Path, module: MultiTaskModule, cfg: DictConfig) -> None:
    """``k_selection.csv`` (and ``pictures/k_selection.png``): the criterion of each k tried."""
    scores, criterion = module.k_selection, cfg.cluster.k_criterion
    rows = [f"{k},{v:.6f},{int(k == module.k)}" for k, v in sorted(scores.items())]
    lines = [f"k,{criterion},chosen", *rows]
    write_text(out_dir / "k_selection.csv", "\n".join(lines) + "\n")
    if cfg.pictures and scores:
        k_selection(scores, module.k, criterion, out_dir / "pictures" / "k_selection.png")
    print(f"cluster.k=auto chose k={module.k} by {criterion} (k_selection.csv)")


def write_results(run: Run, cfg: DictConfig, out_dir: Path, metrics: dict[str, float],
                  last_path: Path, history: Path | None = None, table: str | None = None) -> None:
    """``metrics.json``, the pictures (or the rows' clusters) and the closing summary (rank 0)."""
    module, datamodule = run.module, run.datamodule
    if not run.trainer.is_global_zero:
        return
    write_text(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    if module.auto_k:
        write_k_selection(out_dir, module, cfg)
    if isinstance(datamodule, EmbeddingFileDataModule):  # every row's cluster, as mtl-predict's
        predictions = write_row_predictions(out_dir, module, datamodule, cfg.pictures, cfg.report, cfg.seed,
                                            history)
    elif cfg.pictures or cfg.report:
        draw_pictures(out_dir, module, cfg, datamodule, history)
    if cfg.pictures:  # TensorBoard, W&B and MLflow get them too
        log_pictures(run.trainer.loggers, drawn_pictures(out_dir / "pictures"), run.trainer.global_step)
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
    if cfg.report and (out_dir / "report.html").is_file():
        print(f"report:     {out_dir / 'report.html'}")
    if isinstance(datamodule, EmbeddingFileDataModule):
        print(f"clusters:   {predictions}")
