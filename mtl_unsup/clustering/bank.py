"""A memory bank of the training pass's features (DeepCluster-v2), for refreshes without an extra
pass over the training set (``cluster.features=bank``).

Each training step writes the backbone features it computed for its batch (the first view a task
encoded) into the row of each image's dataset index, with the step that wrote it. A refresh then
reads the bank instead of embedding every training image again in eval mode: the rows come from
augmented views and from weights up to an epoch old, which is what DeepCluster-v2 trades for the
pass it saves. Until half the rows have been written (the first epoch), refreshes use the pass;
after, rows not written yet (images ``drop_last`` left out so far) are embedded alone.

Under DDP each rank writes the rows of its shard; :meth:`FeatureBank.gather` keeps, for every
row, the most recent write of any rank (a row written by two ranks at the same step, which
``DistributedSampler``'s padding can do, is their mean), and every rank keeps the merged rows.
The bank is saved in the checkpoint, so a resumed single-process run refreshes from the same rows
as an uninterrupted one; under DDP the checkpoint holds rank 0's bank, whose rows of the other
ranks date from the last refresh.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mtl_unsup.distributed import world


class FeatureBank(nn.Module):
    """``rows`` x ``dim`` features and the step each row was written (-1: never)."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.register_buffer("features", torch.zeros(rows, dim), persistent=False)
        self.register_buffer("written", torch.full((rows,), -1, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def remember(self, index: torch.Tensor, features: torch.Tensor, step: int) -> None:
        self.features[index] = features.detach().float()
        self.written[index] = step

    @torch.no_grad()
    def gather(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's latest rows, on the CPU, and which rows have been written."""
        written, features = self.written.clone(), self.features
        if world()[1] > 1:  # a collective: every rank calls it
            dist.all_reduce(written, op=dist.ReduceOp.MAX)
            mine = ((self.written == written) & (written >= 0)).float()
            features = features * mine[:, None]
            dist.all_reduce(features)
            dist.all_reduce(mine)
            features = features / mine.clamp(min=1)[:, None]
            self.features.copy_(features)  # every rank now holds the merged rows (for checkpoints)
            self.written.copy_(written)
        return features.cpu(), (written >= 0).cpu()

    @torch.no_grad()
    def clear(self) -> None:
        """Forget every row (a new stage trains another model: its features start afresh)."""
        self.written.fill_(-1)

    def checkpoint_state(self) -> dict[str, Any]:
        return {"features": self.features.cpu().clone(), "written": self.written.cpu().clone()}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        if state["features"].shape != self.features.shape:
            return  # another data set or model: the bank fills again from this run's steps
        self.features.copy_(state["features"])
        self.written.copy_(state["written"])
