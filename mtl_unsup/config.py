"""Structured configs: the schema Hydra validates every composed config against.

A typo in a key or a value of the wrong type fails at start, naming the key. Groups whose
fields depend on the chosen class (backbone, tasks, logger) stay open here and are checked by
instantiating them before any training starts.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from mtl_unsup.clustering.settings import ClusterSettings
from mtl_unsup.errors import UserError


def _conf_dir() -> str:
    """The YAML configs: ``mtl_unsup/conf`` in an installed wheel, else the repository's ``conf/``.

    conf/ stays at the top of the repository, where users read it; the wheel ships it inside the
    package (pyproject.toml maps ``mtl_unsup.conf`` to it). An editable install imports the
    package from the repository, where only ``conf/`` beside it exists. The path is absolute, so
    the commands find it whatever the working directory.
    """
    package = Path(__file__).resolve().parent
    installed = package / "conf"
    return str(installed if installed.is_dir() else package.parent / "conf")


CONF_DIR = _conf_dir()


@dataclass
class DataConfig:
    _target_: str = "mtl_unsup.data.ImageFolderDataModule"
    root: str = MISSING
    builtin: str | None = None
    val_root: str | None = None
    test_root: str | None = None
    labels: str = "auto"
    channels: int = 3
    # null: what the backbone's weights expect (its pretrained config), else 32, 0.5, 0.25
    image_size: int | None = None
    mean: Any = None
    std: Any = None
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    batch_size: int = 256
    eval_batch_size: int = 512
    # loader processes for images read from disk (a split decoded in memory needs none): auto
    # (one per core but one, at most 8) or a number; pin_memory auto: when training on a GPU
    num_workers: Any = "auto"
    pin_memory: Any = "auto"
    drop_last: bool = True
    on_bad_image: str = "skip"
    augmentations: dict[str, Any] = field(default_factory=dict)
    invert: bool = False
    cache: str = "auto"
    cache_max_gb: float = 2.0
    # backbone.freeze=true: compute each image's features once and train the heads on them
    embedding_cache: bool = True
    # ... and this many augmented copies per view of each training image (0: plain features)
    embedding_copies: int = 0
    # at most this many images per split, a seeded sample (debug runs); null: all
    limit: int | None = None


@dataclass
class EmbeddingDataConfig:
    """``data=embeddings``: rows of a file of embeddings (see mtl_unsup.data.embedding_file)."""

    _target_: str = "mtl_unsup.data.embedding_datamodule.EmbeddingFileDataModule"
    path: str = MISSING
    key: str | None = None
    paths_key: str | None = None
    labels_key: str | None = None
    paths_file: str | None = None
    image_root: str | None = None
    labels: str = "auto"
    views: list[str] = field(default_factory=lambda: ["weak", "strong"])
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    split_seed: int = 0
    batch_size: int = 1024
    eval_batch_size: int = 4096
    drop_last: bool = True
    limit: int | None = None


@dataclass
class TrainingOnly:
    """Keys ``data=embeddings`` sets for training (``backbone=features``, its tasks, ...), which
    ``mtl-predict`` and ``mtl-evaluate`` accept and leave alone: the checkpoint holds the model."""

    backbone: Any = None
    task: Any = None
    trainer: Any = None
    warmup_epochs: Any = None


_CLUSTER = ClusterSettings()  # the refresh's defaults are the config's


@dataclass
class ClusterConfig:
    k: Any = 10  # a number of clusters, or "auto": chosen in k_range by k_criterion
    k_range: list[int] = field(default_factory=lambda: list(_CLUSTER.k_range))
    k_criterion: str = _CLUSTER.k_criterion
    pca_dim: int | None = _CLUSTER.pca_dim
    niter: int = _CLUSTER.niter
    nredo: int = _CLUSTER.nredo
    every_n_epochs: int = 1
    warm_start: bool = _CLUSTER.warm_start
    # the features a refresh clusters: pass (an eval-mode pass over the training images) or bank
    # (the training pass's own, kept by dataset index: DeepCluster-v2's memory bank, no extra pass)
    features: str = "bank"
    assign: str = _CLUSTER.assign
    marginals: str = _CLUSTER.marginals
    min_size: float = _CLUSTER.min_size
    sinkhorn_epsilon: float = _CLUSTER.sinkhorn_epsilon
    answer: str = "auto"
    # the criterion that picks the answer among every stage's heads and k-means (answer/candidates.py)
    choose: str = "last"
    # k-means with each rank holding only its own rows (ImageNet-sized sets under DDP); the
    # whitening is fitted on pca_sample rows (0: all)
    sharded: bool = _CLUSTER.sharded
    pca_sample: int = _CLUSTER.pca_sample


@dataclass
class CheckpointConfig:
    monitor: str | None = None
    mode: str = "max"
    save_top_k: int = 1
    every_n_epochs: int = 1
    every_n_train_steps: int = 25


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.pytorch.Trainer`` that take plain values (conf/trainer/default.yaml).

    A misspelt key or a value of the wrong type fails at composition, naming the key. Arguments
    Lightning accepts in several types (int or float, bool or int, str or int) are ``Any`` here,
    as OmegaConf has no unions of primitives, and are checked by :func:`check_config`. Defaults
    are those of conf/trainer/default.yaml, else Lightning's own (a test keeps them so).
    """

    _target_: str = "lightning.pytorch.Trainer"
    default_root_dir: str | None = "${paths.output_dir}"
    accelerator: str = "auto"
    strategy: str = "auto"
    devices: Any = 1  # int, list of device indices, or str ("auto", "0,1", "-1")
    num_nodes: int = 1
    precision: Any = "32-true"  # 16, "16-mixed", "bf16-mixed", ...
    fast_dev_run: Any = False  # bool, or a number of batches
    max_epochs: int | None = 80
    min_epochs: int | None = None
    max_steps: int = -1
    min_steps: int | None = None
    max_time: Any = None  # "DD:HH:MM:SS", or a dict such as {hours: 12}
    # int (batches) or float (a fraction):
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    limit_predict_batches: Any = None
    overfit_batches: Any = 0.0
    val_check_interval: Any = None
    check_val_every_n_epoch: int | None = 5
    num_sanity_val_steps: int | None = 0
    log_every_n_steps: int | None = 1
    enable_checkpointing: bool | None = None
    enable_progress_bar: bool | None = True
    enable_model_summary: bool | None = False
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    gradient_clip_algorithm: str | None = None
    deterministic: Any = False  # bool or "warn"
    benchmark: bool | None = False
    inference_mode: bool = True
    use_distributed_sampler: bool = True
    profiler: str | None = None  # "simple", "advanced", "pytorch"
    detect_anomaly: bool = False
    barebones: bool = False
    sync_batchnorm: bool = False
    reload_dataloaders_every_n_epochs: int = 0


