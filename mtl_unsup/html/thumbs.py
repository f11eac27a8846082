"""Small thumbnails of a run's images, packed into sprite sheets beside its ``report.html``.

A page of 50,000 images cannot load 50,000 files: the thumbnails are packed ``per_sheet`` to a
JPEG sheet, in the order the page shows them (by cluster, then confidence), so a cluster's most
and least confident images sit on a sheet or two, and the browser fetches a sheet only when a
thumbnail on it is drawn. Each thumbnail keeps its image's aspect ratio (letterboxed into the
square cell). The sheets are written once: a manifest of the image list and the order lets a
second report of the same images reuse them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from mtl_unsup.atomic import write_text, write_with
from mtl_unsup.data.images import load_image

SHEET_NAME = "sheet-{:04d}.jpg"
MANIFEST = "thumbs.json"
BACKGROUND = (238, 238, 238)


@dataclass(frozen=True)
class Sprites:
    """Where each image's thumbnail is: ``position[i]`` is image ``i``'s cell in the sheets' order
    (sheet ``position // per_sheet``, then row-major in a ``columns``-wide grid)."""

    folder: str  # relative to the page
    size: int
    per_sheet: int
    columns: int
    position: np.ndarray
    sheets: int

    def as_json(self) -> dict:
        return {"folder": self.folder, "size": self.size, "per_sheet": self.per_sheet,
                "columns": self.columns, "sheets": self.sheets, "position": self.position.tolist()}


def thumbnail(path: Path | str, size: int) -> Image.Image:
    """The image fitted into a ``size`` square, its aspect kept; a grey cell if it cannot be read."""
    try:
        image = load_image(path, 3)
    except Exception:  # a file gone or unreadable since training: an empty cell, not a lost report
        return Image.new("RGB", (size, size), BACKGROUND)
    scale = size / max(image.size)
    fitted = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    # shrunk smoothly; small images grown with their pixels kept sharp
    image = image.resize(fitted, Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST)
    return ImageOps.pad(image, (size, size), color=BACKGROUND) if fitted != (size, size) else image


def identity(paths: Sequence[Path | str], order: np.ndarray, size: int, per_sheet: int) -> str:
    digest = hashlib.sha256()
    for i in order.tolist():
        digest.update(str(paths[i]).encode() + b"\0")
    digest.update(f"{size}/{per_sheet}".encode())
    return digest.hexdigest()


def write_sprites(paths: Sequence[Path | str], order: np.ndarray, page_dir: Path,
                  folder: str = "report_files", size: int = 48, per_sheet: int = 256,
                  workers: int = 4) -> Sprites:
    """Thumbnails of ``paths`` in ``order`` into ``page_dir/folder``; reused when already there."""
    columns = int(math.ceil(math.sqrt(per_sheet)))
    position = np.empty(len(paths), dtype=np.int64)
    position[order] = np.arange(len(order))
    sheets = int(math.ceil(len(order) / per_sheet))
    sprites = Sprites(folder, size, per_sheet, columns, position, sheets)
    out = page_dir / folder
    key = identity(paths, order, size, per_sheet)
    manifest = out / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text()).get("identity") == key \
            and all((out / SHEET_NAME.format(s)).is_file() for s in range(sheets)):
        return sprites
    out.mkdir(parents=True, exist_ok=True)
    manifest.unlink(missing_ok=True)  # sheets being rewritten match no list until all are written
    rows = int(math.ceil(per_sheet / columns))
    with ThreadPoolExecutor(max(1, workers)) as pool:
        for s in range(sheets):
            members = order[s * per_sheet:(s + 1) * per_sheet]
            used_rows = int(math.ceil(len(members) / columns))
            sheet = Image.new("RGB", (columns * size, min(rows, used_rows) * size), BACKGROUND)
            for cell, thumb in enumerate(pool.map(lambda i: thumbnail(paths[i], size), members.tolist())):
                sheet.paste(thumb, ((cell % columns) * size, (cell // columns) * size))
            write_with(out / SHEET_NAME.format(s), functools.partial(sheet.save, format="JPEG", quality=85))
    write_text(manifest, json.dumps({"identity": key, "images": len(paths), "sheets": sheets}) + "\n")
    return sprites
