"""What every data module shares: splits served by index through the same loaders.

A subclass holds ``splits`` (split name -> a list with ``len``, ``labels``, ``has_labels`` and
``classes``) and builds each split's dataset in :meth:`SplitDataModule._dataset`; the items are
``{"index", "label", "image"}``, where ``image`` is an image or a row of features. Training is
shuffled by (seed, epoch), sharded across ranks and resumable mid-epoch; the clustering pass and
evaluation read the splits in order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from mtl_unsup.data.resumable import ResumableDataLoader, ResumableSampler


def seeded_split(n: int, fractions: Sequence[float], seed: int) -> list[list[int]]:
    """Cut ``range(n)`` into len(fractions)+1 random parts; the first takes what is left."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    sizes = [int(round(f * n)) for f in fractions]
    parts, start = [], n - sum(sizes)
    parts.append(sorted(order[:start]))
    for size in sizes:
        parts.append(sorted(order[start : start + size]))
        start += size
    return parts


def limited(n: int, limit: int | None, seed: int) -> list[int]:
    """Positions ``0 .. n-1``, or a seeded sample of ``limit`` of them (sorted) when there are more
    (``data.limit``: small debug runs on a large folder)."""
    if limit is None or n <= limit:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist())


def loader_workers(num_workers: int | str, processes: int = 1) -> int:
    """``data.num_workers``: a number, or ``auto``: one per core but one, at most 8, shared by
    ``processes`` (the ranks of a node)."""
    if num_workers != "auto":
        return int(num_workers)
    return max(1, min(8, (available_cores() - 1) // max(1, processes)))


def available_cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def check_limit(limit: int | None) -> None:
    """``data.limit``: null, or at least 2 items per split."""
    if limit is not None and limit < 2:
        from mtl_unsup.data.images import DataError

        raise DataError(f"data.limit={limit}: at least 2 items per split, or null for all.")


class SplitDataModule(L.LightningDataModule):
    """The loaders of a data module with ``train`` (and optionally ``val``/``test``) splits."""

    splits: dict[str, Any]
    batch_size: int
    eval_batch_size: int
    num_workers: int
    pin_memory: bool
    drop_last: bool
    split_seed: int
    shuffle_seed: int | None  # the run's seed, set by the training script

    def _dataset(self, split: str) -> Dataset:
        raise NotImplementedError

    @property
    def num_train(self) -> int:
        return len(self.splits["train"])

    @property
    def has_labels(self) -> bool:
        return self.splits["train"].has_labels

    @property
    def num_classes(self) -> int:
        return len(self.splits["train"].classes)

    def train_labels(self) -> torch.Tensor:
        """Ground truth of the training set, for logging clustering quality only."""
        return torch.tensor(self.splits["train"].labels, dtype=torch.long)

    def eval_splits(self) -> list[str]:
        """Splits evaluated after training: held-out test and validation (if any), then train."""
        return [s for s in ("test", "val", "train") if s in self.splits]

    def _workers(self, dataset: Dataset) -> int:
        """Loader processes: none for a decoded split or rows of features (a slice and a cast
        need no worker, and workers started by spawn would copy the whole array); for images
        read from disk ``num_workers``, where ``auto`` is one per core but one (at most 8),
        shared by the ranks of a node."""
        if getattr(dataset, "decoded", True) is not None:
            return 0
        return loader_workers(self.num_workers, self.processes_per_node)

    @property
    def processes_per_node(self) -> int:
        """The ranks on this machine, which share its cores and memory."""
        return max(1, int(getattr(self.trainer, "num_devices", 1) or 1)) if self.trainer else 1

    @property
    def _pin(self) -> bool:
        """``pin_memory``; ``auto``: when the trainer runs on a GPU."""
        if self.pin_memory != "auto":
            return bool(self.pin_memory)
        accelerator = getattr(self.trainer, "accelerator", None) if self.trainer else None
        return type(accelerator).__name__ == "CUDAAccelerator"

    def _eval_loader(self, dataset: Dataset, sampler: Any = None) -> DataLoader:
        workers = self._workers(dataset)
        return DataLoader(
            dataset, batch_size=self.eval_batch_size, shuffle=False, sampler=sampler,
            num_workers=workers, pin_memory=self._pin, persistent_workers=workers > 0,
            collate_fn=getattr(dataset, "collate", None),
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled by (seed, epoch) and sharded across ranks; resumable mid-epoch."""
        dataset = self._dataset("train")
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        drop_last = self.drop_last and len(dataset) > self.batch_size * world
        seed = self.split_seed if self.shuffle_seed is None else self.shuffle_seed
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                   drop_last=drop_last)
        workers = self._workers(dataset)
        return ResumableDataLoader(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last,
            num_workers=workers, pin_memory=self._pin, persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(sampler.seed),
            collate_fn=getattr(dataset, "collate_training", getattr(dataset, "collate", None)),
        )

    def val_dataloader(self) -> list[DataLoader] | DataLoader:
        if "val" not in self.splits:
            return []
        return self._eval_loader(self._dataset("val"))

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self._dataset(s)) for s in self.eval_splits()]

    def split_loader(self, split: str) -> DataLoader:
        """The split in order, unaugmented (for predictions and pictures)."""
        return self._eval_loader(self._dataset(split))

    def cluster_dataloader(self, world_size: int = 1, rank: int = 0, pad: bool = True) -> DataLoader:
        """Plain (no augmentation) pass over the training set, sharded across ranks: padded to
        equal shares (``DistributedSampler``, which repeats a few images), or, without ``pad``,
        each image on exactly one rank."""
        dataset = self._dataset("train")
        sampler: Any = None
        if world_size > 1 and not pad:
            sampler = range(rank, len(dataset), world_size)
        elif world_size > 1:
            sampler = DistributedSampler(dataset, world_size, rank, shuffle=False)
        return self._eval_loader(dataset, sampler=sampler)
