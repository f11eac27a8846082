"""Score a trained model on a labelled folder, with a per-cluster table and pictures.

``python -m mtl_unsup.evaluate ckpt=<run>/checkpoints/last.ckpt data.root=<labelled folder>``
(or ``mtl-evaluate``) prints Hungarian ACC, NMI and ARI of the clusters, each cluster's size,
majority class and purity, and the k-nearest-neighbour accuracy of the features, and writes
``evaluation.json``, ``clusters.csv`` and PNG pictures into the output folder. The images come
in through the ``data`` group, as for ``mtl-predict``.

Beside the run's answer it scores classical clusterings of the same features (``baselines``:
k-means, Ward agglomerative and HDBSCAN, see :mod:`mtl_unsup.baselines`) and prints them side by
side; ``baselines=[]`` turns them off.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from mtl_unsup.atomic import atomic_path, write_text
from mtl_unsup.cli import hydra_command
from mtl_unsup.config import BASELINES, ConfigValueError, PathsConfig, TrainingOnly, register_configs
from mtl_unsup.predict import refuse_to_overwrite

if TYPE_CHECKING:  # torch loads when the command runs, not for --help or a config error
    from mtl_unsup.model_inputs import Inputs


@dataclass
class EvaluateConfig(TrainingOnly):
    ckpt: str = MISSING
    # As for predict; evaluation needs labels (conf/evaluate.yaml asks for class subfolders).
    data: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    out_dir: str = "${hydra:runtime.output_dir}"
    knn_k: int = 20
    pictures: bool = True
    # report.html (and its thumbnails in report_files/) in out_dir
    report: bool = True
    overwrite: bool = False
    device: str = "auto"
    progress: bool = True
    # Clusterings of the same features scored beside the model (mtl_unsup.baselines); [] for none.
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    # HDBSCAN's smallest cluster; null: max(5, images // (4 k)).
    hdbscan_min_cluster_size: int | None = None


register_configs()  # the data options' schemas
ConfigStore.instance().store(name="evaluate_schema", node=EvaluateConfig)


def knn_accuracy(features: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Leave-one-out accuracy of a cosine k-NN majority vote among the labelled images.

    ``k`` is cut to one less than the smallest class's size, so that even perfectly separated
    features can win every vote (20 neighbours among classes of 10 images would not).
    """
    import torch

    x = torch.nn.functional.normalize(torch.from_numpy(features).float(), dim=1)
    y = torch.from_numpy(labels).long()
    counts = torch.bincount(y)
    smallest = int(counts[counts > 0].min()) if len(y) else 1
    k = max(1, min(k, len(x) - 1, smallest - 1))
    correct = 0
    for chunk in torch.arange(len(x)).split(1024):
        sims = x[chunk] @ x.t()
        sims[torch.arange(len(chunk)), chunk] = -float("inf")  # not oneself
        votes = y[sims.topk(k, dim=1).indices]
        pred = torch.mode(votes, dim=1).values
        correct += int((pred == y[chunk]).sum())
    return correct / len(x)


def cluster_table(clusters: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                  k: int) -> list[dict]:
    rows = []
    for c in range(k):
        members = labels[clusters == c]
        if len(members) == 0:
            rows.append({"cluster": c, "size": 0, "majority_class": "-", "purity": 0.0})
            continue
        counts = np.bincount(members, minlength=len(classes))
        rows.append({"cluster": c, "size": len(members), "majority_class": classes[counts.argmax()],
                     "purity": round(float(counts.max() / len(members)), 4)})
    return rows


def score_baselines(names: list[str], features: np.ndarray, labels: np.ndarray, train_cfg: DictConfig,
                    min_cluster_size: int | None, k: int) -> tuple[dict, list[dict]]:
    """Each baseline's clusters of ``features`` (labels unseen), scored against ``labels``.

    ``k`` is the run's number of clusters (chosen by the run with ``cluster.k=auto``). Returns the
    ``eval/<baseline>/<metric>`` entries and the rows of the comparison table.
    """
    from mtl_unsup.baselines import run_baseline, score_labels

    result, rows = {}, []
    if names and len(features) < k:
        print(f"baselines skipped: {len(features)} images are fewer than cluster.k={k}")
        return result, rows
    for name in names:
        pred, info = run_baseline(name, features, k, train_cfg.cluster.pca_dim, int(train_cfg.get("seed", 0)),
                                  int(train_cfg.cluster.niter), int(train_cfg.cluster.nredo),
                                  min_cluster_size)
        scores = score_labels(pred, labels, k if name != "hdbscan" else info["clusters"])
        result.update({f"eval/{name}/{m}": v for m, v in scores.items()})
        if name == "hdbscan":
            result["eval/hdbscan/clusters"] = info["clusters"]
            result["eval/hdbscan/noise"] = info["noise"]
        rows.append({"method": name, **scores, **info})
    return result, rows


