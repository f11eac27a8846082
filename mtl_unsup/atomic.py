"""Files written whole or not at all: a temporary file in the same directory, flushed to disk and
renamed into place. A reader never sees half a file, and a write that fails (disk full, a kill, a
lost node) leaves the previous version as it was. A full disk or an unwritable directory is a
:class:`DiskFullError` that names the path and the free space."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mtl_unsup.errors import UserError

NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(UserError, OSError):
    """A file could not be written: no space left, a quota, or a directory that cannot be written."""


def free_space(path: Path) -> str:
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    try:
        return f"{shutil.disk_usage(folder).free / 2**20:.1f} MiB free"
    except OSError:
        return "free space unknown"


def write_failed(path: Path, err: OSError) -> DiskFullError:
    if err.errno in NO_SPACE:
        why = f"the disk is full ({free_space(path.parent)} on that file system)"
    elif err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "the directory cannot be written (permissions, or a read-only file system)"
    else:
        why = f"{err.strerror or err}"
    return DiskFullError(f"Could not write {path}: {why}. The previous version, if any, is intact. Free "
                         "space or point the output elsewhere (hydra.run.dir=...), then run again.")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without an error, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.part-{os.getpid()}")
    try:
        yield partial
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, path)
    except OSError as err:
        partial.unlink(missing_ok=True)
        raise write_failed(path, err) from err
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_with(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """``write(temporary path)`` then the rename: for writers that take a path (``torch.save``,
    ``np.save``, ``Image.save``, ``savefig``)."""
    with atomic_path(path) as partial:
        write(partial)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_with(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    return write_with(path, lambda p: p.write_bytes(data))
