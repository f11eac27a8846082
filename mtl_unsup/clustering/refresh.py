"""What every dataset-level task reads at a refresh: the training set's features, once.

The refresh callback makes one feature pass over the training set, builds a
:class:`RefreshContext` on rank 0 and hands it to every task that is due. The context computes
what the tasks ask for lazily and only once: the whitened space, k-means at any k (balanced by
Sinkhorn-Knopp when ``cluster.assign=sinkhorn``) and nearest neighbours.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch

from mtl_unsup.clustering.kmeans import ClusterState, cluster_whitened, whiten
from mtl_unsup.clustering.settings import ClusterSettings
from mtl_unsup.clustering.sinkhorn import balanced_labels


def cluster_shares(counts: torch.Tensor, marginals: str, min_size: float) -> torch.Tensor | None:
    """Wanted share of each cluster: equal (``uniform``), the k-means sizes raised to at least
    ``min_size`` of the mean size (``min_size``), or None (``none``: no constraint)."""
    k = len(counts)
    if marginals == "uniform":
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    if marginals == "none":
        return None
    shares = counts.double() / counts.sum()
    floor = min_size / k
    low = torch.zeros(k, dtype=torch.bool)
    for _ in range(k):  # raise the small ones to the floor, shrink the rest to make room
        low |= shares < floor - 1e-12
        rest = shares[~low].sum()
        if rest <= 0:
            break
        shares = torch.where(low, torch.full_like(shares, floor),
                             shares * (1 - floor * int(low.sum())) / rest)
        if not (shares[~low] < floor - 1e-12).any():
            break
    return shares / shares.sum()


def balanced_state(state: ClusterState, x: torch.Tensor, settings: ClusterSettings) -> ClusterState:
    """``state`` with its labels replaced by the Sinkhorn assignment of ``x`` to its centroids."""
    shares = cluster_shares(torch.bincount(state.labels, minlength=state.k), settings.marginals,
                            settings.min_size)
    if shares is None:
        return state
    scores = -torch.cdist(x, state.centroids).pow(2)
    labels = balanced_labels(scores, settings.sinkhorn_epsilon, cluster_shares=shares)
    return dataclasses.replace(state, labels=labels)


@dataclass
class RefreshContext:
    """The training set's features at one refresh, and what tasks derive from them (cached).

    Attributes:
        features: ``(N, D)`` backbone features of every training image, by dataset index.
        epoch: the epoch the refresh is for.
        seed: the run's seed (offset by the epoch for k-means).
        settings: the ``cluster`` group.
        fingerprint: of the training image list (stored with every state).
        previous: k -> the last labels at that k, for k-means' warm start.
        k: the run's number of clusters at this refresh (``cluster.k``, or the one
            :meth:`choose_k` picked).
    """

    features: torch.Tensor
    epoch: int
    seed: int
    settings: ClusterSettings
    fingerprint: str = ""
    previous: dict[int, torch.Tensor] = field(default_factory=dict)
    k: int = 0
    _space: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    _kmeans: dict[int, ClusterState] = field(default_factory=dict)
    _assigned: dict[int, ClusterState] = field(default_factory=dict)
    _neighbours: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def space(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The features PCA-whitened and L2-normalised, with the fitted mean and projection."""
        if self._space is None:
            self._space = whiten(self.features, self.settings.pca_dim)
        return self._space

    def kmeans(self, k: int) -> ClusterState:
        """k-means with ``k`` clusters in the whitened space (warm-started from ``previous``)."""
        if k not in self._kmeans:
            s = self.settings
            init = self.previous.get(k) if s.warm_start else None
            state = cluster_whitened(*self.space, k, s.niter, s.nredo, seed=self.seed + self.epoch,
                                     epoch=self.epoch, init_labels=init)
            self._kmeans[k] = dataclasses.replace(state, fingerprint=self.fingerprint)
        return self._kmeans[k]

    def choose_k(self) -> dict[int, float]:
        """Pick the run's k in ``settings.k_range`` by ``settings.k_criterion``; sets :attr:`k`
        and returns the criterion of each k tried (label-free).

        Each k is clustered as training clusters (:meth:`kmeans`, whitened space); the criterion
        is measured on the centred, L2-normalised features, where the whitening's amplified
        low-variance directions do not blur the clusters' separation. ``silhouette`` and
        ``calinski_harabasz`` are maximised, ``davies_bouldin`` minimised.
        """
        from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score

        from mtl_unsup.metrics import silhouette

        lo, hi = self.settings.k_range
        space = torch.nn.functional.normalize(self.features - self.features.mean(0), dim=1)
        scores = {}
        for k in range(lo, min(hi, len(space) - 1) + 1):
            labels = self.kmeans(k).labels
            if self.settings.k_criterion == "silhouette":
                scores[k] = silhouette(space, labels, seed=self.seed)
            elif self.settings.k_criterion == "calinski_harabasz":
                scores[k] = float(calinski_harabasz_score(space.numpy(), labels.numpy()))
            else:
                scores[k] = -float(davies_bouldin_score(space.numpy(), labels.numpy()))
        self.k = max(scores, key=lambda k: (scores[k], -k))  # a tie goes to the smaller k
        if self.settings.k_criterion == "davies_bouldin":
            scores = {k: -v for k, v in scores.items()}
        return scores

    def pseudo_labels(self, k: int) -> ClusterState:
        """The training targets at ``k``: k-means' labels, or its centroids' balanced
        (Sinkhorn-Knopp) assignment when ``cluster.assign=sinkhorn``."""
        if k not in self._assigned:
            state = self.kmeans(k)
            if self.settings.assign == "sinkhorn":
                state = balanced_state(state, self.space[0], self.settings)
            self._assigned[k] = state
        return self._assigned[k]

    def argmax(self, logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``logits(features).argmax(1)`` for every training image, by dataset index (a head's
        clusters)."""
        return logits(self.features).argmax(1).cpu()

    def neighbours(self, num: int) -> torch.Tensor:
        """``(N, num)`` dataset indices of each image's nearest others in the whitened space."""
        if num not in self._neighbours:
            self._neighbours[num] = nearest_neighbours(self.space[0], num)
        return self._neighbours[num]


def nearest_neighbours(x: torch.Tensor, num: int) -> torch.Tensor:
    """``(N, num)`` indices of each row's ``num`` nearest other rows by inner product (FAISS,
    exact): cosine similarity for L2-normalised rows."""
    if not 1 <= num < len(x):
        raise ValueError(f"{num} neighbours need more than {num} training images, there are {len(x)}")
    data = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    index = faiss.IndexFlatIP(data.shape[1])
    index.add(data)
    _, found = index.search(data, num + 1)
    found = torch.from_numpy(found.astype(np.int64))
    rows = torch.arange(len(x)).unsqueeze(1)
    is_self = found == rows
    # drop the image itself (or, among exact duplicates, the last found)
    drop = torch.where(is_self.any(1), is_self.float().argmax(1), torch.full((len(x),), num))
    keep = torch.ones_like(found, dtype=torch.bool)
    keep[torch.arange(len(x)), drop] = False
    return found[keep].view(len(x), num)
