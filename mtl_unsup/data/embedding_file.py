"""Embeddings a user computed elsewhere, read from one file and checked before any training.

Formats (``data.path``):

- ``.npz``: an ``embeddings`` array, ``(N, D)``, or ``(N, 1 + copies, D)`` with augmented copies
  after the plain row; optional ``paths`` (strings) and ``labels`` (integers or class names).
- ``.npy``: the array alone; ``data.paths_file`` names a text file with one path per line (as
  ``mtl-predict save_embeddings=true`` writes ``embeddings.npy`` and ``embedding_paths.txt``).
- ``.parquet``: a column of embedding vectors (lists), or one numeric column per dimension;
  optional path and label columns (needs ``pyarrow``: ``pip install 'mtl-unsup[parquet]'``).

Arrays and columns are found by the usual names (``embeddings``/``embedding``/``features``,
``paths``/``path``/``file``, ``labels``/``label``/``class``), or named with ``data.key``,
``data.paths_key`` and ``data.labels_key``. Without labels in the file, paths of the form
``<folder>/<class>/<file>`` give them (``data.labels=auto``), as class subfolders do for images.
Labels are for evaluation only.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtl_unsup.data.images import DataError

log = logging.getLogger(__name__)

NAMES = {
    "key": ("embeddings", "embedding", "features", "feature", "emb", "x"),
    "paths_key": ("paths", "path", "filepath", "file", "filename", "image", "image_path"),
    "labels_key": ("labels", "label", "class", "target", "y"),
}
SUFFIXES = (".npz", ".npy", ".parquet", ".pq")
LABEL_MODES = ("auto", "subfolders", "none")


@dataclass(frozen=True)
class EmbeddingTable:
    """The file's rows: ``features`` ``(N, slots, D)``; ``labels`` -1 where unknown."""

    features: np.ndarray
    paths: tuple[Path, ...] | None
    labels: tuple[int, ...]
    classes: tuple[str, ...]


def _columns_npz(path: Path) -> dict[str, Any]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {name: npz[name] for name in npz.files}
    except ValueError as err:
        if "pickle" not in str(err):
            raise
        raise DataError(f"data.path={path}: an array is stored as Python objects. Save strings as "
                        "such: np.savez(path, embeddings=x, paths=np.array(paths, dtype=str)).") from None


def _columns_parquet(path: Path) -> dict[str, Any]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"data.path={path}: reading Parquet needs pyarrow. Install it with "
                        "pip install 'mtl-unsup[parquet]' (or pip install pyarrow).") from None
    table = pq.read_table(path)
    if table.num_rows == 0:
        raise DataError(f"data.path={path}: the table has no rows.")
    return {name: table.column(name).combine_chunks() for name in table.column_names}


def _vectors(column: Any, name: str, where: Path) -> np.ndarray:
    """A Parquet column of equal-length lists as ``(N, D)``; a numpy array as it is."""
    if isinstance(column, np.ndarray):
        return column
    import pyarrow as pa
    import pyarrow.compute as pc

    if not pa.types.is_list(column.type) and not pa.types.is_fixed_size_list(column.type) \
            and not pa.types.is_large_list(column.type):
        return column.to_numpy()
    if column.null_count:
        row = int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise DataError(f"data.path={where}: row {row} of column {name!r} has no embedding.")
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False)
    if len(lengths) and np.any(lengths != lengths[0]):
        bad = int(np.flatnonzero(lengths != lengths[0])[0])
        raise DataError(f"data.path={where}: column {name!r} holds vectors of different lengths "
                        f"(row 0 has {lengths[0]}, row {bad} has {lengths[bad]}).")
    flat = pc.list_flatten(column).to_numpy(zero_copy_only=False)
    return flat.reshape(len(lengths), -1)


def _pick(columns: dict[str, Any], key: str, given: str | None, where: Path) -> str | None:
    """The column for ``key``: the one named in ``data.<key>``, else the first usual name."""
    if given is not None:
        if given not in columns:
            raise DataError(f"data.{key}={given!r} is not in {where} (it has: {', '.join(columns)}).")
        return given
    lower = {name.lower(): name for name in columns}
    return next((lower[n] for n in NAMES[key] if n in lower), None)


