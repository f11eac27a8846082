"""``report.html`` of a trained model's predictions (``mtl-predict``, ``mtl-evaluate``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, OmegaConf

from mtl_unsup.html.content import ReportInputs
from mtl_unsup.html.page import write_report


def write_prediction_report(out_dir: Path, kind: str, module: Any, train_cfg: DictConfig,
                            paths: Sequence[Path] | None, preds: Any, labels: np.ndarray | None = None,
                            classes: Sequence[str] = (), metrics: Mapping[str, float] | None = None,
                            sample: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """The page of ``preds`` (clusters, confidence, features of the images at ``paths``); the
    t-SNE ``sample`` is drawn here unless given."""
    from mtl_unsup.visualize import tsne_sample

    if sample is None and len(preds.features) >= 10:
        sample = tsne_sample(preds.features, seed=int(train_cfg.get("seed", 0)))
    numbers = {key: float(v) for key, v in (metrics or {}).items() if isinstance(v, (int, float))}
    return write_report(out_dir, ReportInputs(
        f"{kind}: {out_dir.name}", kind, preds.clusters, preds.confidence, paths, labels, classes, sample,
        metrics=numbers, answer=module.explain_answer(), config=OmegaConf.to_yaml(train_cfg),
        split=kind, k=module.k))
