"""Shared fixtures: small real image folders written into tmp dirs, and config composition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict
from PIL import Image

from mtl_unsup.config import register_configs

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
register_configs()


def shape_image(kind: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """A noisy 8-bit image of one of three shapes: horizontal bar, vertical bar, square ring."""
    img = rng.integers(0, 40, (size, size)).astype(np.uint8)
    a, b = size // 4, 3 * size // 4
    off = int(rng.integers(-1, 2))
    if kind == 0:
        img[size // 2 - 2 + off : size // 2 + 2 + off, a:b] = 230
    elif kind == 1:
        img[a:b, size // 2 - 2 + off : size // 2 + 2 + off] = 230
    else:
        img[a:b, a:b] = 230
        img[a + 2 : b - 2, a + 2 : b - 2] = 20
    return img


def write_shapes(root: Path, per_class: int = 20, classes: int = 3, seed: int = 0,
                 labelled: bool = True) -> Path:
    """A real PNG folder of easy-to-cluster shapes, with class subfolders when ``labelled``."""
    rng = np.random.default_rng(seed)
    for c in range(classes):
        folder = root / f"class_{c}" if labelled else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(shape_image(c, rng), mode="L").save(folder / f"c{c}_{i:03d}.png")
    return root


@pytest.fixture
def shapes_dir(tmp_path: Path) -> Path:
    return write_shapes(tmp_path / "shapes")


def compose_cfg(out_dir: Path, overrides: list[str] | None = None) -> DictConfig:
    """The train config for a tiny, fast run, composed with Hydra's compose API."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=list(overrides or []), return_hydra_config=False)
    with open_dict(cfg):
        cfg.paths.output_dir = str(out_dir)
    return cfg


TINY = [
    "backbone.widths=[8,16]",
    "backbone.convs_per_stage=1",
    "trainer.max_epochs=2",
    "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false",
    "data.batch_size=16",
    "data.eval_batch_size=32",
    "cluster.k=3",
    "cluster.pca_dim=8",
    "cluster.every_n_epochs=1",
    "task.cluster.start_epoch=0",
    "print_config=false",
    "pictures=false",
    "report=false",
    "estimate=false",  # no probe before training (tests/test_budget.py runs it)
]


def tiny_folder_overrides(root: Path) -> list[str]:
    """A tiny run on the folder at ``root``, one stage of the listed tasks (``protocol=single``;
    data=folder's own protocol is tested in test_protocol.py)."""
    return [*TINY, "data=folder", "protocol=single", f"data.root={root}", "data.channels=1",
            "data.image_size=16", "data.mean=[0.3]", "data.std=[0.4]"]


def staged_overrides(root: Path) -> list[str]:
    """The tiny config as three stages, SCAN's protocol in small: a contrastive pretext, SCAN on
    neighbours mined once from its projections (Adam, smaller batches), then self-labelling."""
    tiny = [o for o in tiny_folder_overrides(root) if not o.startswith("task.cluster")]
    return [*tiny, "task=[contrastive,scan,selflabel]", "task.scan.num_neighbors=3",
            "task.scan.num_heads=2", "task.scan.space=contrastive", "task.selflabel.weak_view=plain",
            "task.selflabel.threshold=0.5",
            "+stages.pretext.tasks.contrastive={}", "+stages.pretext.epochs=2",
            "+stages.scan.tasks.scan={}", "+stages.scan.epochs=2", "+stages.scan.refresh=once",
            "+stages.scan.batch_size=8", "+stages.scan.optimizer._target_=torch.optim.Adam",
            "+stages.scan.optimizer._partial_=true", "+stages.scan.optimizer.lr=0.001",
            "+stages.scan.scheduler=null",
            "+stages.selflabel.tasks.selflabel.view=weak", "+stages.selflabel.epochs=2",
            "+stages.selflabel.refresh=never", "+stages.selflabel.backbone_lr=0.5"]
