"""A map-style dataset over an image list that yields dicts carrying the dataset index."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from mtl_unsup.data.images import ImageList, load_image


def _inverted(x: torch.Tensor) -> torch.Tensor:
    return 1.0 - x  # a named function: loader workers may need to pickle the transform


def image_transform(image_size: int, invert: bool = False) -> v2.Compose:
    """Decode to a ``C x image_size x image_size`` float tensor in [0, 1] (``1 - x`` with
    ``invert``: dark strokes on a light ground become light on dark, as augmentations that pad
    with zeros expect)."""
    steps = [v2.ToImage(), v2.Resize((image_size, image_size), antialias=True),
             v2.ToDtype(torch.float32, scale=True)]
    if invert:
        steps.append(v2.Lambda(_inverted))
    return v2.Compose(steps)


class ImageDataset(Dataset):
    """Items are ``{"index", "label", "image"}``.

    ``image`` is the decoded image resized to a fixed square, as floats in [0, 1]. Augmentation
    and normalisation happen batched on the training device (see :class:`MultiTaskModule`), which
    is far faster than per-image transforms in loader workers. ``label`` is -1 for unlabelled
    data and is never fed to a loss.
    """

    def __init__(
        self, images: ImageList, channels: int, transform: Callable[[Any], torch.Tensor]
    ) -> None:
        self.images = images
        self.channels = channels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = load_image(self.images.paths[index], self.channels)
        return {"index": index, "label": self.images.labels[index], "image": self.transform(img)}
