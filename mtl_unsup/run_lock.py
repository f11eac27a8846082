"""One writer per run directory: an exclusive lock (``<run dir>/.lock``, ``flock``) taken before the
run decides anything about the directory, held until it ends. A second command aimed at a locked
directory stops at once, naming the process that holds it. The lock goes with the process that
held it, so one left by a killed run is simply taken (the run says whose it was).

Only the first process of a run locks (global rank 0): the other ranks of a multi-process run
write into the same directory on its behalf.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from mtl_unsup.resume import RunDirError

log = logging.getLogger(__name__)
LOCK = ".lock"
_held: dict[Path, int] = {}


def first_process() -> bool:
    """Whether this is the run's first process (the other ranks of DDP, and other nodes, are not)."""
    rank = next((os.environ[k] for k in ("RANK", "SLURM_PROCID", "LOCAL_RANK") if k in os.environ), "0")
    return rank == "0" and os.environ.get("NODE_RANK", "0") == "0"


def alive(pid: int, host: str) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: cannot tell, assume it runs
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def holder(text: str) -> dict[str, Any]:
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return {}


def acquire(run_dir: Path) -> bool:
    """Lock ``run_dir`` for this process; False if it already held it. A directory locked by
    another process is a :class:`RunDirError` naming it."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held or not first_process():
        return False
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        other = holder(os.pread(fd, 65536, 0).decode(errors="replace"))
        os.close(fd)
        who = (f"process {other.get('pid')} on {other.get('host')}, started {other.get('started')}: "
               f"{other.get('command')}") if other else "another process"
        raise RunDirError(f"{run_dir} is in use by another run ({who}). Wait for it to end or stop it, "
                          "or choose another hydra.run.dir.") from None
    before = holder(os.pread(fd, 65536, 0).decode(errors="replace"))
    if before.get("pid") and not alive(int(before["pid"]), str(before.get("host"))):
        log.warning("%s was locked by process %s, which ended without releasing it (killed?): taken over.",
                    run_dir, before["pid"])
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv)}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
    _held[run_dir] = fd
    return True


def release(run_dir: Path) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None:
        os.ftruncate(fd, 0)  # a released lock names nobody
        os.close(fd)


@contextmanager
def run_dir_lock(*run_dirs: Path) -> Iterator[None]:
    """Hold the lock of each directory (those this process did not hold already) for the block."""
    taken: list[Path] = []
    try:
        for run_dir in run_dirs:
            if acquire(run_dir):
                taken.append(run_dir)
        yield
    finally:
        for run_dir in taken:
            release(run_dir)


@contextmanager
def entry_lock(path: Path) -> Iterator[None]:
    """Wait for, then hold, the lock of one cache entry (``<path>.lock``): parallel jobs that share
    a cache compute an entry once, and none reads it half written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases it


class LockRunDir(Callback):
    """Hydra callback: the run directory is locked as soon as Hydra has composed the command's
    config, before the task function reads or writes anything in it."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        from mtl_unsup.cli import ReportedUserError

        try:
            acquire(Path(config.hydra.run.dir))
        except RunDirError as err:
            raise ReportedUserError(f"error: {err}") from None

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        release(Path(config.hydra.run.dir))
