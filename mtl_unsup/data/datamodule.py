"""LightningDataModule over folders of (unlabelled) images."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_unsup.data.cache import decode_images, use_memory_cache
from mtl_unsup.data.dataset import ImageDataset
from mtl_unsup.data.digits import write_digits_folder
from mtl_unsup.data.embeddings import EmbeddingCache, EmbeddingDataset
from mtl_unsup.data.images import DataError, ImageList, drop_bad_images, list_files, scan_folder
from mtl_unsup.data.loaders import SplitDataModule, check_limit, limited, seeded_split

log = logging.getLogger(__name__)

SPLIT_DIR_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}
BUILTINS = ("digits",)


def _find_split_dir(root: Path, split: str) -> Path | None:
    for name in SPLIT_DIR_NAMES[split]:
        if (root / name).is_dir():
            return root / name
    return None


class GreyAsRGB(nn.Module):
    """Runs an RGB augmentation (colour jitter, random greyscale) on 1-channel images."""

    def __init__(self, augment: nn.Module) -> None:
        super().__init__()
        self.augment = augment

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.augment(x.expand(-1, 3, -1, -1)).mean(dim=1, keepdim=True)


class ImageFolderDataModule(SplitDataModule):
    """Reads train/val/test images from folders; labels, when present, are for evaluation only.

    Splits come from ``val_root``/``test_root`` when given, from ``train``/``val``/``test``
    subfolders of ``root`` when it has them, and otherwise from a seeded random split of ``root``.

    Args:
        root: folder of images (recursively), or the cache folder of a ``builtin`` data set.
        builtin: ``digits`` writes scikit-learn's digits into ``root`` first.
        labels: ``auto``, ``subfolders`` or ``none`` (see :func:`scan_folder`).
        channels: 1 (greyscale) or 3 (RGB); every image is converted.
        image_size: side of the square every image is resized to.
        mean, std: per-channel normalisation (a single value is repeated).
        augmentations: name -> list of batched augmentation modules (kornia), applied on the
            training device to [0, 1] images before normalisation; tasks ask for views by name.
        on_bad_image: ``skip`` checks every file's size and header at setup and skips the bad
            ones (one warning listing them); a file that fails later, when decoded, is skipped
            then and named. ``raise`` decodes every file at setup and stops on any bad one;
            ``ignore`` checks nothing up front.
        invert: use ``1 - image`` (e.g. black digits on white, such as the MNIST PNG copies).
        cache: ``auto`` keeps each split decoded in memory (uint8) when all splits together take
            at most ``cache_max_gb``; ``memory`` always, ``none`` decodes on every read.
        limit: at most this many images per split, a seeded sample taken before any image is
            checked or decoded (debug runs; ``debug=fdr``, ``debug=limit``).
    """

    def __init__(
        self,
        root: str,
        builtin: str | None = None,
        val_root: str | None = None,
        test_root: str | None = None,
        labels: str = "auto",
        channels: int = 3,
        image_size: int = 32,
        mean: Sequence[float] | float = 0.5,
        std: Sequence[float] | float = 0.5,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        split_seed: int = 0,
        batch_size: int = 256,
        eval_batch_size: int = 512,
        num_workers: int | str = "auto",
        pin_memory: bool | str = "auto",
        drop_last: bool = True,
        on_bad_image: str = "skip",
        augmentations: Mapping[str, Sequence[Any]] | None = None,
        invert: bool = False,
        cache: str = "auto",
        cache_max_gb: float = 2.0,
        embedding_cache: bool = True,
        embedding_copies: int = 0,
        limit: int | None = None,
    ) -> None:
        super().__init__()
        check_limit(limit)
        if builtin is not None and builtin not in BUILTINS:
            raise DataError(f"data.builtin={builtin!r} is unknown; choose one of {BUILTINS}.")
        if channels not in (1, 3):
            raise DataError(f"data.channels={channels} must be 1 or 3.")
        if not 0 <= val_fraction < 1 or not 0 <= test_fraction < 1:
            raise DataError("data.val_fraction and data.test_fraction must lie in [0, 1).")
        if val_fraction + test_fraction >= 1:
            raise DataError("data.val_fraction + data.test_fraction must be below 1.")
        if embedding_copies < 0:
            raise DataError(f"data.embedding_copies={embedding_copies}: must be >= 0 (0: plain features).")
        if not (num_workers == "auto" or isinstance(num_workers, int) and num_workers >= 0):
            raise DataError(f"data.num_workers={num_workers!r}: use auto or a number >= 0.")
        if pin_memory not in ("auto", True, False):
            raise DataError(f"data.pin_memory={pin_memory!r}: use auto, true or false.")
        if image_size < 4:
            raise DataError(f"data.image_size={image_size} is too small (at least 4).")
        self.root, self.builtin = root, builtin
        self.val_root, self.test_root = val_root, test_root
        self.labels, self.channels, self.image_size = labels, channels, image_size
        self.mean = self._per_channel(mean, "mean")
        self.std = self._per_channel(std, "std")
        self.val_fraction, self.test_fraction, self.split_seed = val_fraction, test_fraction, split_seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.pin_memory, self.drop_last = num_workers, pin_memory, drop_last
        self.on_bad_image, self.invert = on_bad_image, invert
        self.cache, self.cache_max_gb, self.limit = cache, cache_max_gb, limit
        self.embedding_cache, self.embedding_copies = embedding_cache, embedding_copies
        use_memory_cache(cache, 0, channels, image_size, cache_max_gb)  # a typo fails here
        self._datasets: dict[str, ImageDataset | EmbeddingDataset] = {}  # one per split (_dataset)
        self.embeddings: EmbeddingCache | None = None  # a frozen backbone's features (use_embeddings)
        self.shuffle_seed: int | None = None  # the run's seed, set by the training script
        self.augmentations = {k: self._augmenter(v) for k, v in (augmentations or {}).items()}
        self.splits: dict[str, ImageList] = {}
        self._fingerprints: dict[str, str] = {}  # split -> digest of its image list (read once)

    def _augmenter(self, transforms: Sequence[nn.Module]) -> nn.Module:
        seq = nn.Sequential(*transforms)
        return seq if self.channels == 3 else GreyAsRGB(seq)

    def _per_channel(self, value: Sequence[float] | float, key: str) -> list[float]:
        values = [float(value)] * self.channels if isinstance(value, int | float) else list(value)
        if len(values) != self.channels:
            raise DataError(f"data.{key} has {len(values)} values for {self.channels} channel(s).")
        return values

    # ----------------------------------------------------------------------- splits and checks
    def prepare_data(self) -> None:
        if self.builtin == "digits":
            write_digits_folder(self.root)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        root = Path(self.root).expanduser()
        train_dir = _find_split_dir(root, "train") if root.is_dir() else None
        val_dir = Path(self.val_root) if self.val_root else None
        test_dir = Path(self.test_root) if self.test_root else None
        if train_dir is not None:
            val_dir = val_dir or _find_split_dir(root, "val")
            test_dir = test_dir or _find_split_dir(root, "test")
            log.info("Using split folders of %s: train=%s val=%s test=%s", root, train_dir,
                     val_dir, test_dir)
        train = scan_folder(train_dir or root, self.labels)
        fractions = [0.0 if val_dir else self.val_fraction, 0.0 if test_dir else self.test_fraction]
        train_idx, val_idx, test_idx = seeded_split(len(train), fractions, self.split_seed)
        splits = {"train": train.subset(train_idx)}
        for name, folder, idx in (("val", val_dir, val_idx), ("test", test_dir, test_idx)):
            if folder is not None:
                splits[name] = scan_folder(folder, self.labels, classes=train.classes)
            elif idx:
                splits[name] = train.subset(idx)
        splits = {k: v.subset(limited(len(v), self.limit, self.split_seed)) for k, v in splits.items()}
        self.splits = {k: drop_bad_images(v, self.on_bad_image, k) for k, v in splits.items()}
        log.info("Images: %s", {k: len(v) for k, v in self.splits.items()})

    @property
    def fingerprint(self) -> str:
        """Digest of the training image list, which pseudo-labels are indexed by."""
        return self.split_fingerprint("train")

    def split_fingerprint(self, split: str) -> str:
        """Digest of a split's image list (it reads the head of every file: computed once)."""
        if split not in self._fingerprints:
            self._fingerprints[split] = self.splits[split].fingerprint()
        return self._fingerprints[split]

    def describe(self) -> str:
        """Where the training images come from, for messages."""
        return str(Path(self.root).expanduser())

    def use_embeddings(self, cache: EmbeddingCache) -> None:
        """Serve a frozen backbone's cached features instead of images (see
        :mod:`mtl_unsup.data.embeddings`): items, batches and :meth:`train_images` hold feature
        rows, and each view picks one of its cached copies."""
        self.embeddings = cache
        self.augmentations = cache.views()
        self._datasets.clear()

    def train_images(self, indices: torch.Tensor) -> torch.Tensor:
        """Plain [0, 1] training images by dataset index, stacked (for tasks that need images
        other than the batch's, such as neighbours); cached feature rows with a frozen backbone."""
        dataset = self._dataset("train")
        if isinstance(dataset, EmbeddingDataset):
            return dataset.rows(indices)
        if dataset.decoded is not None:
            return dataset.to_float(dataset.decoded[indices.cpu()])
        return torch.stack([dataset[int(i)]["image"] for i in indices])

    # ----------------------------------------------------------------------------- loaders
    @property
    def caches_in_memory(self) -> bool:
        """Whether splits are kept decoded; ``auto`` shares ``cache_max_gb`` between the
        processes of a node (each DDP rank holds its own copy)."""
        total = sum(len(v) for v in self.splits.values())
        return use_memory_cache(self.cache, total, self.channels, self.image_size,
                                self.cache_max_gb / self.processes_per_node)

    def _dataset(self, split: str) -> ImageDataset | EmbeddingDataset:
        """The split's dataset, built (and, when cached, decoded or embedded) on first use:
        every loader, refresh pass and neighbour fetch of a run reads the same one."""
        if split not in self._datasets:
            if self.embeddings is None:
                self._datasets[split] = self._image_dataset(split)
            else:
                trainer, read = self.trainer, []

                def images() -> Any:
                    read.append(self._image_dataset(split))
                    return self._eval_loader(read[-1])

                features = self.embeddings.load_or_compute(
                    split, self.split_fingerprint(split), loader=images,
                    barrier=trainer.strategy.barrier if trainer else lambda: None,
                    is_main=trainer.is_global_zero if trainer else True)
                # a file that failed when decoded here was embedded blank: out of the scores (a
                # features file from an earlier run does not say which those were)
                labels = list(self.splits[split].labels)
                for index in (read[0].unreadable if read else {}):
                    labels[index] = -1
                self._datasets[split] = EmbeddingDataset(features, tuple(labels))
        return self._datasets[split]

    def _image_dataset(self, split: str) -> ImageDataset:
        images = self.splits[split]
        decoded, unreadable = None, {}
        if self.caches_in_memory:
            decoded, unreadable = decode_images(images, self.channels, self.image_size)
        if unreadable and len(unreadable) == len(images):
            raise DataError(f"None of the {len(images)} images of the {split} set can be decoded (they "
                            f"passed the header check), e.g. {images.paths[0]}: "
                            f"{unreadable[0]}. Fix or replace the files.")
        if unreadable:
            listing = list_files([(images.paths[i], why) for i, why in unreadable.items()])
            warnings.warn(f"Skipping {len(unreadable)} image(s) of the {split} set that passed the "
                          f"header check at setup but cannot be decoded:\n{listing}\nThey are "
                          "left out of training and of the scores that read labels "
                          "(data.on_bad_image=raise decodes every file before training instead).",
                          stacklevel=2)
        return ImageDataset(images, self.channels, self.image_size, self.invert, decoded=decoded,
                            unreadable=unreadable)
