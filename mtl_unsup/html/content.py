"""What ``report.html`` shows, as one JSON-ready dict: the summary, every cluster, the confusion
matrix, the 2-D embedding, the curves and the choice of k. Labels only describe (majority class,
purity, the images of other classes); nothing here chooses anything."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class ReportInputs:
    """One split's answer and what the run knows about it.

    ``clusters``, ``confidence`` and (with labels, -1 for unknown) ``labels`` are per image, in
    the order of ``paths`` (None for rows of features without images). ``embedding`` is
    ``(index, xy)``: 2-D coordinates of a sample of the images.
    """

    title: str
    kind: str  # training | predict | evaluate
    clusters: np.ndarray
    confidence: np.ndarray
    paths: Sequence[Path | str] | None = None
    labels: np.ndarray | None = None
    classes: Sequence[str] = ()
    embedding: tuple[np.ndarray, np.ndarray] | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    answer: str = ""
    config: str = ""
    run_info: Mapping[str, Any] = field(default_factory=dict)
    curves: Mapping[str, Sequence[tuple[int, float]]] = field(default_factory=dict)
    k_selection: Mapping[int, float] = field(default_factory=dict)
    k_criterion: str = ""
    split: str = "test"
    k: int | None = None  # the model's number of clusters (None: the largest cluster id + 1)

    @property
    def has_labels(self) -> bool:
        return self.labels is not None and bool((self.labels >= 0).any())


def display_order(clusters: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """Image indices by cluster, most confident first (ties by index): the page's order."""
    return np.lexsort((np.arange(len(clusters)), -confidence, clusters))


def matching(clusters: np.ndarray, labels: np.ndarray, k: int, n: int) -> tuple[np.ndarray, dict[int, int]]:
    """Class-by-cluster counts and the Hungarian match cluster -> class (labels >= 0 only)."""
    from scipy.optimize import linear_sum_assignment

    keep = labels >= 0
    counts = np.zeros((n, k), dtype=np.int64)
    np.add.at(counts, (labels[keep], clusters[keep]), 1)
    rows, cols = linear_sum_assignment(-counts)
    return counts, {int(c): int(r) for r, c in zip(rows, cols, strict=True)}


def cluster_entries(inputs: ReportInputs, order: np.ndarray, k: int) -> list[dict[str, Any]]:
    entries = []
    starts = np.searchsorted(inputs.clusters[order], np.arange(k + 1))
    for c in range(k):
        members = order[starts[c]:starts[c + 1]]
        entry: dict[str, Any] = {"id": c, "size": int(len(members)), "members": members.tolist(),
                                 "mean_confidence": round(float(inputs.confidence[members].mean()), 4)
                                 if len(members) else None}
        if inputs.has_labels and len(members):
            known = members[inputs.labels[members] >= 0]
            if len(known):
                counts = np.bincount(inputs.labels[known])
                majority = int(counts.argmax())
                entry.update(majority=majority, purity=round(float(counts[majority] / len(known)), 4),
                             others=known[inputs.labels[known] != majority].tolist())
        entries.append(entry)
    return entries


def report_content(inputs: ReportInputs, sprites: dict | None) -> dict[str, Any]:
    """The page's data. ``sprites``: where each image's thumbnail is (see :mod:`.thumbs`)."""
    clusters = inputs.clusters.astype(np.int64)
    k = max(inputs.k or 0, int(clusters.max()) + 1 if len(clusters) else 0)  # empty clusters shown too
    order = display_order(clusters, inputs.confidence)
    content: dict[str, Any] = {
        "title": inputs.title, "kind": inputs.kind, "split": inputs.split, "k": k, "n": len(clusters),
        "metrics": {key: float(v) for key, v in inputs.metrics.items()}, "answer": inputs.answer,
        "config": inputs.config, "run_info": dict(inputs.run_info),
        "confidence": np.round(inputs.confidence.astype(float), 3).tolist(),
        "clusters": cluster_entries(inputs, order, k), "sprites": sprites,
        "names": [Path(p).name for p in inputs.paths] if inputs.paths is not None else None,
        "curves": {name: [[int(e), float(v)] for e, v in points] for name, points in inputs.curves.items()},
        "k_selection": {"criterion": inputs.k_criterion, "chosen": k,
                        "scores": [[int(kk), float(v)] for kk, v in sorted(inputs.k_selection.items())]}
        if inputs.k_selection else None,
        "labels": None, "classes": list(inputs.classes), "confusion": None, "embedding": None,
    }
    colour = {c: c for c in range(k)}  # cluster -> colour index; its matched class's with labels
    if inputs.has_labels:
        n = max(int(inputs.labels.max()) + 1, len(inputs.classes))
        counts, match = matching(clusters, inputs.labels, k, n)
        colour = {c: match.get(c, n + c) for c in range(k)}
        matched = sorted(match, key=match.get)
        cols = matched + [c for c in range(k) if c not in match]
        content["labels"] = inputs.labels.astype(int).tolist()
        acc = float(sum(counts[match[c], c] for c in match) / max(counts.sum(), 1))
        content["confusion"] = {"counts": counts[:, cols].tolist(), "columns": cols, "acc": round(acc, 4)}
    content["colour"] = [colour[c] for c in range(k)]
    if inputs.embedding is not None:
        index, xy = inputs.embedding
        lo, hi = xy.min(0), xy.max(0)
        unit = (xy - lo) / np.where(hi > lo, hi - lo, 1)
        content["embedding"] = {"index": index.astype(int).tolist(), "x": np.round(unit[:, 0], 4).tolist(),
                                "y": np.round(unit[:, 1], 4).tolist()}
    return content
