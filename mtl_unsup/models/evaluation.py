"""Scoring a whole evaluated split at once, the same with one process or many.

Each step records per-image outputs with the image's dataset index. At the end of the split the
records of every rank are gathered (every rank enters every collective, whatever its data), the
duplicates that ``DistributedSampler`` pads in are dropped by index, and rank 0 scores the split
once and broadcasts the scores, so every rank logs the same numbers as a one-process run would.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import lightning as L
import torch
from torchmetrics.functional.clustering import normalized_mutual_info_score

from mtl_unsup.clustering.kmeans import whiten
from mtl_unsup.distributed import gather_rows
from mtl_unsup.metrics import LABELLED_NAMES, score_clustering, silhouette


class SplitRecorder:
    """Per-image outputs of one split, collected step by step."""

    def __init__(self, feature_dim: int) -> None:
        self.feature_dim = feature_dim
        self.parts: dict[str, list[torch.Tensor]] = defaultdict(list)

    def add(self, **outputs: torch.Tensor) -> None:
        for key, value in outputs.items():
            self.parts[key].append(value.detach())

    def _stacked(self, key: str, device: torch.device) -> torch.Tensor:
        if self.parts[key]:
            return torch.cat(self.parts[key]).to(device)
        shape = (0, self.feature_dim) if key == "features" else (0,)
        dtype = torch.float32 if key == "features" else torch.long
        return torch.empty(shape, dtype=dtype, device=device)

    def collect(self, module: L.LightningModule, keys: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Every rank's records, on CPU, one row per image, ordered by dataset index."""
        local = {key: self._stacked(key, module.device) for key in keys}
        self.parts.clear()
        local = {key: gather_rows(value) for key, value in local.items()}
        local = {key: value.cpu() for key, value in local.items()}
        index = local["index"]
        order = torch.argsort(index, stable=True)
        first = torch.ones(len(index), dtype=torch.bool)
        first[1:] = index[order][1:] != index[order][:-1]
        keep = order[first]
        return {key: value[keep] for key, value in local.items()}


def split_metric_names(split: str, num_images: int, has_head: bool, has_labels: bool) -> set[str]:
    """The label-free keys :func:`score_split` gives for a split, with ACC/NMI/ARI when the
    images have labels (k-means is always scored; nothing for a split of fewer than 2 images).
    Per-head and many-to-one scores, which depend on the data, come on top."""
    if num_images < 2:
        return set()
    names = ["silhouette", *(["agreement"] if has_head else [])]
    names += [n for n in LABELLED_NAMES if "m2o" not in n] if has_labels else []
    return {f"{split}/{name}" for name in names}


def score_split(
    split: str, out: dict[str, torch.Tensor], pca_dim: int | None, seed: int = 0,
    fit_kmeans: Callable[[torch.Tensor], torch.Tensor] | None = None,
    num_clusters: int | None = None, head_sizes: dict[str, int] | None = None,
) -> dict[str, float]:
    """Label-free scores of the run's answer, then (for labelled images) ACC/NMI/ARI.

    The answer is ``out["head"]``, the chosen clustering head's argmax (k-means' when there is
    no head). ``fit_kmeans`` (validation) clusters the split's own current features; otherwise
    ``out["kmeans"]`` holds the assignment to the training set's centroids. Every other head in
    ``out["heads/<name>"]`` (of ``head_sizes[name]`` clusters) is scored as ``split/<name>/...``;
    where a clustering's k differs from the number of classes, many-to-one ACC comes too.
    """
    if len(out["index"]) < 2:
        return {}
    if fit_kmeans is not None:
        out = {**out, "kmeans": fit_kmeans(out["features"])}
    answer = out["head"] if "head" in out else out.get("kmeans")
    scores: dict[str, float] = {}
    if answer is not None:
        space = whiten(out["features"], pca_dim)[0]
        scores[f"{split}/silhouette"] = silhouette(space, answer, seed=seed)
    if "head" in out and "kmeans" in out:
        scores[f"{split}/agreement"] = float(normalized_mutual_info_score(out["head"], out["kmeans"]))
    labelled = out["label"] >= 0  # ground truth: reported only
    if not labelled.any():
        return scores
    target = out["label"][labelled]
    for kind, prefix in (("head", ""), ("kmeans", "kmeans_")):
        if kind in out:
            for name, value in score_clustering(out[kind][labelled], target, num_clusters).items():
                scores[f"{split}/{prefix}{name}"] = value
    for key in out:
        if key.startswith("heads/"):
            name = key.split("/", 1)[1]
            k = (head_sizes or {}).get(name)
            for metric, value in score_clustering(out[key][labelled], target, k).items():
                scores[f"{split}/{name}/{metric}"] = value
    return scores
