"""Gathering tensors across ranks: uneven row counts, and with gradients for contrastive losses.

Both are no-ops in a single process, so callers need no special case.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def collective_device() -> torch.device:
    """Where tensors must be for a collective: the current GPU under NCCL, else the CPU."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@torch.no_grad()
def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` (the counts may differ), concatenated in rank order.

    A collective: every rank must call it, whatever its data. The result is on ``x``'s device
    (the rows travel through the GPU under NCCL).
    """
    _, size = world()
    if size == 1:
        return x
    home, x = x.device, x.to(collective_device()).contiguous()
    count = torch.tensor([len(x)], device=x.device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    longest = int(max(c.item() for c in counts))
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: len(x)] = x
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(c.item())] for part, c in zip(parts, counts, strict=True)]).to(home)


class _GatherWithGrad(torch.autograd.Function):
    """All-gather whose backward hands each rank the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return tuple(parts)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        stacked = torch.stack(grads)
        dist.all_reduce(stacked)  # every rank's loss may depend on every rank's rows
        return stacked[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``x`` (same shape on all ranks), differentiable with respect to the own one."""
    if world()[1] == 1:
        return [x]
    return list(_GatherWithGrad.apply(x))


@torch.no_grad()
def sum_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` summed over ranks, on ``x``'s device (a collective: every rank must call it); ``x``
    alone in one process."""
    if world()[1] == 1:
        return x
    y = x.to(collective_device(), copy=True)
    dist.all_reduce(y)
    return y.to(x.device)


@torch.no_grad()
def mean_over_ranks(x: torch.Tensor) -> torch.Tensor:
    """``x`` averaged over ranks (a collective: every rank must call it); ``x`` alone in one process."""
    return sum_over_ranks(x) / world()[1]
