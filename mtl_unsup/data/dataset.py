"""A map-style dataset over an image list that yields dicts carrying the dataset index."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch.utils.data import Dataset

from mtl_unsup.data.images import ImageList, load_image

Transform = Callable[[Any], torch.Tensor]


class ImageDataset(Dataset):
    """Items are ``{"index", "label", "image"?, "views"?}``.

    ``image`` is the plain (resized, normalised, never augmented) tensor, used for clustering and
    evaluation. ``views`` maps an augmentation name to a list of independently augmented tensors,
    as many as the tasks asked for. ``label`` is -1 for unlabelled data and is never fed to a loss.
    """

    def __init__(
        self,
        images: ImageList,
        channels: int,
        plain: Transform,
        views: Mapping[str, tuple[Transform, int]] | None = None,
        with_plain: bool = True,
    ) -> None:
        self.images = images
        self.channels = channels
        self.plain = plain
        self.views = dict(views or {})
        self.with_plain = with_plain

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        img = load_image(self.images.paths[index], self.channels)
        item: dict[str, Any] = {"index": index, "label": self.images.labels[index]}
        if self.with_plain:
            item["image"] = self.plain(img)
        if self.views:
            item["views"] = {
                name: [transform(img) for _ in range(count)]
                for name, (transform, count) in self.views.items()
            }
        return item
