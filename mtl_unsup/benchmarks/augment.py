"""Benchmark: batched kornia augmentation (what training uses) vs per-image torchvision v2.

``python -m mtl_unsup.benchmarks.augment`` augments the same images both ways, alternating the
two in each round, and prints the per-epoch times and their ratio. The pipelines match the
digits config's ``strong`` view: random resized crop then random affine, 16 px, 1 channel.
"""

from __future__ import annotations

import argparse
import statistics
import time

import kornia.augmentation as K
import torch
from torchvision.transforms import v2


def per_image(images: torch.Tensor, size: int) -> torch.Tensor:
    t = v2.Compose([v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                    v2.RandomAffine(degrees=15, translate=(0.1, 0.1), shear=10)])
    return torch.stack([t(img) for img in images])


def batched(images: torch.Tensor, size: int, batch_size: int) -> torch.Tensor:
    aug = torch.nn.Sequential(K.RandomResizedCrop((size, size), scale=(0.5, 1.0)),
                              K.RandomAffine(degrees=15, translate=(0.1, 0.1), shear=10, p=1.0))
    return torch.cat([aug(chunk) for chunk in images.split(batch_size)])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1258, help="images per epoch (digits train)")
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    images = torch.rand(args.images, 1, args.size, args.size)
    times: dict[str, list[float]] = {"per-image torchvision": [], "batched kornia": []}
    for _ in range(args.rounds):
        for name, fn in (("per-image torchvision", lambda: per_image(images, args.size)),
                         ("batched kornia", lambda: batched(images, args.size, args.batch_size))):
            start = time.perf_counter()
            out = fn()
            times[name].append(time.perf_counter() - start)
            assert out.shape == images.shape
    med = {k: statistics.median(v) for k, v in times.items()}
    for name, t in med.items():
        print(f"{name:>22}: {t * 1000:8.1f} ms per epoch of {args.images} images (median)")
    print(f"ratio per-image / batched: {med['per-image torchvision'] / med['batched kornia']:.1f}x")


if __name__ == "__main__":
    main()