@dataclass
class PathsConfig:
    output_dir: str = "${hydra:runtime.output_dir}"
    cache_dir: str = MISSING


@dataclass
class TrainConfig:
    # each data option brings its schema (DataConfig or EmbeddingDataConfig, see register_configs)
    data: Any = MISSING
    backbone: Any = MISSING
    task: dict[str, Any] = field(default_factory=dict)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: Any = None
    optimizer: Any = MISSING
    scheduler: Any = None
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: Any = None
    callbacks: Any = None
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    seed: int = 0
    # epochs in which only self-supervised tasks train; clustering tasks start after (their YAMLs)
    warmup_epochs: int = 20
    ckpt_path: str | None = None
    resume: bool = False
    print_config: bool = True
    pictures: bool = True
    # also every n epochs of training: the cluster grid and confusion, to pictures/epochs/ and the loggers
    pictures_every_n_epochs: int = 0
    report: bool = True
    # probe each stage's cost first and print the run's estimated duration (a budget always does)
    estimate: bool = True
    channels_last: bool = True
    optimized_metric: str | None = "val/silhouette"
    # A run as named stages, each with its tasks, epochs, optimiser, ... (mtl_unsup/stages.py);
    # null: one stage, the settings above. start_stage: begin at this stage (e.g. from another
    # run's checkpoint of the stage before it, ckpt_path=.../checkpoints/<stage>/last.ckpt).
    stages: Any = None
    start_stage: str | None = None
    # the protocol file (conf/protocol/<name>.yaml) that set the stages, named in its messages
    protocol_name: str | None = None
    # at most this many epochs in each stage (the debug presets set it; null: each its own)
    max_stage_epochs: int | None = None


# mtl-evaluate's baselines on the model's features (mtl_unsup.baselines)
BASELINES = ("kmeans", "agglomerative", "hdbscan")


