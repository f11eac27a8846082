"""Decoded-image cache: small images decoded and resized once, kept in memory as uint8.

Decoding a JPEG or PNG costs far more than a small network's step on it (CIFAR-10: 0.08 s per
batch of 256 on one core, every epoch, again for every refresh, evaluation and neighbour fetch).
Images of CIFAR, MNIST or thumbnail size fit in memory once decoded (50,000 x 3 x 32 x 32 bytes is
150 MB), so a split is decoded once and every later read is a slice.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from mtl_unsup.data.dataset import decode_transform
from mtl_unsup.data.images import DataError, ImageList, try_load_image
from mtl_unsup.data.loaders import available_cores

log = logging.getLogger(__name__)

CACHE_MODES = ("auto", "memory", "none")


def decoded_bytes(num_images: int, channels: int, image_size: int) -> int:
    return num_images * channels * image_size * image_size


def use_memory_cache(mode: str, num_images: int, channels: int, image_size: int,
                     max_gb: float) -> bool:
    """Whether to keep a split decoded in memory: always (``memory``), never (``none``), or when
    all of it takes at most ``max_gb`` (``auto``)."""
    if mode not in CACHE_MODES:
        raise DataError(f"data.cache={mode!r} is not one of {', '.join(CACHE_MODES)}.")
    if mode == "auto":
        return decoded_bytes(num_images, channels, image_size) <= max_gb * 2**30
    return mode == "memory"


def decode_images(images: ImageList, channels: int, image_size: int,
                  threads: int | None = None, chunk: int = 2048) -> tuple[torch.Tensor, dict[int, str]]:
    """Every image of ``images`` decoded and resized: ``N x C x S x S`` uint8, in list order,
    exactly what :class:`~mtl_unsup.data.dataset.ImageDataset` would decode one by one; and the
    files that could not be decoded (index -> why; their rows are left blank).

    Pillow releases the GIL while it decodes, so a few threads share the work; they write into
    the array in chunks (no queue of a million pending decodes).
    """
    decode = decode_transform(image_size)
    # A normal tensor even when called under inference mode (a first test pass): the threads,
    # which do not inherit that mode, could not write into an inference tensor.
    with torch.inference_mode(False):
        out = torch.zeros((len(images), channels, image_size, image_size), dtype=torch.uint8)
    unreadable: dict[int, str] = {}

    def fill(i: int) -> None:
        image, why = try_load_image(images.paths[i], channels)
        if image is None:
            unreadable[i] = str(why)
        else:
            out[i] = decode(image)

    start = time.perf_counter()
    cores = available_cores()
    # half the cores: small images spend most of their time in Python (GIL-bound), and on 2 cores
    # one thread decodes CIFAR-10 faster than two (15,000 images: 3.0 s against 4.2 s)
    workers = threads or max(1, min(8, cores // 2))
    with ThreadPoolExecutor(workers) as pool:
        for lo in range(0, len(images), chunk):
            list(pool.map(fill, range(lo, min(lo + chunk, len(images)))))
    log.info("Decoded %d images into memory (%.0f MB) in %.1f s", len(images),
             out.numel() / 2**20, time.perf_counter() - start)
    return out, dict(sorted(unreadable.items()))
