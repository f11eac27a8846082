"""What a report reads from its run directory: ``metrics.json``, ``run_info.json``, the composed
config, the epoch history and ``k_selection.csv`` (whichever are there)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

CURVES = ("cluster/train_acc", "cluster/train_nmi", "val/acc", "val/nmi", "val/kmeans_acc", "val/silhouette")


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):  # a report describes what it can; a broken file is left out
        return {}


def curves(history: Path | None) -> dict[str, list[tuple[int, float]]]:
    """The losses and clustering figures of each epoch (as ``training_curves.png`` draws them)."""
    from mtl_unsup.history import read_history

    series: dict[str, list[tuple[int, float]]] = {}
    if history is None or not history.is_file():
        return series
    for row in read_history(history):
        for key, value in row.items():
            if key.startswith("train/loss") or key in CURVES:
                series.setdefault(key, []).append((int(row["epoch"]), float(value)))
    return series


def k_scores(path: Path) -> tuple[dict[int, float], str]:
    if not path.is_file():
        return {}, ""
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    return {int(r[0]): float(r[1]) for r in rows[1:]}, rows[0][1]


def run_files(out_dir: Path, history: Path | None = None, config: Path | None = None) -> dict[str, Any]:
    """Keyword arguments of :class:`~mtl_unsup.html.content.ReportInputs` read from ``out_dir``."""
    config = config or out_dir / ".hydra" / "config.yaml"
    scores, criterion = k_scores(out_dir / "k_selection.csv")
    return {"metrics": read_json(out_dir / "metrics.json"),
            "run_info": read_json(out_dir / "run_info.json"),
            "config": config.read_text() if config.is_file() else "",
            "curves": curves(history or out_dir / "epochs.jsonl"),
            "k_selection": scores, "k_criterion": criterion}
