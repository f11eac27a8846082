"""A map-style dataset over an image list that yields dicts carrying the dataset index."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch.utils.data import Dataset, default_collate
from torchvision.transforms import v2

from mtl_unsup.data.images import ImageList, try_load_image

log = logging.getLogger(__name__)


def _inverted(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x  # a named function: loader workers may need to pickle the transform


def decode_transform(image_size: int) -> v2.Compose:
    """A decoded image as a ``C x image_size x image_size`` uint8 tensor (what the decoded-image
    cache stores)."""
    return v2.Compose([v2.ToImage(), v2.Resize((image_size, image_size), antialias=True)])


def float_transform(invert: bool = False) -> v2.Compose:
    """uint8 to floats in [0, 1] (``1 - x`` with ``invert``: dark strokes on a light ground
    become light on dark, as augmentations that pad with zeros expect)."""
    steps = [v2.ToDtype(torch.float32, scale=True)]
    if invert:
        steps.append(v2.Lambda(_inverted))
    return v2.Compose(steps)


class ImageDataset(Dataset):
    """Items are ``{"index", "label", "image", "valid"}``.

    ``image`` is the decoded image resized to a fixed square, as floats in [0, 1]. Augmentation
    and normalisation happen batched on the training device (see :class:`MultiTaskModule`), which
    is far faster than per-image transforms in loader workers. ``label`` is -1 for unlabelled
    data and is never fed to a loss.

    With ``decoded`` (the split's images already decoded and resized, N x C x S x S uint8, see
    :mod:`mtl_unsup.data.cache`) nothing is read from disk; the items are the same, bit for bit.

    A file that passed the header check at setup but cannot be decoded (``unreadable``, found by
    the cache, or found here when streaming) keeps its index, so that every pass stays aligned by
    dataset index: its item is a blank image with ``valid`` False and label -1 (left out of the
    scores that read labels), named in a warning once per process, and :meth:`collate_training`
    keeps it out of training batches.
    """

    def __init__(self, images: ImageList, channels: int, image_size: int, invert: bool = False,
                 decoded: torch.Tensor | None = None, unreadable: Mapping[int, str] | None = None) -> None:
        if decoded is not None and len(decoded) != len(images):
            raise ValueError(f"{len(decoded)} decoded images for a list of {len(images)}")
        self.images, self.channels, self.image_size, self.decoded = images, channels, image_size, decoded
        self.unreadable = dict(unreadable or {})  # index -> why it cannot be decoded
        self.decode = decode_transform(image_size)
        self.to_float = float_transform(invert)

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, index: int) -> torch.Tensor | None:
        """The image at ``index`` as uint8, ``C x S x S``; None when it cannot be decoded."""
        if index in self.unreadable:
            return None
        if self.decoded is not None:
            return self.decoded[index]
        image, why = try_load_image(self.images.paths[index], self.channels)
        if image is None:
            self.unreadable[index] = str(why)
            log.warning("Skipping %s: %s (it passed the header check at setup; set "
                        "data.on_bad_image=raise to decode every file before training)",
                        self.images.paths[index], why)
            return None
        return self.decode(image)

    def __getitem__(self, index: int) -> dict[str, Any]:
        pixels = self.pixels(index)
        valid = pixels is not None
        if pixels is None:
            pixels = torch.zeros((self.channels, self.image_size, self.image_size), dtype=torch.uint8)
        return {"index": index, "label": self.images.labels[index] if valid else -1,
                "image": self.to_float(pixels), "valid": valid}

    @staticmethod
    def collate_training(items: list[dict[str, Any]]) -> dict[str, Any]:
        """A training batch in which each item that could not be decoded is replaced by a valid
        item of the same batch: the batch keeps its size (under DDP every rank's batch must have
        the same shape, for the gathered contrastive loss), and no blank image is trained on.
        A batch with no valid item stays blank (label -1: out of the scores that read labels)."""
        valid = [item for item in items if item["valid"]]
        if valid and len(valid) < len(items):
            items = [item if item["valid"] else valid[i % len(valid)] for i, item in enumerate(items)]
        return default_collate(items)