def _features(columns: dict[str, Any], given: str | None, used: set[str], where: Path) -> np.ndarray:
    """The embeddings: the array or column named (or found by its usual name); else the only
    numeric array of an .npz, or Parquet columns ``<prefix><number>``, one per dimension."""
    name = _pick(columns, "key", given, where)
    if name is not None:
        return _vectors(columns[name], name, where)
    numeric = [n for n, c in columns.items() if n not in used and _dtype(c).kind in "fiu"]
    if where.suffix.lower() == ".npz":
        if len(numeric) == 1:  # np.savez(path, x) names it arr_0
            log.info("Embeddings: the array %r of %s", numeric[0], where)
            return columns[numeric[0]]
    else:
        groups: dict[str, list[tuple[int, str]]] = {}
        for n in numeric:
            if (match := re.fullmatch(r"(.*?)(\d+)", n)) and _dtype(columns[n]).kind == "f":
                groups.setdefault(match.group(1), []).append((int(match.group(2)), n))
        prefix = max(groups, key=lambda g: len(groups[g]), default=None)
        if prefix is not None and len(groups[prefix]) >= 2 and sum(len(g) >= 2 for g in groups.values()) == 1:
            dims = [n for _, n in sorted(groups[prefix])]
            log.info("Embeddings: columns %s ... %s of %s (%d dimensions)", dims[0], dims[-1], where,
                     len(dims))
            return np.stack([_vectors(columns[n], n, where) for n in dims], axis=1)
    raise DataError(f"data.path={where}: which embeddings? It has: {', '.join(columns) or 'nothing'}. "
                    "Name the array or column with data.key=<name>, or save it as 'embeddings' "
                    "(Parquet: a column of vectors, or one column per dimension named <prefix><number>).")


def _dtype(column: Any) -> np.dtype:
    if isinstance(column, np.ndarray):
        return column.dtype
    try:
        return np.dtype(column.type.to_pandas_dtype())
    except (NotImplementedError, TypeError):
        return np.dtype(object)


def _checked(features: np.ndarray, where: Path) -> np.ndarray:
    if features.dtype.kind not in "fiu":
        raise DataError(f"data.path={where}: the embeddings are {features.dtype}, not numbers.")
    if features.ndim == 2:
        features = features[:, None, :]
    if features.ndim != 3 or features.shape[0] < 2 or features.shape[1] < 1 or features.shape[2] < 1:
        raise DataError(f"data.path={where}: the embeddings have shape {features.shape}; expected "
                        "(N, D), or (N, 1 + copies, D), with N >= 2.")
    if features.dtype not in (np.float16, np.float32):
        features = features.astype(np.float32)
    for start in range(0, len(features), 65536):  # a bad row stops the run now, not at epoch 3
        finite = np.isfinite(features[start:start + 65536]).reshape(min(65536, len(features) - start), -1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite.all(axis=1))[0])
            raise DataError(f"data.path={where}: row {row} of the embeddings holds NaN or infinity. "
                            "Drop or recompute it.")
    return features


def _paths(columns: dict[str, Any], given: str | None, paths_file: str | None, n: int, where: Path,
           image_root: str | None) -> tuple[Path, ...] | None:
    if paths_file is not None:
        source = Path(paths_file).expanduser()
        if not source.is_file():
            raise DataError(f"data.paths_file={paths_file!r} does not exist.")
        try:
            lines = source.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            raise DataError(f"data.paths_file={paths_file!r} is not UTF-8 text: one path per line.") from None
        values: list[Any] = [line for line in lines if line.strip()]
        what = f"data.paths_file={paths_file!r}"
    else:
        name = _pick(columns, "paths_key", given, where)
        if name is None:
            return None
        column = columns[name]
        values = np.ravel(column).tolist() if isinstance(column, np.ndarray) else column.to_pylist()
        what = f"the {name!r} column of {where}"
        if not all(isinstance(v, str) for v in values):
            bad = next(i for i, v in enumerate(values) if not isinstance(v, str))
            raise DataError(f"{what} is not a column of paths (row {bad} is {type(values[bad]).__name__}). "
                            "Name the paths with data.paths_key, or give data.paths_file.")
    if len(values) != n:
        raise DataError(f"{what} has {len(values)} paths for {n} embeddings: one path per row, in order.")
    paths = [Path(v) for v in values]
    relative = next((p for p in paths if not p.is_absolute()), None)
    base = where.parent
    if image_root:
        base = Path(image_root).expanduser()
    elif relative is not None and not (base / relative).exists() and relative.exists():
        base = Path.cwd()  # written relative to where the tool ran (say, data.root=photos)
    return tuple(p if p.is_absolute() else base / p for p in paths)


