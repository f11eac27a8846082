"""Every epoch's logged metrics in ``epochs.jsonl``, whichever loggers are on (or none).

The pictures (training curves) and the report read this file, so switching the logger to
TensorBoard, W&B or MLflow loses nothing. One JSON object a line: ``epoch``, ``step`` and the
scalar metrics measured in that epoch: training losses and learning rate always, validation scores
(``val/*``) when validation ran, clustering statistics (``cluster/*``) when the pseudo-labels were
refreshed (Lightning keeps the last value of a metric until it is logged again; those are left
out). A resumed run appends to the same file; :func:`read_history` keeps the last line of each
epoch.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L

HISTORY = "epochs.jsonl"


class EpochHistory(L.Callback):
    """Appends one line per training epoch (after its validation) to ``<out_dir>/epochs.jsonl``."""

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir) / HISTORY
        self.validated_epoch: int | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        targets = getattr(module, "targets", None)
        refreshed = targets is not None and targets.last_refresh == epoch
        stale = tuple(prefix for prefix, fresh in (("val/", self.validated_epoch == epoch),
                                                   ("cluster/", refreshed)) if not fresh)
        row: dict[str, Any] = {"epoch": epoch, "step": trainer.global_step}
        for name, value in sorted(trainer.callback_metrics.items()):
            if stale and name.startswith(stale):
                continue
            try:
                number = float(value)
            except (TypeError, ValueError):
                continue
            if math.isfinite(number):
                row[name] = number
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def read_history(path: Path) -> list[dict[str, float]]:
    """The rows of an ``epochs.jsonl``, one per epoch in order (the last written wins)."""
    rows: dict[int, dict[str, float]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[int(row["epoch"])] = row
    return [rows[e] for e in sorted(rows)]
