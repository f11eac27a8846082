"""Structured configs: the schema Hydra validates every composed config against.

A typo in a key or a value of the wrong type fails at start, naming the key. Groups whose
fields depend on the chosen class (backbone, tasks, trainer, logger) stay open here and are
checked by instantiating them before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING


@dataclass
class DataConfig:
    _target_: str = "mtl_unsup.data.ImageFolderDataModule"
    root: str = MISSING
    builtin: Optional[str] = None
    val_root: Optional[str] = None
    test_root: Optional[str] = None
    labels: str = "auto"
    channels: int = 3
    image_size: int = 32
    mean: Any = 0.5
    std: Any = 0.5
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    batch_size: int = 256
    eval_batch_size: int = 512
    num_workers: int = 0
    pin_memory: bool = False
    drop_last: bool = True
    on_bad_image: str = "skip"
    augmentations: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClusterConfig:
    k: int = 10
    pca_dim: Optional[int] = 128
    niter: int = 20
    nredo: int = 1
    every_n_epochs: int = 1


@dataclass
class CheckpointConfig:
    monitor: Optional[str] = "val/acc"
    mode: str = "max"
    save_top_k: int = 1
    every_n_epochs: int = 1


@dataclass
class PathsConfig:
    output_dir: str = "${hydra:runtime.output_dir}"
    cache_dir: str = MISSING


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    backbone: Any = MISSING
    task: dict[str, Any] = field(default_factory=dict)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    optimizer: Any = MISSING
    scheduler: Any = None
    trainer: Any = MISSING
    logger: Any = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    ckpt_path: Optional[str] = None
    print_config: bool = True


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