def evaluate(cfg: DictConfig) -> dict:
    import torch

    from mtl_unsup.baselines import check_baselines, comparison_table
    from mtl_unsup.data.images import DataError
    from mtl_unsup.embedding_outputs import viewable
    from mtl_unsup.html.outputs import write_prediction_report
    from mtl_unsup.inference import model_from_checkpoint
    from mtl_unsup.metrics import score_clustering
    from mtl_unsup.model_inputs import run_model
    from mtl_unsup.visualize import save_pictures, tsne_sample

    baselines = check_baselines(cfg.baselines)
    if cfg.hdbscan_min_cluster_size is not None and cfg.hdbscan_min_cluster_size < 2:
        raise ConfigValueError(f"hdbscan_min_cluster_size={cfg.hdbscan_min_cluster_size}: must be >= 2, "
                               "or null for max(5, images // (4 k)).")
    out_dir = Path(cfg.out_dir)
    if not cfg.overwrite:
        refuse_to_overwrite([out_dir / "evaluation.json", out_dir / "clusters.csv",
                             *([out_dir / "report.html"] if cfg.report else [])])
    module, train_cfg = model_from_checkpoint(cfg.ckpt)

    def labelled(inputs: Inputs) -> None:  # checked before the model runs
        if not inputs.has_labels:
            raise DataError(f"{inputs.source} has no labels: evaluation needs them. " + (
                "Sort the images into <data.root>/<class>/ folders." if "root" in cfg.data else
                "Add a labels array or column to the file, or paths <folder>/<class>/<file>."))

    start = time.perf_counter()
    images, preds = run_model(module, train_cfg, cfg.data, cfg.ckpt, "evaluation", cfg.device,
                              cfg.progress, check=labelled)
    seconds = time.perf_counter() - start
    labels = np.asarray(images.labels)
    k = module.k
    result = {f"eval/{m}": v for m, v in score_clustering(
        torch.from_numpy(preds.clusters), torch.from_numpy(labels), k).items()}
    result["eval/knn_acc"] = knn_accuracy(preds.features, labels, cfg.knn_k)
    result["eval/images"] = len(images)
    summary = " ".join(f"{k.split('/')[1]}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in result.items())
    model_row = {"method": f"model ({module.answer() or 'k-means'})", "seconds": seconds,
                 "clusters": len(np.unique(preds.clusters)),
                 **{m: result[f"eval/{m}"] for m in ("acc", "nmi", "ari")}}
    baseline_result, rows = score_baselines(baselines, preds.features, labels, train_cfg,
                                            cfg.hdbscan_min_cluster_size, k)
    result.update(baseline_result)
    table = cluster_table(preds.clusters, labels, images.classes, k)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "evaluation.json", json.dumps(result, indent=2) + "\n")
    with atomic_path(out_dir / "clusters.csv") as partial, open(partial, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    sample = tsne_sample(preds.features, seed=int(train_cfg.get("seed", 0))) \
        if (cfg.pictures or cfg.report) and len(preds.features) >= 10 else None
    if cfg.pictures:
        save_pictures(out_dir, viewable(images.paths), preds.clusters, preds.confidence, preds.features,
                      labels, images.classes, sample=sample)
    if cfg.report:
        write_prediction_report(out_dir, "evaluate", module, train_cfg, viewable(images.paths), preds, labels,
                                images.classes, result, sample)
    print(summary)
    print("| cluster | size | majority class | purity |\n|---|---|---|---|")
    for row in table:
        print(f"| {row['cluster']} | {row['size']} | {row['majority_class']} | {row['purity']:.3f} |")
    if rows:
        print("\nThe same features, clustered without labels (seconds: the model's forward pass; "
              "a baseline's clustering):")
        print(comparison_table([model_row, *rows]))
    print(f"written to {out_dir}" + (f" (open {out_dir / 'report.html'})" if cfg.report else ""))
    return result


@hydra_command("evaluate")
def main(cfg: DictConfig) -> None:
    evaluate(cfg)


if __name__ == "__main__":
    main()
