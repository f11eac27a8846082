"""What every row of the peer benchmark (:mod:`mtl_unsup.benchmarks.peers`) shares: the folder's
split, the row, the budget, and the child process a trained method runs in (same threads, timed)."""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROW_NAMES = {"lightly": "lightly-train SimCLR", "umap": "UMAP + k-means on pixels", "ours": "ours"}


class InputError(Exception):
    """Bad input to the benchmark: reported as one line, exit status 2."""


@dataclass
class Row:
    method: str
    acc: float | None = None
    nmi: float | None = None
    minutes: float | None = None
    notes: str = ""
    commands: list[str] = field(default_factory=list)
    measured: str = ""  # when, at which commit and in what budget: set for a row kept from an earlier run


@dataclass
class Split:
    root: Path
    train: Path
    test: Path
    classes: tuple[str, ...]
    n_train: int
    n_test: int

    @property
    def name(self) -> str:
        return self.root.name


# ---------------------------------------------------------------- data and budget


def split_to_dict(split: Split) -> dict:
    return {**{k: str(v) for k, v in asdict(split).items() if isinstance(v, Path)},
            "classes": list(split.classes), "n_train": split.n_train, "n_test": split.n_test}


def split_from_dict(d: dict) -> Split:
    return Split(Path(d["root"]), Path(d["train"]), Path(d["test"]), tuple(d["classes"]), d["n_train"],
                 d["n_test"])


def find_split(root: Path) -> Split:
    """The folder's ``train/`` and ``test/``, with class subfolders, or an :class:`InputError`."""
    from mtl_unsup.data.images import DataError, scan_folder

    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise InputError(f"--data {root}: no such folder.")
    missing = [s for s in ("train", "test") if not (root / s).is_dir()]
    if missing:
        raise InputError(f"--data {root}: no {' or '.join(f'{s}/' for s in missing)} subfolder; the "
                         "benchmark trains on train/ and scores on test/, each with class subfolders.")
    try:
        train = scan_folder(root / "train", labels="subfolders")
        test = scan_folder(root / "test", labels="subfolders", classes=train.classes)
    except DataError as err:
        raise InputError(f"--data {root}: {err}") from None
    return Split(root, root / "train", root / "test", train.classes, len(train), len(test))


def labelled_images(folder: Path, classes: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """Every image below ``folder`` (sorted, as training reads them) and its class index."""
    from mtl_unsup.data.images import scan_folder

    images = scan_folder(folder, labels="subfolders", classes=classes)
    return list(images.paths), np.asarray(images.labels, dtype=np.int64)


def auto_image_size(folder: Path) -> int:
    """The first image's longer side when it is at most 64 px (32 for CIFAR), else 224."""
    from PIL import Image

    first = labelled_images(folder, ())[0][0]
    with Image.open(first) as im:
        side = max(im.size)
    return side if side <= 64 else 224


def run_command(run: Callable[[argparse.Namespace, list[str]], Path],
                parse_args: Callable[[list[str]], argparse.Namespace], argv: Sequence[str] | None) -> Path:
    """A benchmark's command line: its report's path, or a mistake in what was asked told in one
    line with exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        return run(parse_args(args), args)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def budget_seconds(minutes: float) -> int:
    """The budget in whole seconds (at least one)."""
    return max(1, round(minutes * 60))


def thread_env(threads: int) -> dict[str, str]:
    """The environment for a child process: the same thread count, no telemetry."""
    env = dict(os.environ)
    for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[key] = str(threads)
    env["LIGHTLY_TRAIN_EVENTS_DISABLED"] = "1"
    return env


def set_threads(threads: int) -> None:
    """This process's torch and FAISS threads."""
    import faiss
    import torch

    torch.set_num_threads(threads)
    faiss.omp_set_num_threads(threads)


def children_cpu_seconds() -> float:
    """CPU time (user and system) of every child process waited for so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_logged(command: list[str], log: Path, threads: int,
               timeout_s: float) -> tuple[int | None, float, str]:
    """Run ``command`` with its output in ``log``: its exit status (None on timeout), wall minutes, and
    a note of the CPU minutes it got (on a shared machine, less than threads x wall)."""
    start, cpu = time.perf_counter(), children_cpu_seconds()
    with open(log, "w") as out:
        try:
            code: int | None = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT,
                                              env=thread_env(threads), timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, (time.perf_counter() - start) / 60, f"CPU {(children_cpu_seconds() - cpu) / 60:.1f} min"


def child_timeout(budget_s: int) -> float:
    """A child's hard limit: its budget three times over plus 10 minutes for setup and evaluation."""
    return 3 * budget_s + 600
