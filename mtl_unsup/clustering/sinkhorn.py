"""Balanced cluster assignment by Sinkhorn-Knopp (SeLa, Asano et al., 2020; SwAV, Caron et al., 2020).

k-means may leave a few clusters huge and others tiny; the self-labelling recipe instead asks for
the assignment of ``n`` images to ``k`` clusters that agrees best with the model's scores *and*
gives each cluster a prescribed share of the images, an optimal-transport problem that a few
rounds of Sinkhorn-Knopp matrix scaling solve approximately.
"""

from __future__ import annotations

import torch


def sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 50,
             cluster_shares: torch.Tensor | None = None) -> torch.Tensor:
    """The soft assignment ``Q`` (rows sum to 1) closest to ``softmax(scores / epsilon)`` whose
    column sums are ``n * cluster_shares`` (uniform when None).

    Args:
        scores: ``(n, k)`` logits or similarities of each image to each cluster.
        epsilon: entropic regularisation; smaller is closer to a hard assignment.
        iterations: scaling rounds (alternately matching cluster shares and image rows).
        cluster_shares: ``(k,)`` wanted share of each cluster, summing to 1.
    """
    if scores.ndim != 2:
        raise ValueError(f"sinkhorn needs (n, k) scores, got shape {tuple(scores.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"sinkhorn needs epsilon > 0 and iterations >= 1, got {epsilon}, {iterations}")
    n, k = scores.shape
    shares = torch.full((k,), 1.0 / k, dtype=torch.float64, device=scores.device)
    if cluster_shares is not None:
        shares = cluster_shares.to(shares)
        if shares.shape != (k,) or (shares < 0).any() or abs(float(shares.sum()) - 1) > 1e-6:
            raise ValueError("cluster_shares must be k non-negative numbers summing to 1")
    # log domain: exp(scores / epsilon) overflows for confident scores
    log_q = scores.double() / epsilon
    log_shares = shares.clamp(min=1e-300).log()
    for _ in range(iterations):
        log_q = log_q - torch.logsumexp(log_q, dim=0, keepdim=True) + log_shares + torch.log(
            torch.tensor(float(n), dtype=torch.float64))  # column sums -> n * shares
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)  # row sums -> 1
    return log_q.exp().to(scores.dtype)


def capacities(n: int, shares: torch.Tensor) -> torch.Tensor:
    """Integer cluster sizes summing to ``n`` as close to ``n * shares`` as can be (largest remainders)."""
    exact = shares.double() * n
    sizes = exact.floor().long()
    short = n - int(sizes.sum())
    if short > 0:
        sizes[torch.argsort(exact - sizes, descending=True)[:short]] += 1
    return sizes


def round_with_capacities(q: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Hard labels from a soft assignment ``q`` that fill each cluster to exactly ``sizes``.

    In each round every unassigned row proposes its likeliest cluster with room left, and each
    cluster takes its most likely proposers up to its room; a round fills a cluster or places
    every row, so there are at most k rounds. (The argmax of ``q`` alone may miss the sizes
    by far when the scores favour a few clusters strongly.)
    """
    n, k = q.shape
    if int(sizes.sum()) != n or (sizes < 0).any():
        raise ValueError(f"cluster sizes {sizes.tolist()} must be >= 0 and sum to the {n} rows")
    labels = torch.full((n,), -1, dtype=torch.long)
    room = sizes.clone()
    q = q.detach().cpu().double()
    while (labels < 0).any():
        free = (labels < 0).nonzero().squeeze(1)
        offer = q[free].masked_fill((room <= 0).unsqueeze(0), float("-inf"))
        value, choice = offer.max(dim=1)
        for c in choice.unique().tolist():
            mine = choice == c
            ranked = free[mine][torch.argsort(value[mine], descending=True)]
            taken = ranked[: int(room[c])]
            labels[taken] = c
            room[c] -= len(taken)
    return labels


def balanced_labels(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 50,
                    cluster_shares: torch.Tensor | None = None, exact: bool = True) -> torch.Tensor:
    """Hard labels of the Sinkhorn assignment: with ``exact``, clusters of exactly the wanted
    sizes (:func:`round_with_capacities`); otherwise each image's most likely cluster."""
    q = sinkhorn(scores, epsilon, iterations, cluster_shares)
    if not exact:
        return q.argmax(dim=1)
    n, k = scores.shape
    shares = torch.full((k,), 1.0 / k, dtype=torch.float64) if cluster_shares is None else cluster_shares
    return round_with_capacities(q, capacities(n, shares.cpu()))
