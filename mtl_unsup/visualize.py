"""Pictures of what a model learned, saved as PNG: cluster grids, confusion, embedding, curves."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from mtl_unsup.atomic import write_with  # noqa: E402
from mtl_unsup.html.thumbs import thumbnail  # noqa: E402


def cluster_grid(paths: Sequence[Path], clusters: np.ndarray, confidence: np.ndarray, out: Path,
                 per_cluster: int = 12, thumb: int = 48) -> Path:
    """One row per cluster: its most confident images first, the row labelled with its size; each
    image keeps its aspect ratio in its cell."""
    k = int(clusters.max()) + 1 if len(clusters) else 0
    cell = thumb + 4  # a white margin keeps neighbouring thumbnails apart
    canvas = Image.new("RGB", (per_cluster * cell, max(k, 1) * cell), "white")
    fig_labels = []
    for c in range(k):
        members = np.flatnonzero(clusters == c)
        best = members[np.argsort(-confidence[members])][:per_cluster]
        for j, i in enumerate(best):  # a file unreadable since training: a grey cell, not a lost run
            canvas.paste(thumbnail(paths[i], thumb), (j * cell + 2, c * cell + 2))
        fig_labels.append(f"{c} (n={len(members)})")
    fig, ax = plt.subplots(figsize=(canvas.width / 60 + 1.2, canvas.height / 60 + 0.5), dpi=60)
    ax.imshow(canvas)
    ax.set_yticks([c * cell + cell / 2 for c in range(k)], fig_labels)
    ax.set_xticks([])
    ax.set_title("clusters, most confident first")
    return _save(fig, out)


def hungarian_confusion(clusters: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                        out: Path) -> Path:
    """Class-by-cluster counts, clusters reordered by their Hungarian match to the classes."""
    from mtl_unsup.html.content import matching

    keep = labels >= 0
    k, n = int(clusters[keep].max()) + 1, max(int(labels[keep].max()) + 1, len(class_names))
    counts, match = matching(clusters, labels, k, n)
    order = sorted(match, key=match.get) + [c for c in range(k) if c not in match]
    counts = counts[:, order]
    fig, ax = plt.subplots(figsize=(1 + 0.5 * k, 1 + 0.5 * n))
    ax.imshow(counts, cmap="Blues")
    for (i, j), v in np.ndenumerate(counts):
        if v:
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > counts.max() / 2 else "black")
    ax.set_xticks(range(k), [str(c) for c in order])
    ax.set_yticks(range(n), list(class_names)[:n] or [str(i) for i in range(n)])
    ax.set_xlabel("cluster (matched order)")
    ax.set_ylabel("true class")
    acc = sum(counts[i, i] for i in range(min(n, k))) / max(counts.sum(), 1)
    ax.set_title(f"confusion after Hungarian matching (ACC {acc:.3f})")
    return _save(fig, out)


def tsne_sample(features: np.ndarray, max_points: int = 3000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """t-SNE (after PCA to 50) of at most ``max_points`` images drawn at random: their indices
    and 2-D coordinates. The embedding picture and ``report.html`` share it."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    idx = np.sort(rng.permutation(len(features))[:max_points])
    x = features[idx]
    if x.shape[1] > 50 and len(x) > 50:
        x = PCA(50, random_state=seed).fit_transform(x)
    xy = TSNE(2, init="pca", random_state=seed, perplexity=min(30, max(2, len(x) // 4))).fit_transform(x)
    return idx, xy


def embedding_2d(features: np.ndarray, clusters: np.ndarray, labels: np.ndarray | None, out: Path,
                 max_points: int = 3000, seed: int = 0,
                 sample: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """t-SNE of the features (``sample``, or one drawn here), coloured by cluster and, if known, by
    class; with classes, each cluster takes the colour of the class it is matched to (Hungarian),
    so the two panels differ where cluster and class disagree."""
    idx, xy = sample if sample is not None else tsne_sample(features, max_points, seed)
    colour = clusters[idx]
    panels = []
    if labels is not None and (labels >= 0).any():
        from mtl_unsup.html.content import matching

        k, n = int(clusters.max()) + 1, int(labels.max()) + 1
        match = matching(clusters, labels, k, n)[1]
        colour = np.array([match.get(int(c), n + int(c)) for c in colour])
        panels.append(("true class", labels[idx]))
    panels.insert(0, ("cluster", colour))
    top = max(int(max(c.max() for _, c in panels)), 19)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5), squeeze=False)
    for ax, (title, values) in zip(axes[0], panels, strict=True):
        ax.scatter(xy[:, 0], xy[:, 1], c=values, cmap="tab20", vmin=0, vmax=top, s=6)
        ax.set_title(f"t-SNE of features, coloured by {title}")
        ax.set_xticks([]), ax.set_yticks([])
    return _save(fig, out)


def training_curves(history: Path, out: Path) -> Path:
    """Per-task losses and clustering quality (ACC/NMI) over epochs, from ``epochs.jsonl`` (see
    :mod:`mtl_unsup.history`)."""
    from mtl_unsup.html.run_files import curves

    series = {key: dict(points) for key, points in curves(history).items()}  # as the report draws them
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for key, points in sorted(series.items()):
        ax = left if key.startswith("train/loss") else right
        epochs = sorted(points)
        ax.plot(epochs, [points[e] for e in epochs], label=key, marker="." if len(epochs) < 30 else None)
    left.set_title("losses (weighted sum and per task)")
    right.set_title("clustering quality\n(silhouette is label-free; the rest read labels, reported only)",
                    fontsize=10)
    for ax in (left, right):
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=8)
    return _save(fig, out)


def k_selection(scores: dict[int, float], chosen: int, criterion: str, out: Path) -> Path:
    """The label-free criterion against k (``cluster.k=auto``), the chosen k marked."""
    ks = sorted(scores)
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=80)
    ax.plot(ks, [scores[k] for k in ks], "o-")
    ax.axvline(chosen, color="tab:red", linestyle="--", label=f"chosen k = {chosen}")
    ax.set_xlabel("k")
    ax.set_ylabel(criterion.replace("_", " "))
    ax.set_title("number of clusters, chosen without labels")
    ax.legend()
    return _save(fig, out)


def _save(fig: plt.Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    write_with(out, lambda partial: fig.savefig(partial, dpi=100, format="png"))  # whole, or not at all
    plt.close(fig)
    return out


def save_pictures(out_dir: Path, paths: Sequence[Path] | None, clusters: np.ndarray, confidence: np.ndarray,
                  features: np.ndarray, labels: np.ndarray | None = None,
                  class_names: Sequence[str] = (), history: Path | None = None,
                  sample: tuple[np.ndarray, np.ndarray] | None = None) -> list[Path]:
    """Every picture that applies: grid (with image paths), confusion (with labels), embedding
    (of ``sample``, see :func:`tsne_sample`, when given), curves (with a log)."""
    written = [cluster_grid(paths, clusters, confidence, out_dir / "cluster_grid.png")] if paths else []
    has_labels = labels is not None and bool((labels >= 0).any())
    if has_labels:
        written.append(hungarian_confusion(clusters, labels, class_names, out_dir / "confusion.png"))
    if len(features) >= 10:
        written.append(embedding_2d(features, clusters, labels if has_labels else None,
                                    out_dir / "embedding.png", sample=sample))
    if history is not None and history.is_file():
        written.append(training_curves(history, out_dir / "training_curves.png"))
    return written
