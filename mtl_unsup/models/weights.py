"""Backbone weights from a local file, whoever wrote it.

A state dict saved by mtl-unsup (``mtl-train``'s checkpoints), by Lightning, by solo-learn, by
timm or by plain ``torch.save`` is unwrapped (``state_dict``, ``model``, ``module`` containers)
and its key prefix (``backbone.``, ``model.``, ``module.``, ...) is found by matching the keys
against the model's own. Classifier and projector weights are left out; any other mismatch names
the missing and unexpected keys.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mtl_unsup.errors import UserError


class WeightsError(UserError, ValueError):
    """A weights file that cannot be read or does not fit the backbone; names the file and keys."""


# Keys of a classification or projection head: never part of a backbone, ignored when present.
HEAD_PREFIXES = ("fc.", "classifier.", "head.", "heads.", "head_dist.", "projector.", "prototypes.")
CONTAINERS = ("state_dict", "model", "module", "model_state", "backbone")


def read_file(path: str | Path) -> dict[str, Any]:
    """The raw content of a weights file (``.safetensors`` or anything ``torch.load`` reads)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"backbone.weights_path={str(path)!r} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"backbone.weights_path={str(path)!r} is not a weights file: "
                           f"{str(err).splitlines()[0]}") from None
    if not isinstance(content, dict):
        raise WeightsError(f"backbone.weights_path={str(path)!r} holds a {type(content).__name__}, "
                           "not a state dict.")
    return content


def tensors_of(content: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: the first container (``state_dict``, ``model``, ...)
    holding tensors, else the file's own tensors."""
    for key in CONTAINERS:
        inner = content.get(key)
        if isinstance(inner, dict) and any(isinstance(v, torch.Tensor) for v in inner.values()):
            return tensors_of(inner)
    return {k: v for k, v in content.items() if isinstance(v, torch.Tensor)}


def best_prefix(keys: list[str], own: set[str]) -> str:
    """The prefix whose removal makes the most ``keys`` the model's own (the shortest on a tie)."""
    candidates = {""}
    for key in keys:
        parts = key.split(".")
        candidates.update(".".join(parts[:j]) + "." for j in range(1, min(4, len(parts))))
    return max(sorted(candidates, key=len),
               key=lambda p: sum(k.startswith(p) and k[len(p):] in own for k in keys))


def backbone_state(content: dict[str, Any], model: nn.Module) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of ``content`` meant for ``model``, renamed to its keys; and the prefix removed."""
    state = tensors_of(content)
    own = set(model.state_dict())
    prefix = best_prefix(list(state), own)
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, prefix


def load_weights(model: nn.Module, path: str | Path, adapt: dict[str, int] | None = None,
                 optional: tuple[str, ...] = ()) -> None:
    """Load the backbone weights in ``path`` into ``model``; every weight must be found and fit.

    ``adapt``: key -> input channels of the model, for first convolutions whose file weights are
    RGB and the model's are not (summed over the colour channels, as timm and torchvision do).
    ``optional``: keys loaded only where the file's fit (a replaced stem keeps its own otherwise).
    """
    state, prefix = backbone_state(read_file(path), model)
    own = model.state_dict()
    for key, channels in (adapt or {}).items():
        if key in state and state[key].ndim == 4 and state[key].shape[1] == 3 and channels == 1:
            state[key] = state[key].sum(dim=1, keepdim=True)
    for key in optional:
        if key not in state or state[key].shape != own[key].shape:
            state[key] = own[key]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.startswith(HEAD_PREFIXES)]
    wrong = [f"{k} {tuple(state[k].shape)} (model: {tuple(own[k].shape)})"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        where = f" (after removing the prefix {prefix!r})" if prefix else ""
        raise WeightsError(
            f"backbone.weights_path={str(path)!r} does not fit backbone {type(model).__name__}{where}: "
            + "; ".join(f"{len(v)} {what} {v[:4]}" for what, v in (
                ("missing key(s)", missing), ("unexpected key(s)", unexpected), ("of the wrong shape", wrong))
                if v)
            + ". Use weights of the same architecture (backbone.name) and input channels.")
    model.load_state_dict({k: state[k] for k in own})


def file_digest(path: str | Path, chunk: int = 1 << 20) -> str:
    """Short SHA-256 of a file: which weights a run used, recorded in its checkpoint."""
    digest = hashlib.sha256()
    with open(Path(path).expanduser(), "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def saved_input(path: str | Path) -> dict[str, Any]:
    """``image_size``, ``mean`` and ``std`` of the run that wrote an mtl-unsup checkpoint (empty
    for any other file): weights pretrained by mtl-unsup expect that run's input."""
    content = read_file(path)
    data = (content.get("mtl_config") or {}).get("data") or {}
    return {k: data[k] for k in ("image_size", "mean", "std") if data.get(k) is not None}