def _class_indices(values: list[Any], what: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """Class numbers for labels given as integers (whole-number floats too) or names; a missing
    label (None, NaN, a negative number) is -1: that row is left out of the scores."""
    def missing(v: Any) -> bool:
        return v is None or isinstance(v, float) and np.isnan(v) or isinstance(v, int | float) and v < 0

    values = [None if missing(v) else int(v) if isinstance(v, float) and float(v).is_integer() else v
              for v in values]
    known = [v for v in values if v is not None]
    if len(known) < len(values):
        log.info("%s: %d of %d rows have no label (left out of the scores)", what, len(values) - len(known),
                 len(values))
    if any(isinstance(v, float) for v in known):
        raise DataError(f"{what} holds fractional labels: use class numbers or names, or data.labels=none.")
    if all(isinstance(v, int) for v in known):
        classes = sorted(set(known))
        index = {c: i for i, c in enumerate(classes)}
        return tuple(-1 if v is None else index[v] for v in values), tuple(str(c) for c in classes)
    names = sorted(set(map(str, known)))
    index = {c: i for i, c in enumerate(names)}
    return tuple(-1 if v is None else index[str(v)] for v in values), tuple(names)


def _subfolder_labels(paths: tuple[Path, ...]) -> tuple[tuple[int, ...], tuple[str, ...]] | None:
    """Classes from ``<common folder>/<class>/<file>`` paths (at least two classes), else None."""
    try:
        common = Path(os.path.commonpath([str(p) for p in paths]))
    except ValueError:  # absolute and relative paths mixed
        return None
    parts = [p.relative_to(common).parts for p in paths]
    if any(len(q) != 2 for q in parts) or len({q[0] for q in parts}) < 2:
        return None
    return _class_indices([q[0] for q in parts], "the paths")


def read_embeddings(path: str, key: str | None = None, paths_key: str | None = None,
                    labels_key: str | None = None, paths_file: str | None = None,
                    image_root: str | None = None, labels: str = "auto") -> EmbeddingTable:
    """Read and check ``path`` (see the module's docstring); every problem is a :class:`DataError`."""
    where = Path(path).expanduser()
    if labels not in LABEL_MODES:
        raise DataError(f"data.labels={labels!r}: use one of {', '.join(LABEL_MODES)}.")
    if where.suffix.lower() not in SUFFIXES:
        raise DataError(f"data.path={path!r}: use a {', '.join(SUFFIXES)} file.")
    if not where.is_file():
        raise DataError(f"data.path={path!r} does not exist.")
    suffix = where.suffix.lower()
    try:
        if suffix == ".npy":
            columns = {"embeddings": np.load(where, mmap_mode="r", allow_pickle=False)}
        else:
            columns = _columns_npz(where) if suffix == ".npz" else _columns_parquet(where)
    except DataError:
        raise
    except Exception as err:  # a truncated or foreign file
        raise DataError(f"data.path={path!r} cannot be read as {suffix[1:]}: {err}") from None
    used = {c for k, g in (("paths_key", paths_key), ("labels_key", labels_key))
            if (c := _pick(columns, k, g, where)) is not None}
    features = _checked(_features(columns, key, used, where), where)
    n = len(features)
    paths = _paths(columns, paths_key, paths_file, n, where, image_root)
    found, classes = None, ()
    label_column = _pick(columns, "labels_key", labels_key, where) if labels != "none" else None
    if label_column is not None and labels == "auto":
        column = columns[label_column]
        values = np.ravel(column).tolist() if isinstance(column, np.ndarray) else column.to_pylist()
        if len(values) != n:
            raise DataError(f"The {label_column!r} column of {where} has {len(values)} labels for {n} rows.")
        found, classes = _class_indices(values, f"The {label_column!r} column of {where}")
    elif labels != "none" and paths is not None:
        derived = _subfolder_labels(paths)
        if derived is None and labels == "subfolders":
            raise DataError("data.labels=subfolders, but the paths are not <folder>/<class>/<file> "
                            "with two classes or more. Use data.labels=auto or none.")
        found, classes = derived or (None, ())
    elif labels == "subfolders":
        raise DataError("data.labels=subfolders needs paths (data.paths_file, or a paths column).")
    return EmbeddingTable(features, paths, found if found is not None else (-1,) * n, classes)
