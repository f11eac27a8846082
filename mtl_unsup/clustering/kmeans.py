"""The DeepCluster recipe on a feature matrix: PCA-whiten, L2-normalise, FAISS k-means.

The fitted transform and centroids form a :class:`ClusterState`, which can assign any new
feature (held-out images, prediction) to the same clusters.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np
import torch

from mtl_unsup.errors import NonFiniteLossError


@dataclass
class ClusterState:
    """Pseudo-labels of the training set and everything needed to assign new features.

    Attributes:
        labels: cluster of each training image, by dataset index.
        centroids: ``(k, d)`` centroids in the whitened, normalised space.
        pca_mean: ``(D,)`` mean of the raw features.
        pca_proj: ``(D, d)`` whitening projection (identity when PCA is off).
        epoch: training epoch at which the clustering was computed.
        fingerprint: of the training image list the labels belong to (see
            :func:`~mtl_unsup.data.images.ImageList.fingerprint`); empty when unknown.
    """

    labels: torch.Tensor
    centroids: torch.Tensor
    pca_mean: torch.Tensor
    pca_proj: torch.Tensor
    epoch: int = 0
    fingerprint: str = ""

    @property
    def k(self) -> int:
        return int(self.centroids.shape[0])

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        x = (features.float().cpu() - self.pca_mean) @ self.pca_proj
        return torch.nn.functional.normalize(x, dim=1)

    def assign(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid of each feature row and the (Euclidean) distance to it."""
        dist = torch.cdist(self.transform(features), self.centroids)
        d, labels = dist.min(dim=1)
        return labels, d

    def distance_to(self, features: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """Distance of each feature row to the centroid of the given cluster."""
        return (self.transform(features) - self.centroids[clusters.cpu()]).norm(dim=1)

    def relabelled(self, permutation: torch.Tensor) -> ClusterState:
        """The same clustering with cluster ``c`` renamed ``permutation[c]``."""
        centroids = torch.empty_like(self.centroids)
        centroids[permutation] = self.centroids
        return ClusterState(permutation[self.labels], centroids, self.pca_mean, self.pca_proj,
                            self.epoch, self.fingerprint)

    def state_dict(self) -> dict:
        return {"labels": self.labels, "centroids": self.centroids, "pca_mean": self.pca_mean,
                "pca_proj": self.pca_proj, "epoch": self.epoch, "fingerprint": self.fingerprint}

    @classmethod
    def from_state_dict(cls, state: dict) -> ClusterState:
        return cls(**state)


def matching_permutation(labels: torch.Tensor, reference: torch.Tensor, k: int) -> torch.Tensor:
    """Renaming of ``labels``' clusters that agrees best with ``reference`` (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    overlap = torch.zeros(k, k, dtype=torch.long)
    overlap.index_put_((labels.cpu(), reference.cpu()), torch.ones(len(labels), dtype=torch.long),
                       accumulate=True)
    rows, cols = linear_sum_assignment(-overlap.numpy())
    permutation = torch.arange(k)
    permutation[torch.from_numpy(rows)] = torch.from_numpy(cols)
    return permutation


def eigh_of_features(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.eigh`` of a feature covariance; features it cannot decompose (infinite, NaN
    or astronomically large: the weights have diverged) stop the run, naming the cause."""
    if not bool(torch.isfinite(cov).all()):
        raise NonFiniteLossError("The features are not finite: the weights have diverged, and they "
                                 "cannot be clustered.")
    try:
        return torch.linalg.eigh(cov)
    except torch.linalg.LinAlgError as err:
        raise NonFiniteLossError(f"The features cannot be whitened ({err}): the weights have most "
                                 "likely diverged.") from None


def fit_pca_whitening(
    x: torch.Tensor, dim: int | None, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``(D, d)`` projection onto the top ``d`` principal axes, scaled to unit variance.

    ``d`` is cut to ``min(dim, D, n - 1)`` when there are too few points; ``dim`` of None or 0
    skips PCA (identity projection, no whitening).
    """
    n, full = x.shape
    x64 = x.double()
    mean = x64.mean(dim=0)
    if not dim:
        return mean.float(), torch.eye(full)
    d = max(1, min(dim, full, n - 1))
    centred = x64 - mean
    cov = centred.t() @ centred / max(n - 1, 1)
    return mean.float(), whitening_projection(cov, d, eps)


def whitening_projection(cov: torch.Tensor, d: int, eps: float = 1e-5) -> torch.Tensor:
    """``(D, d)`` projection onto the top ``d`` principal axes of a covariance, scaled to unit
    variance."""
    eigvals, eigvecs = eigh_of_features(cov)  # ascending
    eigvals, eigvecs = eigvals.flip(0)[:d], eigvecs.flip(1)[:, :d]
    return (eigvecs / torch.sqrt(eigvals.clamp(min=0) + eps)).float()


def whiten(features: torch.Tensor, pca_dim: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The features as k-means sees them: PCA-whitened to ``pca_dim`` and L2-normalised.

    Returns the transformed rows with the fitted mean and projection.
    """
    features = features.float().cpu()
    mean, proj = fit_pca_whitening(features, pca_dim)
    return torch.nn.functional.normalize((features - mean) @ proj, dim=1), mean, proj


def faiss_gpus() -> int:
    """GPUs FAISS can use (0 with ``faiss-cpu``; ``faiss-gpu`` on a machine with GPUs runs
    k-means on one of them)."""
    return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0


def run_kmeans(
    x: torch.Tensor, k: int, niter: int = 20, nredo: int = 1, seed: int = 0,
    init: torch.Tensor | None = None, gpu: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """FAISS k-means from ``init`` centroids or ``nredo`` random starts (the best is kept), on a
    GPU when ``gpu`` and FAISS sees one.

    Returns labels, centroids and the final objective (sum of squared distances).
    """
    n, d = x.shape
    if not 2 <= k <= n:
        raise ValueError(f"k-means needs 2 <= k <= number of points, got k={k} for {n} points")
    data = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    km = faiss.Kmeans(d, k, niter=niter, nredo=1 if init is not None else nredo,
                      seed=int(seed) % (2**31), verbose=False, gpu=1 if gpu and faiss_gpus() else False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, n // k + 1))
    if init is not None:
        km.train(data, init_centroids=np.ascontiguousarray(init.cpu().numpy(), dtype=np.float32))
    else:
        km.train(data)
    dist, labels = km.index.search(data, 1)
    objective = float(dist.sum())
    return torch.from_numpy(labels[:, 0].astype(np.int64)), torch.from_numpy(km.centroids.copy()), objective


def fill_empty_clusters(
    x: torch.Tensor, labels: torch.Tensor, centroids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Give every empty cluster half of the largest cluster, split along its main axis.

    The median split guarantees both halves are non-empty while the largest has >= 2 points,
    which holds whenever ``k <= n``.
    """
    labels, centroids = labels.clone(), centroids.clone()
    k = centroids.shape[0]
    for empty in range(k):
        counts = torch.bincount(labels, minlength=k)
        if counts[empty] > 0:
            continue
        big = int(counts.argmax())
        members = (labels == big).nonzero().squeeze(1)
        pts = x[members].double()
        centred = pts - pts.mean(dim=0)
        axis = torch.linalg.svd(centred, full_matrices=False).Vh[0]
        proj = centred @ axis
        order = proj.argsort()
        moved = members[order[len(order) // 2 :]]
        labels[moved] = empty
        centroids[big] = x[labels == big].mean(dim=0)
        centroids[empty] = x[moved].mean(dim=0)
    return labels, centroids


def cluster_features(
    features: torch.Tensor, k: int, pca_dim: int | None = 128, niter: int = 20, nredo: int = 1,
    seed: int = 0, epoch: int = 0, init_labels: torch.Tensor | None = None,
) -> ClusterState:
    """PCA-whiten, L2-normalise and k-means ``features``; no cluster is left empty."""
    x, mean, proj = whiten(features, pca_dim)
    return cluster_whitened(x, mean, proj, k, niter, nredo, seed, epoch, init_labels)


def cluster_whitened(
    x: torch.Tensor, mean: torch.Tensor, proj: torch.Tensor, k: int, niter: int = 20,
    nredo: int = 1, seed: int = 0, epoch: int = 0, init_labels: torch.Tensor | None = None,
) -> ClusterState:
    """k-means of already whitened rows ``x`` (see :func:`whiten`, which gave ``mean``, ``proj``).

    k-means takes the best of ``nredo`` random starts and, given ``init_labels`` (the previous
    assignment), of one more start from those clusters' means in the new feature space. The
    lowest objective wins, so a good partition is kept (with its cluster identities) unless the
    new features clearly favour another.
    """
    labels, centroids, objective = run_kmeans(x, k, niter=niter, nredo=nredo, seed=seed)
    if init_labels is not None and len(init_labels) == len(x) and int(init_labels.max()) < k:
        counts = torch.bincount(init_labels, minlength=k).clamp(min=1).unsqueeze(1).float()
        init = torch.zeros(k, x.shape[1]).index_add_(0, init_labels, x) / counts
        warm = run_kmeans(x, k, niter=niter, seed=seed, init=init)
        if warm[2] <= objective:
            labels, centroids, objective = warm
    labels, centroids = fill_empty_clusters(x, labels, centroids)
    return ClusterState(labels, centroids, mean, proj, epoch)
