"""Losses and batch operations as pure functions, one test each."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., 2020).

    ``z1[i]`` and ``z2[i]`` are two views of image ``i``; every other embedding in the batch is a
    negative. Returns the mean over the ``2B`` anchors.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"nt_xent needs two (B, D) tensors of one shape, got {z1.shape}, {z2.shape}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    b = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    return F.cross_entropy(sim, target)


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
