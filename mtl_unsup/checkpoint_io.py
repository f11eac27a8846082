"""Checkpoints written whole: Lightning's checkpoint writer, with the file written beside its
target, flushed and renamed into place (Lightning's own writes a temporary file elsewhere and
copies it over the target, so a save that fails midway destroyed the last good checkpoint). The
checkpoint it replaces stays as ``<name>.prev`` (a hard link: no copy), the fallback of a resume
when the newest turns out damaged."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mtl_unsup.atomic import write_with
from mtl_unsup.integrity import previous_of


def keep_previous(path: Path) -> None:
    """Link the checkpoint at ``path`` (if any) as ``<path>.prev``, replacing the older one."""
    if not path.is_file() or not zipfile.is_zipfile(path):  # a damaged one is no fallback
        return
    link = path.with_name(f".{path.name}.prev-{os.getpid()}")
    link.unlink(missing_ok=True)
    try:
        os.link(path, link)
        os.replace(link, previous_of(path))
    except OSError:  # a file system without hard links: no fallback, the write stays atomic
        link.unlink(missing_ok=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options.")
        path = Path(path)
        keep_previous(path)
        write_with(path, lambda partial: torch.save(checkpoint, partial))

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        previous_of(Path(path)).unlink(missing_ok=True)
