"""Finding, checking and decoding image files.

Before training starts every file's size and header are checked, so that most bad files are
reported once, by name, in a second or two; a file whose pixel data turns out corrupt when it is
decoded later is skipped and named then (see :class:`~mtl_unsup.data.dataset.ImageDataset`),
never a crash in a data-loader worker.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mtl_unsup.errors import UserError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
)


class DataError(UserError, ValueError):
    """A problem with the user's images or folders, with a message that says how to fix it."""


@dataclass(frozen=True)
class ImageList:
    """Image paths with their class index (-1 when the folder has no class subfolders)."""

    paths: tuple[Path, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        return bool(self.classes)

    def subset(self, keep: Sequence[int]) -> ImageList:
        return ImageList(
            tuple(self.paths[i] for i in keep), tuple(self.labels[i] for i in keep), self.classes
        )

    def fingerprint(self) -> str:
        """A digest of the list, in order: each file's path below the common folder, its size
        and its first 4 KiB (which differ between images even in fixed-size formats).

        Pseudo-labels are stored by position in this list; the digest tells whether a checkpoint's
        labels belong to these images (moving the whole folder elsewhere keeps it).
        """
        digest = hashlib.sha256()
        common = Path(os.path.commonpath(self.paths)) if self.paths else Path()
        for path in self.paths:
            try:
                with open(path, "rb") as f:
                    head = f.read(4096)
                size = path.stat().st_size
            except OSError:
                head, size = b"", -1
            digest.update(f"{path.relative_to(common).as_posix()}\0{size}\0".encode() + head)
        return digest.hexdigest()[:16]


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _walk_images(root: Path) -> list[Path]:
    """All image files below ``root``, following symlinks but never the same folder twice."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        key = (st.st_dev, st.st_ino)
        if key in seen:  # a symlink loop or a second link to a folder already read
            log.warning("Skipping %s: this folder was already read (symlink loop?)", dirpath)
            dirnames[:] = []
            continue
        seen.add(key)
        dirnames.sort()
        hidden = [d for d in dirnames if d.startswith(".")]
        for d in hidden:
            dirnames.remove(d)
        found.extend(
            Path(dirpath) / f
            for f in sorted(filenames)
            if not f.startswith(".") and is_image_file(Path(f))
        )
    return found


def scan_folder(
    root: str | Path, labels: str = "auto", classes: Sequence[str] | None = None
) -> ImageList:
    """Find the images below ``root``.

    Args:
        root: folder to read recursively.
        labels: ``auto`` takes the first-level subfolder names as classes when every image sits in
            one, ``subfolders`` demands that, ``none`` ignores any structure. Classes are only
            ever used for evaluation.
        classes: class names already known from another split, so indices agree across splits.
    """
    if labels not in ("auto", "subfolders", "none"):
        raise DataError(f"data.labels={labels!r} is not one of auto, subfolders, none.")
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"Image folder {root} does not exist. Set data.root to a folder of images.")
    if not root.is_dir():
        raise DataError(f"{root} is not a folder. Set data.root to a folder of images.")
    paths = _walk_images(root)
    if not paths:
        raise DataError(
            f"No images found in {root} (looked for {', '.join(IMAGE_EXTENSIONS)} recursively). "
            "Point data.root at a folder that holds image files."
        )
    rel_parts = [p.relative_to(root).parts for p in paths]
    in_subfolder = [len(parts) > 1 for parts in rel_parts]
    use_labels = labels == "subfolders" or (labels == "auto" and all(in_subfolder))
    if labels == "subfolders" and not all(in_subfolder):
        loose = [str(p) for p, sub in zip(paths, in_subfolder, strict=True) if not sub][:3]
        raise DataError(
            f"data.labels=subfolders but {root} has images outside class subfolders, e.g. {loose}. "
            "Move them into a class folder or set data.labels=auto."
        )
    if labels == "auto" and any(in_subfolder) and not all(in_subfolder):
        log.warning("%s mixes loose images and subfolders: treating it as unlabelled.", root)
    if not use_labels:
        return ImageList(tuple(paths), (-1,) * len(paths), ())
    names = list(classes or [])
    for parts in rel_parts:
        if parts[0] not in names:
            names.append(parts[0])
    if not classes:
        names.sort()
    index = {n: i for i, n in enumerate(names)}
    return ImageList(tuple(paths), tuple(index[parts[0]] for parts in rel_parts), tuple(names))


def load_image(path: str | Path, channels: int) -> Image.Image:
    """Decode an image into 8-bit ``L`` (channels=1) or ``RGB`` (channels=3).

    16-bit and float images are rescaled to 8 bits instead of clipped; transparent images are
    composited on white; palette, CMYK and the rest go through Pillow's conversion.
    """
    with open_checked(path) as im:
        im.load()
        return to_mode(im, channels)


# Pillow warns about images over Image.MAX_IMAGE_PIXELS (and raises over twice that); open_checked
# refuses them itself. A warnings filter made an error inside each call would not be thread-safe,
# and the decoding runs in threads.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, module="PIL")


def open_checked(path: str | Path) -> Image.Image:
    """``Image.open`` (the header only), refusing an image over ``Image.MAX_IMAGE_PIXELS``."""
    im = Image.open(path)
    limit = Image.MAX_IMAGE_PIXELS
    if limit and im.size[0] * im.size[1] > limit:
        im.close()
        raise Image.DecompressionBombError(
            f"{im.size[0]} x {im.size[1]} pixels, over the limit of {limit} (PIL.Image.MAX_IMAGE_PIXELS)")
    return im


def to_mode(im: Image.Image, channels: int) -> Image.Image:
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        im = Image.fromarray(scaled.round().astype(np.uint8), mode="L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("L" if channels == 1 else "RGB")


def _why_unreadable(path: Path, read: Callable[[Path], object]) -> str | None:
    """Why ``read(path)`` fails, in words, or None when it succeeds."""
    try:
        size = path.stat().st_size
    except OSError as err:  # a broken symlink, a file that vanished, no permission
        return f"cannot be read: {err.strerror or err}"
    try:
        if size == 0:
            return "empty file (0 bytes)"
        read(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"decompression bomb: {err}"
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except PermissionError:
        return "cannot be read: permission denied"
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        return f"corrupt or truncated: {err}"
    return None


def _read_header(path: Path) -> None:
    with open_checked(path) as im:  # parses the header only: format, mode and size
        if min(im.size) < 1:
            raise ValueError(f"image of size {im.size}")


def try_load_image(path: Path, channels: int) -> tuple[Image.Image | None, str | None]:
    """:func:`load_image`, or None and why the file cannot be decoded (no exception)."""
    decoded: list[Image.Image] = []
    why = _why_unreadable(path, lambda p: decoded.append(load_image(p, channels)))
    return (decoded[0] if decoded else None), why


def check_image(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes fully."""
    return _why_unreadable(path, lambda p: load_image(p, channels=3))


def check_header(path: Path) -> str | None:
    """Why ``path`` cannot be an image, judged from its size and header alone (no decoding), or
    None. Finds empty, unreadable and non-image files and decompression bombs; a file whose pixel
    data is truncated or corrupt passes, and is found when it is decoded."""
    return _why_unreadable(path, _read_header)


def find_bad_images(paths: Sequence[Path], decode: bool = True,
                    threads: int = 4) -> list[tuple[Path, str]]:
    """The files of ``paths`` that fail :func:`check_image` (``decode``) or :func:`check_header`,
    with the reason, in order. A few threads, each checking a run of files, overlap the reads
    of a slow disk."""
    check = check_image if decode else check_header
    bounds = np.linspace(0, len(paths), max(1, threads) + 1).astype(int)

    def run(part: int) -> list[tuple[Path, str]]:
        found = ((p, check(p)) for p in paths[bounds[part]:bounds[part + 1]])
        return [(p, why) for p, why in found if why is not None]

    with ThreadPoolExecutor(max(1, threads)) as pool:
        return [bad for part in pool.map(run, range(len(bounds) - 1)) for bad in part]


def list_files(bad: Sequence[tuple[Path, str]], most: int = 50) -> str:
    """Bad files with their reasons, one a line, the first ``most`` of them, for a message."""
    lines = [f"  {path}: {why}" for path, why in bad[:most]]
    if len(bad) > most:
        lines.append(f"  ... and {len(bad) - most} more")
    return "\n".join(lines)


def drop_bad_images(images: ImageList, on_bad: str, what: str, decode: bool | None = None) -> ImageList:
    """Check every image of ``images``; warn about and skip (or raise on) the bad ones.

    ``skip`` checks headers only (a second or two for 60,000 files): a file that fails later, when
    it is decoded, is skipped then (see :class:`~mtl_unsup.data.dataset.ImageDataset`). ``raise``
    decodes every file now, so that no bad file is found later. ``decode`` overrides the choice.
    """
    if on_bad not in ("skip", "raise", "ignore"):
        raise DataError(f"data.on_bad_image={on_bad!r} is not one of skip, raise, ignore.")
    if on_bad == "ignore":
        return images
    start = time.perf_counter()
    bad = find_bad_images(images.paths, decode=on_bad == "raise" if decode is None else decode)
    log.debug("Checked the %d %s images in %.1f s", len(images), what, time.perf_counter() - start)
    if not bad:
        return images
    listing = list_files(bad)
    if on_bad == "raise":
        raise DataError(
            f"{len(bad)} unreadable image(s) in the {what} set:\n{listing}\n"
            "Remove or fix them, or set data.on_bad_image=skip to leave them out."
        )
    warnings.warn(
        f"Skipping {len(bad)} unreadable image(s) in the {what} set:\n{listing}",
        stacklevel=2,
    )
    bad_set = {p for p, _ in bad}
    kept = [i for i, p in enumerate(images.paths) if p not in bad_set]
    if not kept:
        raise DataError(f"Every image of the {what} set is unreadable; see the list above.")
    return images.subset(kept)
