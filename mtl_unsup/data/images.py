"""Finding, checking and decoding image files.

Everything here runs before training starts, so that a bad file is reported once, by name,
instead of crashing a data-loader worker in the middle of an epoch.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from collections.abc import Iterable, Sequence
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
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            im.load()
            return to_mode(im, channels)


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


def check_image(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None when it decodes fully."""
    try:
        size = path.stat().st_size
    except OSError as err:  # a broken symlink, a file that vanished, no permission
        return f"cannot be read: {err.strerror or err}"
    try:
        if size == 0:
            return "empty file (0 bytes)"
        load_image(path, channels=3)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        return f"decompression bomb: {err}"
    except UnidentifiedImageError:
        return "not an image Pillow can read"
    except PermissionError:
        return "cannot be read: permission denied"
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        return f"corrupt or truncated: {err}"
    return None


def find_bad_images(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """Decode every file once and return those that fail, with the reason."""
    bad = []
    for path in paths:
        reason = check_image(path)
        if reason is not None:
            bad.append((path, reason))
    return bad


def drop_bad_images(images: ImageList, on_bad: str, what: str) -> ImageList:
    """Check every image of ``images``; warn about and skip (or raise on) the bad ones."""
    if on_bad not in ("skip", "raise", "ignore"):
        raise DataError(f"data.on_bad_image={on_bad!r} is not one of skip, raise, ignore.")
    if on_bad == "ignore":
        return images
    bad = find_bad_images(images.paths)
    if not bad:
        return images
    listing = "\n".join(f"  {p}: {why}" for p, why in bad[:50])
    more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
    if on_bad == "raise":
        raise DataError(
            f"{len(bad)} unreadable image(s) in the {what} set:\n{listing}{more}\n"
            "Remove or fix them, or set data.on_bad_image=skip to leave them out."
        )
    warnings.warn(
        f"Skipping {len(bad)} unreadable image(s) in the {what} set:\n{listing}{more}",
        stacklevel=2,
    )
    bad_set = {p for p, _ in bad}
    kept = [i for i, p in enumerate(images.paths) if p not in bad_set]
    if not kept:
        raise DataError(f"Every image of the {what} set is unreadable; see the list above.")
    return images.subset(kept)
