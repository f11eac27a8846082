"""k-means over features sharded across ranks: no process holds more than its own rows.

Each rank passes the features of its own training images (float16 or float32, any order) with
their dataset indices; every image belongs to exactly one rank.

1. **PCA on a sample.** A seeded sample of at most ``sample`` dataset indices, the same whatever
   the number of ranks, is gathered from the ranks that hold those rows; the whitening is fitted
   on it (covariance accumulated in float64, chunk by chunk) and each rank projects its own rows,
   chunk by chunk, into the whitened, L2-normalised space (float32, ``pca_dim`` columns).
2. **Lloyd's iterations.** The centroids start from FAISS k-means on the (whitened) sample, the
   same on every rank. Each rank assigns its rows to the nearest centroid and sums them per
   cluster (float64); the sums, counts and objective are all-reduced, so every rank computes the
   same new centroids. An empty cluster takes half of the largest, as FAISS does.
3. **Labels scattered back by dataset index.** The ``(index, label)`` pairs are gathered (16
   bytes a row), so every rank holds all N labels, as training on any image needs.

Per-rank memory is the shard plus its whitened copy plus the sample, so it falls with the number
of ranks; one process gives the same labels as several (the sample and the initial centroids do
not depend on the sharding, and the sums differ only in float64 rounding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import faiss
import numpy as np
import torch

from mtl_unsup.clustering.kmeans import ClusterState, run_kmeans, whitening_projection
from mtl_unsup.clustering.refresh import ClusterSettings
from mtl_unsup.distributed import gather_rows, sum_over_ranks


def sample_indices(num_rows: int, sample: int, seed: int) -> torch.Tensor:
    """Sorted dataset indices of the PCA sample: all rows, or a seeded draw of ``sample`` of them."""
    if sample <= 0 or sample >= num_rows:
        return torch.arange(num_rows)
    order = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed))
    return order[:sample].sort().values


def gather_sample(shard: torch.Tensor, index: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """The rows of ``wanted`` (sorted dataset indices), gathered from the ranks that hold them,
    in the shard's type (float16 halves what is sent) and the order of ``wanted``; every rank
    gets them (a collective)."""
    mask = torch.isin(index, wanted)
    rows = gather_rows(shard[mask])
    where = gather_rows(index[mask])
    if bool((where[1:] < where[:-1]).any()):
        rows = rows[where.argsort()]
    return rows


def fit_whitening(sample: torch.Tensor, dim: int | None, chunk: int = 8192,
                  eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and ``(D, d)`` whitening projection of ``sample`` (see
    :func:`~mtl_unsup.clustering.kmeans.fit_pca_whitening`), its covariance summed in float64
    chunk by chunk so that no float64 copy of the sample is made."""
    n, full = sample.shape
    mean = torch.zeros(full, dtype=torch.float64)
    for part in sample.split(chunk):
        mean += part.double().sum(0)
    mean /= n
    if not dim:
        return mean.float(), torch.eye(full)
    cov = torch.zeros(full, full, dtype=torch.float64)
    for part in sample.split(chunk):
        centred = part.double() - mean
        cov += centred.t() @ centred
    cov /= max(n - 1, 1)
    return mean.float(), whitening_projection(cov, max(1, min(dim, full, n - 1)), eps)


