"""Benchmark: an epoch of head training on cached embeddings against one on images, same frozen
backbone, side by side in one process.

``python -m mtl_unsup.benchmarks.embeddings [train overrides]`` trains two runs of two epochs with
``backbone.freeze=true``: one with ``data.embedding_cache=true`` (features computed once), one with
``data.embedding_cache=false`` (images augmented and embedded at every step), and prints
``name=value`` lines: each run's second epoch (refreshes excluded), their ratio, and each run's
whole time (the cached one includes embedding every image once). The default is the bundled digits
with a torchvision ResNet-18 (512 features); ``data=folder data.root=<folder>`` measures a folder
(figures in experiments/pretrained/README.md).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import lightning as L

DEFAULTS = ["backbone=torchvision", "backbone.name=resnet18", "backbone.cifar_stem=true",
            "backbone.freeze=true", "task=[cluster,scan]", "task.cluster.start_epoch=0",
            "task.scan.start_epoch=0", "cluster.every_n_epochs=1", "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=100", "print_config=false", "pictures=false",
            "trainer.enable_progress_bar=false", "protocol=single"]


class EpochTimer(L.Callback):
    """Wall time of each training epoch, from after the refresh (an earlier callback) to its end."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.seconds.append(time.perf_counter() - self._start)


def run(overrides: list[str], out: Path) -> tuple[float, float]:
    """(seconds of the second epoch, seconds of the whole run)."""
    from hydra import compose, initialize_config_dir

    from mtl_unsup.config import CONF_DIR, register_configs
    from mtl_unsup.train import train

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={out}",
                                          f"paths.cache_dir={out.parent / 'cache'}"])
    timer = EpochTimer()
    start = time.perf_counter()
    train(cfg, extra_callbacks=(timer,))
    return timer.seconds[-1], time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    overrides = [*DEFAULTS, *(sys.argv[1:] if argv is None else argv)]
    with tempfile.TemporaryDirectory() as tmp:
        cached_epoch, cached_total = run([*overrides, "data.embedding_cache=true"], Path(tmp) / "cached")
        images_epoch, images_total = run([*overrides, "data.embedding_cache=false"], Path(tmp) / "images")
    print(f"overrides={' '.join(overrides)}")
    print(f"epoch_seconds_images={images_epoch:.3f}")
    print(f"epoch_seconds_embeddings={cached_epoch:.3f}")
    print(f"speedup={images_epoch / cached_epoch:.1f}")
    print(f"run_seconds_images={images_total:.1f}")
    print(f"run_seconds_embeddings={cached_total:.1f} (embedding pass and final evaluation included)")


if __name__ == "__main__":
    main()
