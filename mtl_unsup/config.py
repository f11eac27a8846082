"""Structured configs: the schema Hydra validates every composed config against.

A typo in a key or a value of the wrong type fails at start, naming the key. Groups whose
fields depend on the chosen class (backbone, tasks, trainer, logger) stay open here and are
checked by instantiating them before any training starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# conf/ sits beside the package in the repository (editable install); an absolute path lets the
# console scripts find it whatever the working directory.
CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")


@dataclass
class DataConfig:
    _target_: str = "mtl_unsup.data.ImageFolderDataModule"
    root: str = MISSING
    builtin: str | None = None
    val_root: str | None = None
    test_root: str | None = None
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
    pca_dim: int | None = 32
    niter: int = 20
    nredo: int = 5
    every_n_epochs: int = 5
    warm_start: bool = True


@dataclass
class CheckpointConfig:
    monitor: str | None = "val/acc"
    mode: str = "max"
    save_top_k: int = 1
    every_n_epochs: int = 1
    every_n_train_steps: int = 25


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
    ckpt_path: str | None = None
    resume: bool = False
    print_config: bool = True
    pictures: bool = True


class ConfigValueError(ValueError):
    """A config value out of range, with a message naming the key and the fix."""


def check_config(cfg: Any) -> None:
    """Range checks the schema's types cannot express; run before any data is read."""
    problems = []
    if cfg.cluster.k < 2:
        problems.append(f"cluster.k={cfg.cluster.k}: at least 2 clusters are needed.")
    if cfg.cluster.every_n_epochs < 1:
        problems.append(f"cluster.every_n_epochs={cfg.cluster.every_n_epochs}: must be >= 1.")
    if cfg.cluster.pca_dim is not None and cfg.cluster.pca_dim < 0:
        problems.append(f"cluster.pca_dim={cfg.cluster.pca_dim}: use a positive size, or null for no PCA.")
    if cfg.cluster.niter < 1 or cfg.cluster.nredo < 1:
        problems.append("cluster.niter and cluster.nredo must be >= 1.")
    if not cfg.task:
        problems.append("task is empty: compose at least one task, e.g. task=[cluster,contrastive].")
    for name, task in (cfg.task or {}).items():
        if task.get("weight", 1.0) < 0:
            problems.append(f"task.{name}.weight={task.weight}: weights must be >= 0.")
    if cfg.checkpoint.every_n_train_steps < 1:
        problems.append(f"checkpoint.every_n_train_steps={cfg.checkpoint.every_n_train_steps}: must be >= 1.")
    if cfg.data.batch_size < 2:
        problems.append(f"data.batch_size={cfg.data.batch_size}: must be >= 2 (pairs, BatchNorm).")
    if problems:
        raise ConfigValueError("Invalid configuration:\n  " + "\n  ".join(problems))


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
