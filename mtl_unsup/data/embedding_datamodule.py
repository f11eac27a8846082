"""``data=embeddings``: cluster the rows of an embedding file instead of images.

The file (see :mod:`mtl_unsup.data.embedding_file`) is read and checked at setup and split into
train/val/test rows by a seeded random split, as a folder without split subfolders is. Items are
``(slots, D)`` rows shaped like the embedding cache's (:mod:`mtl_unsup.data.embeddings`), so every
clustering task, refresh and evaluation runs on them unchanged; the backbone is
:class:`~mtl_unsup.models.backbones.FeatureInput`, which the training script sizes to ``D``.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mtl_unsup.data.embedding_file import EmbeddingTable, read_embeddings
from mtl_unsup.data.embeddings import EmbeddingDataset, PickCopy
from mtl_unsup.data.images import DataError
from mtl_unsup.data.loaders import SplitDataModule, check_limit, limited, seeded_split

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowSplit:
    """Rows of the file that make one split (``rows`` index the file, in order)."""

    rows: np.ndarray
    paths: tuple[Path, ...] | None
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def has_labels(self) -> bool:
        return bool(self.classes)


class EmbeddingFileDataModule(SplitDataModule):
    """Rows of an embedding file as train/val/test splits; labels, if any, for evaluation only.

    Args:
        path: the ``.npz``, ``.npy`` or ``.parquet`` file.
        key, paths_key, labels_key: names of the embeddings, paths and labels in it (null: the
            usual names).
        paths_file: a text file with one path per row (for ``.npy``).
        image_root: folder that relative paths start from (null: the file's folder).
        labels: ``auto`` (the file's, else class subfolders of the paths), ``subfolders`` or
            ``none``.
        views: the names tasks ask views by; each view of a row is the row itself, or one of its
            augmented copies when the file holds ``(N, 1 + copies, D)``.
    """

    def __init__(
        self,
        path: str,
        key: str | None = None,
        paths_key: str | None = None,
        labels_key: str | None = None,
        paths_file: str | None = None,
        image_root: str | None = None,
        labels: str = "auto",
        views: Sequence[str] = ("weak", "strong"),
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 1024,
        eval_batch_size: int = 4096,
        drop_last: bool = True,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        check_limit(limit)
        self.limit = limit
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise DataError("data.val_fraction and data.test_fraction must lie in [0, 1), their sum below 1.")
        self.path = path
        self.read_args = {"key": key, "paths_key": paths_key, "labels_key": labels_key,
                          "paths_file": paths_file, "image_root": image_root, "labels": labels}
        self.view_names = list(views)
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.batch_size, self.eval_batch_size, self.drop_last = batch_size, eval_batch_size, drop_last
        self.num_workers, self.pin_memory = 0, False
        self.shuffle_seed: int | None = None
        self.mean, self.std = [0.0], [1.0]  # rows are used as they are
        self.table: EmbeddingTable | None = None
        self.splits: dict[str, RowSplit] = {}
        self.augmentations: dict[str, PickCopy] = {}
        self._datasets: dict[str, EmbeddingDataset] = {}
        self._fingerprint: str | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        table = self.table = read_embeddings(self.path, **self.read_args)
        n, slots = table.features.shape[:2]
        fractions = [self.val_fraction, self.test_fraction]
        for name, rows in zip(("train", "val", "test"), seeded_split(n, fractions, self.split_seed),
                              strict=True):
            if rows or name == "train":
                rows = np.asarray(rows, dtype=np.int64)[limited(len(rows), self.limit, self.split_seed)]
                self.splits[name] = RowSplit(
                    rows, None if table.paths is None else tuple(table.paths[i] for i in rows),
                    tuple(table.labels[i] for i in rows), table.classes)
        copies = list(range(1, slots)) or [0]
        self.augmentations = {name: PickCopy(copies) for name in self.view_names}
        log.info("Embeddings: %d rows of %d features%s from %s; %s", n, self.feature_dim,
                 f" ({slots - 1} augmented copies each)" if slots > 1 else "", self.describe(),
                 {k: len(v) for k, v in self.splits.items()})

    @property
    def feature_dim(self) -> int:
        if self.table is None:
            raise RuntimeError("setup() first")
        return int(self.table.features.shape[2])

    @property
    def fingerprint(self) -> str:
        """Digest of the training rows, which pseudo-labels are indexed by."""
        if self._fingerprint is None:  # the training rows as the loaders hold them: no second copy
            self._fingerprint = hashlib.sha256(memoryview(self._dataset("train").features)).hexdigest()
        return self._fingerprint

    def describe(self) -> str:
        return str(Path(self.path).expanduser())

    def _dataset(self, split: str) -> EmbeddingDataset:
        if split not in self._datasets:
            part = self.splits[split]
            features = np.ascontiguousarray(self.table.features[part.rows])
            self._datasets[split] = EmbeddingDataset(features, part.labels)
        return self._datasets[split]

    def train_images(self, indices: torch.Tensor) -> torch.Tensor:
        """Training rows by dataset index (for tasks that read other rows than the batch's)."""
        return self._dataset("train").rows(indices)
