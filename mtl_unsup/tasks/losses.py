"""Losses and batch operations as pure functions, one test each."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mtl_unsup.distributed import gather_with_grad, world


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5,
            gather: bool = False) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., 2020).

    ``z1[i]`` and ``z2[i]`` are two views of image ``i``; every other embedding in the batch is a
    negative. Returns the mean over the ``2B`` anchors. With ``gather`` (under
    ``torch.distributed``) the negatives are the embeddings of every rank's batch, gathered with
    their gradients, as SimCLR does across its devices: the ranks' mean loss equals the loss of
    one process holding the whole batch.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent needs two (B, D) tensors of one shape, got {z1.shape}, {z2.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    b = z1.shape[0]
    local = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    rank, size = world() if gather else (0, 1)
    if size == 1:
        candidates = local
    else:  # every rank's [z1; z2], autograd-aware, laid out as [all z1; all z2]
        parts = gather_with_grad(local)
        candidates = torch.cat([p[:b] for p in parts] + [p[b:] for p in parts])
    sim = local @ candidates.t() / temperature
    own = torch.cat([torch.arange(b), torch.arange(b)]) + rank * b
    own[b:] += size * b  # anchor i of z2 sits in the second half of the candidates
    partner = torch.cat([own[b:], own[:b]])
    sim[torch.arange(2 * b), own] = float("-inf")  # an embedding is not its own negative
    return F.cross_entropy(sim, partner.to(sim.device))


def rotate_batch(x: torch.Tensor, quarter_turns: torch.Tensor) -> torch.Tensor:
    """Rotate each image ``x[i]`` by ``quarter_turns[i]`` x 90 degrees counter-clockwise."""
    out = torch.empty_like(x)
    for k in range(4):
        mask = quarter_turns == k
        if mask.any():
            out[mask] = torch.rot90(x[mask], k, dims=(2, 3))
    return out


def balanced_class_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Inverse-size weights, mean 1 over the points: each cluster counts the same in the loss."""
    counts = torch.bincount(labels, minlength=num_classes).float()
    weights = torch.where(counts > 0, len(labels) / (num_classes * counts.clamp(min=1)), 0.0)
    return weights
