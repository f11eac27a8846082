"""scikit-learn's bundled digits written once as a real image folder (no download needed)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from mtl_unsup.errors import UserError
from mtl_unsup.run_lock import entry_lock

NUM_DIGITS = 1797


class ForeignFolderError(UserError, FileExistsError):
    """The digits cache path holds files mtl-unsup did not write; they are left alone."""


def write_digits_folder(root: str | Path) -> Path:
    """Write the 1,797 8x8 digits as ``root/<class>/<index>.png``, unless already there.

    The folder is built beside ``root`` and renamed into place, so a crash half way never leaves
    a partial folder that later runs would trust.
    """
    root = Path(root).expanduser()
    if complete(root):
        return root
    with entry_lock(root):  # parallel jobs sharing the cache: the first writes, the others wait
        return _write_digits_folder(root)


def complete(root: Path) -> bool:
    return root.is_dir() and sum(1 for _ in root.glob("*/*.png")) == NUM_DIGITS


def _write_digits_folder(root: Path) -> Path:
    from sklearn.datasets import load_digits

    if complete(root):  # written by another job while this one waited
        return root
    if root.exists() and any(root.iterdir()):
        raise ForeignFolderError(
            f"{root} exists but does not hold the {NUM_DIGITS} digit images. It was not written "
            "by mtl-unsup: move it away, or set paths.cache_dir (or MTL_UNSUP_CACHE) elsewhere."
        )
    digits = load_digits()
    pixels = np.clip(np.round(digits.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".digits-", dir=root.parent))
    try:
        for i, (img, target) in enumerate(zip(pixels, digits.target, strict=True)):
            folder = tmp / str(int(target))
            folder.mkdir(exist_ok=True)
            Image.fromarray(img, mode="L").save(folder / f"{i:04d}.png")
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root
