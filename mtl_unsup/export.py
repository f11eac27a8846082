"""Export a trained model for use without mtl-unsup: ``mtl-export ckpt=<run>/checkpoints/last.ckpt``.

Two models go into the output folder (``hydra.run.dir``), in ``format=torchscript`` (the default:
``backbone.pt``, ``clusterer.pt``), ``onnx`` (``backbone.onnx``, ``clusterer.onnx``, batch axis
dynamic) or ``state_dict`` (``backbone_state_dict.pt``, ``clusterer_state_dict.pt``: tensors
only, each named as in the checkpoint), with ``export.json`` describing them:

- ``backbone``: images -> ``features`` (N x D), what ``mtl-predict save_embeddings=true`` writes;
- ``clusterer``: images -> ``cluster`` (N, int64) and ``confidence`` (N, float32), the clusters
  and confidences of ``predictions.csv``: the run's answer head (its softmax probability), or,
  when the answer is k-means, the nearest centroid in the whitened space (confidence 1).

Input: float32 images N x C x S x S in [0, 1] at the checkpoint's channels C and size S, each
decoded as mtl-predict decodes it (8-bit L for C=1 or RGB for C=3, resized to S x S, bilinear
with antialiasing, divided by 255). ``data.invert``, the mean/std normalisation and channels-last
are inside the models. A model trained on rows (``data=embeddings``) takes rows (N x D float32)
and exports the clusterer alone: its backbone is the identity.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from mtl_unsup.cli import hydra_command
from mtl_unsup.config import ConfigValueError
from mtl_unsup.errors import CheckpointError
from mtl_unsup.predict import refuse_to_overwrite

if TYPE_CHECKING:  # torch loads when the command runs, not for --help or a config error
    from mtl_unsup.models.module import MultiTaskModule

FORMATS = {"torchscript": "{}.pt", "onnx": "{}.onnx", "state_dict": "{}_state_dict.pt"}
OUTPUTS = {"backbone": ["features"], "clusterer": ["cluster", "confidence"]}


@dataclass
class ExportConfig:
    ckpt: str = MISSING
    format: str = "torchscript"
    out_dir: str = "${hydra:runtime.output_dir}"
    overwrite: bool = False


ConfigStore.instance().store(name="export_schema", node=ExportConfig)


def check_format(cfg: DictConfig) -> None:
    """``format`` is known and its package installed (before torch loads)."""
    if cfg.format not in FORMATS:
        raise ConfigValueError(f"format={cfg.format!r} is not one of {', '.join(FORMATS)}: pass e.g. "
                               "format=torchscript.")
    if cfg.format == "onnx" and find_spec("onnx") is None:
        raise ConfigValueError("format=onnx needs the onnx package: pip install 'mtl-unsup[export]' "
                               "(or pip install onnx), or pass format=torchscript.")


def exportable(cfg: DictConfig) -> tuple[MultiTaskModule, DictConfig]:
    """The checkpoint's model (eval mode) and its run config."""
    from mtl_unsup.inference import model_from_checkpoint

    module, train_cfg = model_from_checkpoint(cfg.ckpt)
    if module.cluster_state is None and module.answer() is None:
        raise CheckpointError(f"ckpt={cfg.ckpt!r} has no clustering yet (saved before its first one, or "
                              "never trained): use the last.ckpt of a finished run.")
    return module, train_cfg


def input_spec(module: MultiTaskModule, train_cfg: DictConfig, rows: bool) -> dict:
    """The models' input, as ``export.json`` states it."""
    if rows:
        return {"kind": "rows", "shape": ["N", module.backbone.feature_dim], "dtype": "float32"}
    c, s = int(train_cfg.data.channels), int(train_cfg.data.image_size)
    return {"kind": "images", "shape": ["N", c, s, s], "dtype": "float32", "range": [0.0, 1.0],
            "channels": c, "image_size": s,
            "decode": f"8-bit {'L' if c == 1 else 'RGB'}, resized to {s}x{s} (bilinear, antialiased), "
                      "divided by 255",
            "inside_the_models": "1 - x when invert, then (x - mean) / std",
            "invert": bool(train_cfg.data.get("invert", False)),
            # float32 buffers as their shortest decimals (0.3, not 0.30000001192092896)
            "mean": [float(f"{v:.7g}") for v in module.mean.flatten().tolist()],
            "std": [float(f"{v:.7g}") for v in module.std.flatten().tolist()]}


def description(module: MultiTaskModule, train_cfg: DictConfig, cfg: DictConfig, files: dict[str, str],
                spec: dict) -> dict:
    """``export.json``: the files, the input contract, the outputs, k, the answer, the backbone."""
    answer = module.answer()
    return {
        "checkpoint": str(Path(cfg.ckpt).expanduser().resolve()), "format": cfg.format, "files": files,
        "input": spec, "outputs": {name: OUTPUTS[name] for name in files},
        "feature_dim": module.backbone.feature_dim, "k": module.k, "answer": answer or "kmeans",
        "cluster": "the answer head's argmax, confidence its softmax probability" if answer else
                   "nearest k-means centroid in the whitened space, confidence 1",
        "backbone": OmegaConf.to_container(train_cfg.backbone, resolve=True),
        "channels_last": module.channels_last,
        **({"weights": "names as in the checkpoint's state_dict; cluster_state.*: its k-means "
                       "(ClusterState.assign)"} if cfg.format == "state_dict" else {}),
    }


def export(cfg: DictConfig) -> Path:
    """Write the models ``cfg`` asks for; returns the output folder."""
    check_format(cfg)
    import torch

    with torch.no_grad():
        return _export(cfg)


def _export(cfg: DictConfig) -> Path:
    import torch

    from mtl_unsup.export_models import Clusterer, Features, write_model
    from mtl_unsup.models.feature_input import FEATURES_TARGET

    module, train_cfg = exportable(cfg)
    rows = train_cfg.backbone.get("_target_") == FEATURES_TARGET
    out_dir = Path(cfg.out_dir)
    files = {name: FORMATS[cfg.format].format(name) for name in (["clusterer"] if rows else OUTPUTS)}
    if not cfg.overwrite:
        refuse_to_overwrite([out_dir / f for f in (*files.values(), "export.json")])
    invert, spec = bool(train_cfg.data.get("invert", False)), input_spec(module, train_cfg, rows)
    models = {"backbone": Features(module, invert, rows), "clusterer": Clusterer(module, invert, rows)}
    example = torch.rand(2, *spec["shape"][1:], generator=torch.Generator().manual_seed(0))
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, file in files.items():
        write_model(models[name].eval(), cfg.format, out_dir / file, example, spec["kind"], OUTPUTS[name])
    info = description(module, train_cfg, cfg, files, spec)
    (out_dir / "export.json").write_text(json.dumps(info, indent=2) + "\n")
    shape = "x".join(map(str, spec["shape"]))
    print(f"answer: {info['answer']} (k={module.k}); input: {spec['kind']} {shape}")
    for name, file in files.items():
        print(f"{name}: {out_dir / file}")
    print(f"described in {out_dir / 'export.json'}")
    return out_dir


@hydra_command("export")
def main(cfg: DictConfig) -> None:
    export(cfg)


if __name__ == "__main__":
    main()

