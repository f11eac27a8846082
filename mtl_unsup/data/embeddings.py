"""The embedding cache: a frozen backbone's features of every image, computed once.

With ``backbone.freeze=true`` the backbone's output for an image never changes, so it is computed
once per split, in eval mode, and kept as float16 in
``<paths.cache_dir>/embeddings/<key>/<split>-<images>.npy``, where the key digests the backbone
(its config and weights), the input settings and the augmented copies asked for, and ``<images>``
the split's image list. Training, every refresh and evaluation then read rows of
features instead of decoding images: the heads train in seconds.

A split's array is ``(N, slots, D)``: slot 0 the plain image's features, then
``data.embedding_copies`` augmented copies for each view (``data.augmentations``) in order. A view
of a batch picks one of its copies at random for each image (:class:`PickCopy`); with no copies
every view is the plain features.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mtl_unsup.atomic import write_with
from mtl_unsup.run_lock import entry_lock

log = logging.getLogger(__name__)


def unreadable(path: Path) -> str | None:
    """Why the cached array at ``path`` cannot be used (cut short, not an array); None if it can."""
    try:
        np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as err:
        return f"{path.stat().st_size:,} bytes: {err}"
    return None


def state_digest(module: nn.Module) -> str:
    """Digest of a module's weights and buffers (which weights made the cached features)."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class PickCopy(nn.Module):
    """The feature-side view: for each image, one of the cached ``slots`` at random."""

    def __init__(self, slots: Sequence[int]) -> None:
        super().__init__()
        self.slots = list(slots)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        slots = torch.tensor(self.slots, device=rows.device)
        pick = slots[torch.randint(len(self.slots), (len(rows),), device=rows.device)]
        return rows[torch.arange(len(rows), device=rows.device), pick]


class EmbeddingDataset(Dataset):
    """Items of cached features, shaped like image items: ``image`` is ``(slots, D)`` float32."""

    def __init__(self, features: np.ndarray, labels: Sequence[int]) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.features)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.features[indices.cpu().numpy()], dtype=np.float32))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"index": index, "label": self.labels[index],
                "image": torch.from_numpy(np.asarray(self.features[index], dtype=np.float32))}

    def __getitems__(self, indices: list[int]) -> dict[str, Any]:
        """A whole batch in one slice (the loader calls this instead of one item at a time)."""
        index = torch.tensor(indices, dtype=torch.long)
        return {"index": index, "label": torch.tensor([self.labels[i] for i in indices], dtype=torch.long),
                "image": self.rows(index)}

    @staticmethod
    def collate(batch: dict[str, Any]) -> dict[str, Any]:
        """The loader's ``collate_fn``: :meth:`__getitems__` gives the batch already made."""
        return batch


class EmbeddingCache:
    """Where a run's cached features live and how they are made.

    Args:
        backbone: the frozen backbone.
        mean, std: per-channel normalisation of plain [0, 1] images (``data.mean``/``std``).
        augmentations: view name -> batched augmentation, for the copies.
        copies: augmented copies per view of each training image (0: plain features only).
        cache_dir: ``paths.cache_dir``.
        identity: what else decides the features (backbone config, input settings), digested
            into the key with the weights.
        seed: the copies' augmentations draw from it.
    """

    def __init__(self, backbone: nn.Module, mean: Sequence[float], std: Sequence[float],
                 augmentations: dict[str, nn.Module], copies: int, cache_dir: str | Path,
                 identity: dict[str, Any], seed: int = 0) -> None:
        self.backbone = backbone
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.augmentations, self.copies, self.seed = dict(augmentations), copies, seed
        self.identity = {**identity, "mean": list(mean), "std": list(std), "copies": copies,
                         "views": sorted(self.augmentations), "seed": seed}
        self.root = Path(cache_dir).expanduser() / "embeddings"
        self._weights: str | None = None

    def views(self) -> dict[str, PickCopy]:
        """Each view's feature-side augmentation."""
        names = sorted(self.augmentations)
        return {name: PickCopy([1 + i * self.copies + c for c in range(self.copies)] if self.copies else [0])
                for i, name in enumerate(names)}

    def path(self, split: str, fingerprint: str) -> Path:
        if self._weights is None:
            self._weights = state_digest(self.backbone)
        key = json.dumps({**self.identity, "weights": self._weights}, sort_keys=True, default=str)
        # one folder per backbone and settings; a file per split and image list
        return self.root / hashlib.sha256(key.encode()).hexdigest()[:20] / f"{split}-{fingerprint[:16]}.npy"

    @torch.no_grad()
    def compute(self, loader: DataLoader, train: bool) -> np.ndarray:
        """``(N, slots, D)`` float16 features of the loader's images (plain, then each view's
        copies for the training split), in eval mode on the backbone's device."""
        device = next(self.backbone.parameters()).device
        was_training = self.backbone.training
        self.backbone.eval()
        names = sorted(self.augmentations) if train and self.copies else []
        mean, std = self.mean.to(device), self.std.to(device)

        def embed(x: torch.Tensor) -> torch.Tensor:
            return self.backbone((x - mean) / std).float()

        out = []
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self.seed)
            for batch in loader:
                images = batch["image"].to(device)
                slots = [embed(images)]
                for name in names:
                    augment = self.augmentations[name].to(device)
                    slots += [embed(augment(images)) for _ in range(self.copies)]
                out.append(torch.stack(slots, 1).half().cpu())
        self.backbone.train(was_training)
        return torch.cat(out).numpy()

    def load_or_compute(self, split: str, fingerprint: str, loader: Callable[[], DataLoader],
                        barrier: Callable[[], None] = lambda: None, is_main: bool = True) -> np.ndarray:
        """The split's features, from the cache when there, else computed by the main process and
        written (atomically) for every process and every later run to read."""
        path = self.path(split, fingerprint)
        if is_main:
            with entry_lock(path):  # jobs sharing the cache compute an entry once
                problem = unreadable(path) if path.is_file() else None
                if problem is not None:
                    log.warning("The cached features %s are damaged (%s): computing them again.", path,
                                problem)
                if not path.is_file() or problem is not None:
                    log.info("Embedding the %s images with the frozen backbone (once: cached for later runs)",
                             split)
                    features = self.compute(loader(), train=split == "train")

                    def save(partial: Path) -> None:
                        with open(partial, "wb") as f:  # np.save would add .npy to the name
                            np.save(f, features)

                    write_with(path, save)
                    log.info("Cached the %s features of %d images (%s, %.0f MB) in %s", split, len(features),
                             "x".join(map(str, features.shape[1:])), features.nbytes / 2**20, path.parent)
        barrier()
        return np.load(path, mmap_mode="r")
