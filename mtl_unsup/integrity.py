"""Whether a checkpoint file is whole: a truncated or corrupt one is named for what it is (path,
size, what is wrong) instead of failing deep inside ``torch.load`` (a truncated file) or loading
silently wrong weights (a flipped bit: ``torch.load`` checks no checksum). A checkpoint is a zip
archive, whose end record and per-member CRC-32 tell both."""

from __future__ import annotations

import zipfile
from pathlib import Path


def previous_of(path: Path) -> Path:
    """Where the checkpoint that ``path`` replaced is kept (see :mod:`mtl_unsup.checkpoint_io`)."""
    return path.with_name(path.name + ".prev")


def checkpoint_problem(path: str | Path) -> str | None:
    """What is wrong with the checkpoint file at ``path``, as a phrase; None when it is whole."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    if not zipfile.is_zipfile(path):
        return (f"truncated, or not a checkpoint ({size:,} bytes, and the end record of its archive is "
                "missing: a write cut short?)")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, RuntimeError, EOFError) as err:
        return f"unreadable ({size:,} bytes: {err})"
    if bad is not None:
        return f"corrupt ({size:,} bytes: the stored {bad} fails its checksum, a flipped bit or a bad disk)"
    return None