class ConfigValueError(UserError, ValueError):
    """A config value out of range, with a message naming the key and the fix."""


def check_config(cfg: Any) -> None:
    """Range checks the schema's types cannot express; run before any data is read."""
    problems = []
    from mtl_unsup.stage_checks import protocol_problem, stage_problems
    from mtl_unsup.stages import drop_null_stages, listed_tasks

    drop_null_stages(cfg)
    if (problem := protocol_problem(cfg)) is not None:  # one message, not one per task key
        raise ConfigValueError(problem)
    if OmegaConf.get_type(cfg.data) not in (DataConfig, EmbeddingDataConfig):
        raise ConfigValueError(
            "The data option has no schema, so its defaults and key checks are missing: start its "
            "YAML with `defaults: [/schema/data/images@_here_, _self_]` (images) or "
            "`[/schema/data/embeddings@_here_, _self_]` (an embedding file), as conf/data/*.yaml do.")
    problems += k_problems(cfg.cluster)
    if cfg.warmup_epochs < 0:
        problems.append(f"warmup_epochs={cfg.warmup_epochs}: must be >= 0.")
    if cfg.pictures_every_n_epochs < 0:
        problems.append(f"pictures_every_n_epochs={cfg.pictures_every_n_epochs}: must be >= 0 (0: pictures "
                        "at the end only).")
    if cfg.cluster.every_n_epochs < 1:
        problems.append(f"cluster.every_n_epochs={cfg.cluster.every_n_epochs}: must be >= 1.")
    if cfg.cluster.pca_dim is not None and cfg.cluster.pca_dim < 0:
        problems.append(f"cluster.pca_dim={cfg.cluster.pca_dim}: use a positive size, or null for no PCA.")
    if cfg.cluster.features not in ("pass", "bank"):
        problems.append(f"cluster.features={cfg.cluster.features!r}: use pass (an eval-mode pass over the "
                        "training images at each refresh) or bank (the training pass's features).")
    if cfg.cluster.sharded and cfg.cluster.features != "pass":
        problems.append("cluster.sharded=true needs cluster.features=pass (a bank holds every row on "
                        "every rank); cluster=sharded sets it.")
    if cfg.cluster.sharded and cfg.cluster.k == "auto":
        problems.append("cluster.sharded=true needs a number for cluster.k (choosing k needs every "
                        "row on one rank).")
    if cfg.cluster.niter < 1 or cfg.cluster.nredo < 1:
        problems.append("cluster.niter and cluster.nredo must be >= 1.")
    problems += cluster_problems(cfg.cluster)
    if not cfg.task:
        problems.append("task is empty: compose at least one task, e.g. task=[cluster,contrastive].")
    for name, task in (cfg.task or {}).items():
        if "_target_" not in task:
            problems.append(f"task.{name} sets {', '.join(task)} but {name} is not in the task list "
                            f"({', '.join(listed_tasks(cfg))}): add it, "
                            f"e.g. task=[...,{name}], or drop its settings with ~task.{name}.")
            continue
        if task.get("weight", 1.0) < 0:
            problems.append(f"task.{name}.weight={task.weight}: weights must be >= 0.")
    if cfg.checkpoint.every_n_train_steps < 1:
        problems.append(f"checkpoint.every_n_train_steps={cfg.checkpoint.every_n_train_steps}: must be >= 1.")
    if cfg.data.batch_size < 2:
        problems.append(f"data.batch_size={cfg.data.batch_size}: must be >= 2 (pairs, BatchNorm).")
    problems += trainer_problems(cfg.trainer)
    problems += stage_problems(cfg)
    if problems:
        raise ConfigValueError("Invalid configuration:\n  " + "\n  ".join(problems))
    from mtl_unsup.extensions import check_extensions

    check_extensions(cfg)


K_CRITERIA = ("silhouette", "calinski_harabasz", "davies_bouldin")


def k_problems(cluster: Any) -> list[str]:
    k, k_range = cluster.k, list(cluster.k_range)
    if k == "auto":
        numbers = len(k_range) == 2 and all(isinstance(v, int) for v in k_range)
        if not numbers or not 2 <= k_range[0] < k_range[1]:
            return [f"cluster.k_range={k_range}: give [smallest, largest] k to try, 2 <= smallest < largest."]
        if cluster.k_criterion not in K_CRITERIA:
            return [f"cluster.k_criterion={cluster.k_criterion!r}: use one of {', '.join(K_CRITERIA)}."]
        return []
    if isinstance(k, bool) or not isinstance(k, int):
        return [f"cluster.k={k!r}: use a number of clusters (>= 2) or auto."]
    return [f"cluster.k={k}: at least 2 clusters are needed."] if k < 2 else []


