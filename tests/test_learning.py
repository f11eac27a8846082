"""The recipe learns: a short run on synthetic images with clear classes clusters held-out images
correctly, so a wrong target, a broken loss or a head that does not train fails the suite."""

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtl_unsup.train import train

from .conftest import compose_cfg, tiny_folder_overrides


def write_stripes(root: Path, per_class: int, seed: int = 0) -> Path:
    """Horizontal stripes, vertical stripes and checks, of random period, phase and contrast:
    classes that survive crops and flips, in noisy 16 px greyscale PNGs."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:16, 0:16]
    for kind in range(3):
        (root / f"class_{kind}").mkdir(parents=True)
        for i in range(per_class):
            period, phase = rng.integers(3, 6), rng.integers(0, 6)
            rows, cols = (yy + phase) // period % 2, (xx + phase) // period % 2
            pattern = (rows, cols, rows ^ cols)[kind]
            low, high = rng.integers(0, 60), rng.integers(150, 256)
            img = np.where(pattern, high, low) + rng.normal(0, 20, (16, 16))
            Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), mode="L").save(
                root / f"class_{kind}" / f"{i:03d}.png")
    return root


@pytest.mark.slow
def test_a_short_run_reaches_a_high_held_out_accuracy(tmp_path):
    root = write_stripes(tmp_path / "stripes", per_class=40)
    overrides = [
        *tiny_folder_overrides(root), "trainer.max_epochs=12", "task=[cluster,contrastive]",
        "cluster.every_n_epochs=4", "data.val_fraction=0", "data.test_fraction=0.3",
        "optimized_metric=train/silhouette", "optimizer.lr=0.005", "task.cluster.start_epoch=4",
        "cluster.assign=kmeans",  # the head's targets are then exactly its nearest-centroid start
    ]
    metrics = train(compose_cfg(tmp_path / "run", overrides))
    assert metrics["test/acc"] >= 0.95, metrics
    assert metrics["test/kmeans_acc"] >= 0.95, metrics
    # the head fits its pseudo-labels: a wrong target (say, looked up by batch position) cannot
    rows = list(csv.DictReader((tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()))
    cluster_loss = [float(r["train/loss_cluster"]) for r in rows if r.get("train/loss_cluster")]
    assert len(cluster_loss) == 8 and cluster_loss[-1] < 0.2, cluster_loss