def project(x: torch.Tensor, mean: torch.Tensor, proj: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    """Rows of ``x`` (any float type) whitened and L2-normalised, as float32, chunk by chunk (a
    chunk's float32 copies are the only memory beyond the result)."""
    out = torch.empty(len(x), proj.shape[1])
    for lo in range(0, len(x), chunk):
        part = (x[lo : lo + chunk].float() - mean) @ proj
        out[lo : lo + chunk] = torch.nn.functional.normalize(part, dim=1)
    return out


Assignment = tuple[torch.Tensor, torch.Tensor]


def _assign(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> Assignment:
    """Nearest centroid of each row of ``x`` and the squared distance to it (float64, CPU):
    FAISS on CPU rows, chunked matrix products on the device where ``x`` lives (a GPU)."""
    if x.device.type == "cpu":
        index = faiss.IndexFlatL2(centroids.shape[1])
        index.add(np.ascontiguousarray(centroids.numpy(), dtype=np.float32))
        dist2, labels = index.search(np.ascontiguousarray(x.numpy(), dtype=np.float32), 1)
        return (torch.from_numpy(labels[:, 0].astype(np.int64)),
                torch.from_numpy(dist2[:, 0].astype(np.float64)))
    return assign_matmul(x, centroids, chunk)


def assign_matmul(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 65536) -> Assignment:
    """:func:`_assign` by chunked matrix products on ``x``'s device."""
    c = centroids.to(x.device)
    labels, dist2 = [], []
    for part in x.split(chunk):
        d = (part.pow(2).sum(1, keepdim=True) - 2 * part @ c.t() + c.pow(2).sum(1)).clamp(min=0)
        best, label = d.min(1)
        labels.append(label.cpu())
        dist2.append(best.double().cpu())
    return torch.cat(labels), torch.cat(dist2)


def _split_empty(centroids: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Each empty cluster takes a copy of the largest one, both nudged apart (FAISS' rule)."""
    centroids, counts = centroids.clone(), counts.clone()
    for empty in torch.nonzero(counts == 0).squeeze(1).tolist():
        big = int(counts.argmax())
        nudge = 1e-3 * torch.where(torch.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
        centroids[empty] = centroids[big] * (1 + nudge)
        centroids[big] = centroids[big] * (1 - nudge)
        counts[empty] = counts[big] // 2
        counts[big] -= counts[empty]
    return centroids


def lloyd(x: torch.Tensor, init: torch.Tensor, niter: int,
          chunk: int = 65536) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``niter`` Lloyd iterations over the rows of every rank from centroids ``init`` (the same on
    every rank); returns this rank's labels, the centroids and the global objective."""
    k = len(init)
    centroids = init.float()
    for _ in range(niter):
        labels, _ = _assign(x, centroids)
        sums = torch.zeros(k, x.shape[1], dtype=torch.float64, device=x.device)
        for lo in range(0, len(x), chunk):
            sums.index_add_(0, labels[lo : lo + chunk].to(x.device), x[lo : lo + chunk].double())
        sums = sums.cpu()
        counts = sum_over_ranks(torch.bincount(labels, minlength=k).double())
        sums = sum_over_ranks(sums)
        moved = (sums / counts.clamp(min=1).unsqueeze(1)).float()
        centroids = _split_empty(torch.where(counts.unsqueeze(1) > 0, moved, centroids), counts)
    labels, dist2 = _assign(x, centroids)
    objective = float(sum_over_ranks(dist2.sum().reshape(1))[0])
    return labels, centroids, objective


@torch.no_grad()
def sharded_kmeans(
    shard: torch.Tensor, index: torch.Tensor, num_rows: int, k: int, pca_dim: int | None = 32,
    niter: int = 20, nredo: int = 1, seed: int = 0, epoch: int = 0, sample: int = 100_000,
    device: str | torch.device = "cpu",
) -> ClusterState:
    """PCA-whiten, L2-normalise and k-means rows held across ranks (a collective: every rank
    calls it with its own rows); every rank gets the same :class:`ClusterState`, labels by
    dataset index for all ``num_rows`` rows.

    Args:
        shard: ``(n_rank, D)`` this rank's features, any float type (float16 halves the memory).
        index: ``(n_rank,)`` their dataset indices; together the ranks hold each of
            ``0 .. num_rows - 1`` exactly once.
        sample: rows the whitening and the initial centroids are fitted on (at least 50 per
            cluster; all when there are fewer, or when 0).
        nredo: starts (k-means on the sample with different seeds); the lowest objective wins.
        device: where Lloyd's iterations run: the CPU (FAISS), or the rank's GPU, which then
            holds the whitened rows (``n_rank x pca_dim`` float32).
    """
    if not 2 <= k <= num_rows:
        raise ValueError(f"k-means needs 2 <= k <= number of points, got k={k} for {num_rows} points")
    index = index.long().cpu()
    held = torch.zeros(num_rows, dtype=torch.bool)
    held[gather_rows(index)] = True
    if not bool(held.all()) or int(sum_over_ranks(torch.tensor([len(index)]))[0]) != num_rows:
        raise ValueError(f"every dataset index 0..{num_rows - 1} must be held by exactly one rank")
    if sample > 0:  # the initial k-means wants some 50 rows per cluster
        sample = max(sample, 50 * k)
    picked = gather_sample(shard, index, sample_indices(num_rows, sample, seed))
    mean, proj = fit_whitening(picked, pca_dim)
    picked = project(picked, mean, proj)
    x = project(shard, mean, proj).to(device)
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for start in range(max(1, nredo)):
        # on the CPU, the same on every rank (a GPU k-means on each rank would crowd one device)
        _, init, _ = run_kmeans(picked, k, niter=niter, seed=seed + epoch + start, gpu=False)
        found = lloyd(x, init, niter)
        if best is None or found[2] < best[2]:
            best = found
    assert best is not None
    labels, centroids, _ = best
    centroids = centroids.cpu()
    everyone = torch.empty(num_rows, dtype=torch.long)
    everyone[gather_rows(index)] = gather_rows(labels)
    return ClusterState(everyone, centroids, mean, proj, epoch)


@dataclass
class ShardedContext:
    """What :class:`~mtl_unsup.clustering.refresh.RefreshContext` offers the k-means tasks, with
    each rank holding only its own rows (``cluster.sharded=true``). Its methods are collectives:
    every rank runs the same tasks' ``refresh``/``finish``, in the same order, and gets the same
    results. Nearest neighbours, a balanced assignment and the choice of k need every row on one
    rank, so tasks that ask for them are refused before training (see
    :func:`check_sharded_tasks`)."""

    shard: torch.Tensor
    index: torch.Tensor
    num_rows: int
    epoch: int
    seed: int
    settings: ClusterSettings
    fingerprint: str = ""
    k: int = 0
    device: str | torch.device = "cpu"
    _kmeans: dict[int, ClusterState] = field(default_factory=dict)

    def kmeans(self, k: int) -> ClusterState:
        if k not in self._kmeans:
            s = self.settings
            state = sharded_kmeans(self.shard, self.index, self.num_rows, k, s.pca_dim, s.niter, s.nredo,
                                   seed=self.seed, epoch=self.epoch, sample=s.pca_sample,
                                   device=self.device)
            state.fingerprint = self.fingerprint
            self._kmeans[k] = state
        return self._kmeans[k]

    def pseudo_labels(self, k: int) -> ClusterState:
        return self.kmeans(k)

    def argmax(self, logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``logits(features).argmax(1)`` of every training image, by dataset index: each rank
        computes its rows', then the labels are gathered."""
        mine = torch.cat([logits(part.float()).argmax(1).cpu() for part in self.shard.split(65536)])
        everyone = torch.empty(self.num_rows, dtype=torch.long)
        everyone[gather_rows(self.index)] = gather_rows(mine)
        return everyone


def check_sharded_tasks(tasks: dict[str, Any]) -> None:
    """Refuse, naming them, the tasks whose targets need every row on one rank."""
    from mtl_unsup.config import ConfigValueError

    for name, task in tasks.items():
        if task.refreshes and task.needs_all_rows:
            raise ConfigValueError(
                f"cluster.sharded=true clusters with k-means only, but task {name} needs "
                f"{task.needs_all_rows}: drop it from task=[...] or set cluster.sharded=false.")