def max_clusters(cluster: Any) -> int:
    """The heads' size: ``cluster.k``, or the top of ``cluster.k_range`` with ``cluster.k=auto``."""
    return int(cluster.k_range[1]) if cluster.k == "auto" else int(cluster.k)


# How the answer is chosen among the candidates (mtl_unsup/answer/candidates.py), label-free.
CHOOSE_CRITERIA = ("silhouette", "silhouette_last", "consensus", "last")


def cluster_problems(cluster: Any) -> list[str]:
    """The ``cluster`` group's assignment settings (see ``mtl_unsup.clustering.refresh``) and how
    the answer is chosen."""
    if cluster.get("choose", "last") not in CHOOSE_CRITERIA:
        return [f"cluster.choose={cluster.choose!r}: use one of {', '.join(CHOOSE_CRITERIA)}."]
    try:
        ClusterSettings.from_config(cluster)
    except ValueError as err:
        return [str(err)]
    return []


def _batches(value: Any) -> bool:
    """A number of batches (int >= 0) or a fraction (float in [0, 1]), as Lightning's limits take."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return value >= 0 if isinstance(value, int) else 0.0 <= value <= 1.0


def _devices(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int | str):
        return True
    return isinstance(value, Sequence) and all(isinstance(d, int) for d in value)


def _lightning_precisions() -> set[Any]:
    """The precision values ``lightning.pytorch.Trainer`` declares (the literals of its annotation)."""
    from lightning.pytorch import Trainer

    def literals(annotation: Any) -> set[Any]:
        args = typing.get_args(annotation)
        if typing.get_origin(annotation) is typing.Literal:
            return set(args)
        return set().union(*(literals(a) for a in args)) if args else set()

    return literals(inspect.signature(Trainer.__init__).parameters["precision"].annotation)


def trainer_problems(trainer: Any) -> list[str]:
    """Checks of the :class:`TrainerConfig` fields typed ``Any`` (Lightning takes several types)."""
    problems = []
    for key in ("limit_train_batches", "limit_val_batches", "limit_test_batches",
                "limit_predict_batches", "overfit_batches"):
        if trainer[key] is not None and not _batches(trainer[key]):
            problems.append(f"trainer.{key}={trainer[key]!r}: use a number of batches (int >= 0), a "
                            "fraction (float in [0, 1]) or null.")
    interval = trainer.val_check_interval
    if interval is not None and not (_batches(interval) or isinstance(interval, str | Mapping)):
        problems.append(f"trainer.val_check_interval={interval!r}: use a number of batches (int), a "
                        'fraction of an epoch (float), a time ("00:01:00:00") or null.')
    fast = trainer.fast_dev_run
    if not (isinstance(fast, bool) or isinstance(fast, int) and fast >= 0):
        problems.append(f"trainer.fast_dev_run={fast!r}: use true, false or a number of batches.")
    if not _devices(trainer.devices):
        problems.append(f"trainer.devices={trainer.devices!r}: use a count (2), a list of indices "
                        '([0,1]) or a string (auto, "0,1", -1).')
    allowed = _lightning_precisions() if trainer.precision != "32-true" else set()  # loads Lightning
    if allowed and trainer.precision not in allowed:
        problems.append(f"trainer.precision={trainer.precision!r}: use one of "
                        f"{', '.join(sorted(map(str, allowed)))}.")
    if trainer.max_time is not None and not isinstance(trainer.max_time, str | Mapping):
        problems.append(f"trainer.max_time={trainer.max_time!r}: use \"DD:HH:MM:SS\", a dict such as "
                        "{hours: 12}, or null.")
    if trainer.deterministic not in (True, False, None, "warn"):
        problems.append(f"trainer.deterministic={trainer.deterministic!r}: use true, false or warn.")
    return problems


def register_configs() -> None:
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    # the data options' schemas (conf/data/*.yaml name theirs in their defaults list)
    store.store(group="schema/data", name="images", node=DataConfig)
    store.store(group="schema/data", name="embeddings", node=EmbeddingDataConfig)
