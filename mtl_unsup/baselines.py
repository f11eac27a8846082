"""Classical clusterings of the model's features, to compare the run's answer against.

Each baseline clusters a feature matrix (``N x D``) in the space the framework's k-means sees:
PCA-whitened to the checkpoint's ``cluster.pca_dim`` and L2-normalised
(:func:`mtl_unsup.clustering.kmeans.whiten`). They are label-free: none takes ground truth, so
a baseline's clusters are what it would give on unlabelled images; only :func:`score_labels`
compares them with the classes afterwards.

- ``kmeans``: FAISS k-means with ``k`` clusters, the best of ``nredo`` seeded starts.
- ``agglomerative``: Ward linkage with ``k`` clusters. Ward needs all pairwise distances
  (``N^2 / 2`` doubles: 400 MB at 10,000 points), so above ``max_points`` it is fitted on a
  seeded sample and every other point joins the cluster with the nearest mean.
- ``hdbscan``: density clusters (scikit-learn's HDBSCAN), which chooses its own number of
  clusters and leaves points in no dense region as noise (label -1). Above ``max_points`` it
  is fitted on a seeded sample and every other point takes the label of its nearest sampled
  point, noise included.

Each function returns the labels (a numpy ``int64`` array, one per row) and a dict of extra
information: ``clusters`` (number of clusters found, noise not counted), ``noise`` (share of
points labelled -1), ``seconds`` (wall time, whitening included) and ``fitted_on`` (points the
clustering was fitted on).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from mtl_unsup.clustering.kmeans import run_kmeans, whiten
from mtl_unsup.config import BASELINES, ConfigValueError
from mtl_unsup.metrics import score_clustering

__all__ = ["BASELINES", "check_baselines", "comparison_table", "run_baseline", "score_labels"]
MAX_POINTS = 10_000


def check_baselines(names: Sequence[str], key: str = "baselines") -> list[str]:
    """The requested baselines without repeats, or one error naming ``key`` and the choices."""
    unknown = [str(n) for n in names if n not in BASELINES]
    if unknown:
        raise ConfigValueError(
            f"{key}: {', '.join(repr(n) for n in unknown)} is not a baseline. Choose among "
            f"{', '.join(BASELINES)}, e.g. {key}=[kmeans,hdbscan], or {key}=[] for none.")
    return list(dict.fromkeys(str(n) for n in names))


def whitened(features: np.ndarray, pca_dim: int | None) -> np.ndarray:
    """``features`` as the framework's k-means sees them (float32, C-contiguous)."""
    x, _, _ = whiten(torch.as_tensor(np.asarray(features, dtype=np.float32)), pca_dim)
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def _sample(n: int, max_points: int, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded sample of ``max_points`` rows, or None when all rows fit."""
    if n <= max_points:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _nearest(queries: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index of the nearest row of ``points`` for each row of ``queries`` (exact, Euclidean)."""
    import faiss

    index = faiss.IndexFlatL2(points.shape[1])
    index.add(np.ascontiguousarray(points, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), 1)[1][:, 0]


def _info(labels: np.ndarray, start: float, fitted_on: int) -> dict:
    return {"clusters": len(np.unique(labels[labels >= 0])), "noise": float(np.mean(labels < 0)),
            "seconds": time.perf_counter() - start, "fitted_on": fitted_on}


def _check_k(n: int, k: int, name: str) -> None:
    if not 2 <= k <= n:
        raise ValueError(f"{name} needs 2 <= k <= number of points, got k={k} for {n} points")


def kmeans(features: np.ndarray, k: int, pca_dim: int | None = 32, seed: int = 0, niter: int = 20,
           nredo: int = 5) -> tuple[np.ndarray, dict]:
    """k-means of the whitened features, as the framework clusters its training set."""
    start = time.perf_counter()
    x = whitened(features, pca_dim)
    _check_k(len(x), k, "kmeans")
    labels, _, _ = run_kmeans(torch.from_numpy(x), k, niter=niter, nredo=nredo, seed=seed)
    labels = labels.numpy().astype(np.int64)
    return labels, _info(labels, start, len(x))


def agglomerative(features: np.ndarray, k: int, pca_dim: int | None = 32, seed: int = 0,
                  max_points: int = MAX_POINTS) -> tuple[np.ndarray, dict]:
    """Ward agglomerative clustering into ``k`` clusters (fitted on a sample above ``max_points``)."""
    from sklearn.cluster import AgglomerativeClustering

    start = time.perf_counter()
    x = whitened(features, pca_dim)
    sample = _sample(len(x), max_points, seed)
    fit = x if sample is None else x[sample]
    _check_k(len(fit), k, "agglomerative")
    fitted = AgglomerativeClustering(n_clusters=k, linkage="ward").fit_predict(fit).astype(np.int64)
    if sample is None:
        labels = fitted
    else:
        means = np.stack([fit[fitted == c].mean(axis=0) for c in range(k)])
        labels = _nearest(x, means).astype(np.int64)
        labels[sample] = fitted  # the fitted points keep their own cluster
    return labels, _info(labels, start, len(fit))


def default_min_cluster_size(n: int, k: int) -> int:
    """A quarter of the mean size of ``k`` clusters among ``n`` points, at least 5."""
    return max(5, n // (4 * max(k, 1)))


def hdbscan(features: np.ndarray, k: int, pca_dim: int | None = 32, seed: int = 0,
            min_cluster_size: int | None = None,
            max_points: int = MAX_POINTS) -> tuple[np.ndarray, dict]:
    """HDBSCAN density clusters; ``k`` only sets the default ``min_cluster_size``
    (:func:`default_min_cluster_size` of the points fitted on). Noise is labelled -1."""
    from sklearn.cluster import HDBSCAN

    start = time.perf_counter()
    x = whitened(features, pca_dim)
    sample = _sample(len(x), max_points, seed)
    fit = x if sample is None else x[sample]
    size = min_cluster_size or default_min_cluster_size(len(fit), k)
    size = max(2, min(size, len(fit)))
    if len(fit) < 2:
        fitted = np.full(len(fit), -1, dtype=np.int64)
    else:
        fitted = HDBSCAN(min_cluster_size=size, copy=True).fit_predict(fit).astype(np.int64)
    labels = fitted if sample is None else fitted[_nearest(x, fit)]
    if sample is not None:
        labels[sample] = fitted
    info = _info(labels, start, len(fit))
    info["min_cluster_size"] = size
    return labels, info


def run_baseline(name: str, features: np.ndarray, k: int, pca_dim: int | None = 32, seed: int = 0,
                 niter: int = 20, nredo: int = 5,
                 min_cluster_size: int | None = None) -> tuple[np.ndarray, dict]:
    """The baseline called ``name`` (one of :data:`BASELINES`) on ``features``."""
    if name == "kmeans":
        return kmeans(features, k, pca_dim, seed, niter, nredo)
    if name == "agglomerative":
        return agglomerative(features, k, pca_dim, seed)
    if name == "hdbscan":
        return hdbscan(features, k, pca_dim, seed, min_cluster_size)
    check_baselines([name])
    raise AssertionError(name)  # unreachable: check_baselines raised


def score_labels(labels: np.ndarray, target: np.ndarray, num_clusters: int) -> dict[str, float]:
    """:func:`~mtl_unsup.metrics.score_clustering` of a baseline's labels, noise (-1) counted as
    one more cluster so that ACC, NMI and ARI stay defined (noise can match at most one class)."""
    labels = np.asarray(labels, dtype=np.int64).copy()
    labels[labels < 0] = labels.max() + 1 if (labels >= 0).any() else 0
    return score_clustering(torch.from_numpy(labels), torch.as_tensor(np.asarray(target)).long(),
                            num_clusters)


def comparison_table(rows: Sequence[dict]) -> str:
    """A Markdown table of ``rows`` (``method``, ``acc``, ``nmi``, ``ari``, ``clusters``,
    ``seconds``, optional ``noise``) side by side."""
    lines = ["| method | ACC | NMI | ARI | clusters | seconds |", "|---|---|---|---|---|---|"]
    for row in rows:
        clusters = str(row["clusters"])
        if row.get("noise"):
            clusters += f" + noise ({row['noise']:.1%})"
        lines.append(f"| {row['method']} | {row['acc']:.4f} | {row['nmi']:.4f} | {row['ari']:.4f} | "
                     f"{clusters} | {row['seconds']:.2f} |")
    return "\n".join(lines)
