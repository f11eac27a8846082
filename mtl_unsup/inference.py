"""Loading a trained model from its checkpoint alone, and running it over a folder of images."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from mtl_unsup.config import max_clusters
from mtl_unsup.data.dataset import ImageDataset
from mtl_unsup.data.images import ImageList
from mtl_unsup.errors import CheckpointError  # noqa: F401  (re-exported: raised here)
from mtl_unsup.integrity import checkpoint_problem
from mtl_unsup.models.factory import model_factory
from mtl_unsup.models.feature_input import FEATURES_TARGET
from mtl_unsup.models.module import MultiTaskModule


def load_checkpoint(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain data only, no code.

    ``key`` is the config key the path came from, named in the error messages.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"{key}={str(path)!r} does not exist. Point it at a .ckpt file of a run.")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{key}={str(path)!r} is {problem}. Use another checkpoint of the run (with "
                              f"resume=true a damaged last.ckpt falls back to last.ckpt.prev).")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{key}={str(path)!r} cannot be read as a checkpoint: {err}") from err
    if not isinstance(ckpt, dict) or "mtl_config" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{key}={str(path)!r} is not an mtl-unsup checkpoint (no config inside).")
    return ckpt


def model_from_checkpoint(path: str | Path) -> tuple[MultiTaskModule, DictConfig]:
    """Rebuild the trained model (eval mode, clustering state included) and its run config."""
    ckpt = load_checkpoint(path)
    cfg = OmegaConf.create(ckpt["mtl_config"])
    channels = int(cfg.data.get("channels", 1))  # data=embeddings: rows, no channels
    # the checkpoint holds the weights: nothing is fetched or read from where the run started
    fresh = {"weights_path": None, **({"pretrained": False} if "pretrained" in cfg.backbone else {})}
    backbone = instantiate(cfg.backbone, in_channels=channels, **fresh)
    tasks = {name: instantiate(task_cfg) for name, task_cfg in cfg.task.items()}
    views = cfg.data.augmentations if "augmentations" in cfg.data else cfg.data.views  # images | rows
    module = model_factory(cfg)(
        backbone, tasks, num_clusters=max_clusters(cfg.cluster), optimizer=None,
        augmentations={name: nn.Identity() for name in views},
        mean=[0.0] * channels, std=[1.0] * channels,  # the saved buffers replace these
        config=ckpt["mtl_config"], auto_k=cfg.cluster.k == "auto",
    )
    module.load_weights(ckpt, str(path))
    return module.eval(), cfg


@dataclass
class Predictions:
    """Per-image outputs, in the order of the image list."""

    features: np.ndarray
    clusters: np.ndarray
    confidence: np.ndarray
    distance: np.ndarray


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Run inference with BatchNorm's running statistics (and no dropout), then restore the mode.

    Lightning leaves a module in training mode after ``fit`` and ``test``; in training mode a
    prediction would depend on the other images of its batch.
    """
    modes = [(m, m.training) for m in module.modules()]  # a frozen part stays frozen
    module.eval()
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training


@torch.no_grad()
def predict_images(
    module: MultiTaskModule, cfg: DictConfig, images: ImageList, batch_size: int = 256,
    num_workers: int = 0, progress: bool = True, device: str | torch.device = "cpu",
) -> Predictions:
    """Stream ``images`` through the model in batches (see :func:`predict_loader`)."""
    if (cfg.get("backbone") or {}).get("_target_") == FEATURES_TARGET:
        raise CheckpointError("This model clusters rows of embeddings (it was trained with "
                              "data=embeddings), not images: give it embeddings, data=embeddings "
                              "data.path=<file>.")
    dataset = ImageDataset(images, int(cfg.data.channels), int(cfg.data.image_size),
                           bool(cfg.data.get("invert", False)))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    return predict_loader(module, loader, progress, device)


@torch.no_grad()
def predict_loader(module: MultiTaskModule, loader: DataLoader, progress: bool = True,
                   device: str | torch.device = "cpu") -> Predictions:
    """Every item of ``loader`` (images, or rows of features) through the model, in order.

    The cluster is the clustering head's choice (k-means' when there is no head), confidence its
    softmax probability, distance the whitened feature's distance to that cluster's centroid.
    Runs in eval mode whatever mode ``module`` is in, and leaves that mode as it was.
    """
    module = module.to(device)
    with eval_mode(module):
        return _predict(module, loader, progress, device)


def _predict(module: MultiTaskModule, loader: DataLoader, progress: bool,
             device: str | torch.device) -> Predictions:
    state = module.cluster_state
    if state is None and module.answer() is None:
        raise CheckpointError("This model has no clustering yet (saved before its first one, or "
                              "never trained): use the last.ckpt of a finished run.")
    feats, clusters, confidence, distance = [], [], [], []
    for batch in tqdm(loader, desc="predict", unit="batch", disable=not progress):
        out = module.predict_clusters(batch["image"].to(device), kmeans=module.answer() is None)
        if "logits" in out:
            probs = out["logits"].float().softmax(dim=1)
            conf, cluster = probs.max(dim=1)
        else:
            cluster, conf = out["kmeans"], torch.ones(len(out["kmeans"]))
        feats.append(out["features"].float().cpu())
        clusters.append(cluster.cpu())
        confidence.append(conf.cpu())
        if state is not None:
            distance.append(state.distance_to(out["features"], cluster))
    n = len(loader.dataset)
    return Predictions(
        features=torch.cat(feats).numpy() if feats else np.zeros((0, 0), np.float32),
        clusters=torch.cat(clusters).numpy() if clusters else np.zeros(0, np.int64),
        confidence=torch.cat(confidence).numpy() if confidence else np.zeros(0, np.float32),
        distance=torch.cat(distance).numpy() if distance else np.full(n, np.nan),
    )
