"""The models ``mtl-export`` writes: images -> features, images -> (cluster, confidence)."""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mtl_unsup.clustering.kmeans import ClusterState
from mtl_unsup.models.module import MultiTaskModule


class Features(nn.Module):
    """Images in [0, 1] -> backbone features, as ``MultiTaskModule.features`` computes them (rows:
    the identity). Parameter and buffer names are the checkpoint's (``mean``, ``std``, ``backbone.*``)."""

    def __init__(self, module: MultiTaskModule, invert: bool, rows: bool) -> None:
        super().__init__()
        self.rows, self.invert, self.channels_last = rows, invert, module.channels_last
        if not rows:
            self.backbone = module.backbone
            self.register_buffer("mean", module.mean.clone())
            self.register_buffer("std", module.std.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows:
            return x
        x = ((1.0 - x if self.invert else x) - self.mean) / self.std
        return self.backbone(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)


class Centroids(nn.Module):
    """``ClusterState.assign``: the nearest of the k-means centroids in the whitened space."""

    def __init__(self, state: ClusterState) -> None:
        super().__init__()
        for name in ("pca_mean", "pca_proj", "centroids"):
            self.register_buffer(name, getattr(state, name).float().clone())

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.normalize((features.float() - self.pca_mean) @ self.pca_proj, dim=1)
        distance, cluster = torch.cdist(z, self.centroids).min(dim=1)
        return cluster, torch.ones_like(distance)


class Clusterer(Features):
    """Features, then the run's answer: a clustering head (``tasks.<task>.*``, the checkpoint's
    names; only the answer's task is kept) or the k-means centroids (``cluster_state.*``)."""

    def __init__(self, module: MultiTaskModule, invert: bool, rows: bool) -> None:
        super().__init__(module, invert, rows)
        answer = module.answer()
        self.kmeans = answer is None
        if self.kmeans:
            self.cluster_state = Centroids(module.cluster_state)
        else:
            self.task, self.head, _ = module.heads[answer]
            self.tasks = nn.ModuleDict({self.task: module.tasks[self.task]})

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = super().forward(x)
        if self.kmeans:
            return self.cluster_state(features)
        logits = self.tasks[self.task].head_logits(features)[self.head]
        confidence, cluster = logits.float().softmax(dim=1).max(dim=1)
        return cluster, confidence


def write_model(model: nn.Module, fmt: str, path: Path, example: torch.Tensor, input_name: str,
                outputs: list[str]) -> None:
    if fmt == "state_dict":
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, path)
        return
    with warnings.catch_warnings():
        # torch >= 2.9 calls both tracers deprecated; they are what TorchScript is, and an ONNX
        # export without onnxscript (which torch.onnx's dynamo exporter needs)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.trace")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        if fmt == "torchscript":
            # the check runs the traced model on another batch size against the model itself
            torch.jit.trace(model, example, check_inputs=[(example[:1],)]).save(str(path))
        else:
            # the TorchScript-based exporter (torch < 2.5 has no other, nor the dynamo argument)
            legacy = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
            batch = {name: {0: "batch"} for name in (input_name, *outputs)}
            torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=outputs,
                              dynamic_axes=batch, opset_version=17, **legacy)
