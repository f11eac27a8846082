"""Benchmark: our training against peers on one folder's split, each in the same wall-clock budget.

    python -m mtl_unsup.benchmarks.peers --data /tmp/data/cifar10-small --minutes 2
    python -m mtl_unsup.benchmarks.peers --data <folder> --minutes 30 --ours "experiment=cifar10 seed=1" \\
        --skip umap --out experiments/peers

``<folder>`` holds ``train/`` (trained on) and ``test/`` (held out), each with class subfolders; the
classes are read only to score (Hungarian ACC, NMI on ``test/``) and to set k (or ``--k``). Rows:

1. ``lightly-train SimCLR``: the ``lightly-train`` package pretrains a torchvision ResNet-18 with
   SimCLR on ``train/`` (batch 128, at the images' own size up to 64 px, e.g. 32 for CIFAR). Its
   learning-rate schedule runs over a number of epochs, so the epochs are estimated from a short
   timed probe (a tenth of the budget, 10 to 60 s, or two epochs; its time is counted in the row's
   minutes but not in the training budget) to fill the budget, and Lightning's ``max_time`` (the
   budget) stops the training in any case. The exported backbone embeds ``train/`` and ``test/``
   (global average pool, L2 normalised); k-means is fitted on the training embeddings and each test
   image takes the nearest centroid.
2. ``UMAP + k-means on pixels`` (and plain k-means on pixels): the functions of
   :mod:`mtl_unsup.benchmarks.recipes`, fitted on ``train/``, test assigned to the nearest centroid.
   Not budgeted: they take what they take.
3. ``ours``: ``python -m mtl_unsup.train data=folder data.root=<folder> data.val_fraction=0
   optimized_metric=null cluster.k=<k> seed=<seed> <--ours> trainer.max_time=<budget>`` in a process
   of its own (``--ours`` defaults to ``protocol=folder``, what a folder alone trains; all of
   ``train/`` trained on, as by the peers); its ``metrics.json`` gives ``test/acc`` and
   ``test/nmi`` (its answer is chosen without labels).

Every method runs with the same number of torch threads (``--threads``, default: all cores), one
after the other; the trained rows' notes give the CPU minutes their processes got, which on a shared
machine can fall well below threads x wall time. The table goes to ``<out>/<folder name>.md`` with
the commands, the date, the commit and the cores; each run's files and log go under
``outputs/peers/<folder name>/<time>/``.

Install the peers into a virtual environment of their own (lightly-train brings its own torch):

    python3 -m venv /tmp/peersvenv && /tmp/peersvenv/bin/pip install -e '.[peers]'
    /tmp/peersvenv/bin/python -m mtl_unsup.benchmarks.peers --data <folder> --minutes 2

Without lightly-train (or umap-learn) that row is kept in the table as skipped, saying why.

The rows also go to ``<out>/<folder name>.json``. A method left out with ``--skip`` keeps the row it
got in that file's run when that run had the same ``--minutes`` (its notes say when and at which
commit it was measured), so the methods of one table can be measured in separate sittings, one at a
time on an otherwise idle machine. Our rows made with other ``--ours`` overrides (and otherwise the
same settings) stay in the table too, so our protocols are compared in one table.

The lightly-train row is :mod:`mtl_unsup.benchmarks.peer_lightly`; what the rows share (the split,
the row, the timed child process) is :mod:`mtl_unsup.benchmarks.peer_runs`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from mtl_unsup.atomic import write_text
from mtl_unsup.benchmarks.peer_lightly import lightly_row, lightly_worker  # noqa: F401 (commands in earlier tables)
from mtl_unsup.benchmarks.peer_runs import (
    ROW_NAMES,
    InputError,
    Row,
    Split,
    auto_image_size,
    budget_seconds,
    child_timeout,
    find_split,
    run_command,
    run_logged,
    set_threads,
)
from mtl_unsup.stages import max_time_string, sized_epochs

# The training overrides of the "ours" row: what data=folder trains (conf/protocol/folder.yaml),
# written out so that the row says which protocol it measured.
DEFAULT_OURS = "protocol=folder"
METHODS = ("lightly", "umap", "ours")
REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- pixels


def pixel_overrides(split: Split, image_size: int) -> list[str]:
    return ["data=folder", f"data.root={split.root}", "data.val_fraction=0", f"data.image_size={image_size}"]


def pixel_rows(split: Split, k: int, image_size: int, seed: int) -> list[Row]:
    """k-means and UMAP + k-means on pixels, through :mod:`mtl_unsup.benchmarks.recipes`."""
    from mtl_unsup.benchmarks.recipes import pixel_baselines, split_pixels

    overrides = pixel_overrides(split, image_size)
    pixels = split_pixels(overrides)
    call = f"recipes.pixel_baselines(recipes.split_pixels({overrides}), k={k}, seed={seed})"
    rows = [Row(r["method"], r.get("acc"), r.get("nmi"), r["minutes"],
                f"{image_size} px, fitted on train/, test on the nearest centroid", [call])
            for r in pixel_baselines(pixels, k, seed)]
    if not any(r.method == ROW_NAMES["umap"] for r in rows):
        rows.append(Row(ROW_NAMES["umap"], notes="skipped: umap-learn is not installed "
                        "(pip install 'mtl-unsup[peers]')"))
    return rows


# ---------------------------------------------------------------- ours


def ours_command(split: Split, ours: str, k: int, budget_s: int, seed: int, run_dir: Path) -> list[str]:
    """The ``mtl_unsup.train`` command of the "ours" row (``--ours`` may override k and the seed)."""
    # all of train/ is trained on, as the peers do: no validation split, so nothing to optimise on it
    fixed = ["data=folder", f"data.root={split.root}", "data.val_fraction=0", "optimized_metric=null",
             f"cluster.k={k}", f"seed={seed}"]
    return [sys.executable, "-m", "mtl_unsup.train", *fixed, *shlex.split(ours),
            f"trainer.max_time={max_time_string(budget_s)}", "print_config=false", "pictures=false",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]


def epochs_run(run_dir: Path, metrics: dict[str, float] | None = None, num_train: int | None = None) -> str:
    """``N of M epochs``: how far the run got, from its history and its composed config; for a run
    of stages, each stage's, with the held-out ACC it ended with (its answer head's, else k-means')."""
    from omegaconf import OmegaConf

    config = run_dir / ".hydra" / "config.yaml"
    cfg = OmegaConf.load(config) if config.exists() else None

    def count(history: Path) -> int:
        return len(history.read_text().splitlines()) if history.exists() else 0

    if cfg is None or not cfg.get("stages"):
        planned = cfg.trainer.max_epochs if cfg is not None else "?"
        return f"{count(run_dir / 'epochs.jsonl')} of {planned} epochs"
    parts = []
    for name, stage in cfg.stages.items():
        if stage is None:  # left out
            continue
        acc = (metrics or {}).get(f"{name}/test/acc", (metrics or {}).get(f"{name}/test/kmeans_acc"))
        score = f", ACC {acc:.3f}" if acc is not None else ""
        planned = sized_epochs(stage, num_train) if num_train else stage.epochs
        parts.append(f"{name} {count(run_dir / name / 'epochs.jsonl')} of {planned} epochs{score}")
    return "; ".join(parts)


def ours_name(ours: str) -> str:
    """The row's name: ``ours`` with its overrides, when short enough to read in a table."""
    return f"{ROW_NAMES['ours']}, `{ours}`" if ours and len(ours) <= 40 else ROW_NAMES["ours"]


def ours_row(split: Split, ours: str, k: int, budget_s: int, seed: int, run_dir: Path,
             threads: int) -> Row:
    """Our training in a process of its own; held-out ACC and NMI from its metrics.json."""
    command = ours_command(split, ours, k, budget_s, seed, run_dir)
    log = run_dir.parent / "ours.log"
    code, minutes, cpu = run_logged(command, log, threads, child_timeout(budget_s))
    row = Row(ours_name(ours), minutes=minutes, commands=[shlex.join(command)])
    if code == 0 and not (run_dir / "metrics.json").exists():
        row.notes = f"failed (no metrics.json); see {log}"
        return row
    if code != 0:
        row.notes = f"failed ({'timed out' if code is None else f'exit status {code}'}); see {log}"
        return row
    metrics = json.loads((run_dir / "metrics.json").read_text())
    row.acc, row.nmi = metrics.get("test/acc"), metrics.get("test/nmi")
    what = f"`{ours}`" if len(ours) <= 60 else "`--ours` as in the command below"
    row.notes = (f"{cpu}; {what}, trainer.max_time {max_time_string(budget_s)}: "
                 f"{epochs_run(run_dir, metrics, split.n_train)}; "
                 f"k-means on its features: ACC {metrics.get('test/kmeans_acc', float('nan')):.3f}")
    return row


# ---------------------------------------------------------------- report


def git_commit() -> str:
    """The commit measured (short hash), with a mark when the work tree had changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" (with uncommitted changes)" if git("status", "--porcelain") else "")


def versions() -> str:
    names = ("torch", "torchvision", "lightly-train", "umap-learn", "lightning")
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} not installed")
    return ", ".join(found)


def cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(rows: Sequence[Row]) -> list[str]:
    lines = ["| method | held-out ACC | NMI | minutes used | notes |", "|---|---|---|---|---|"]
    for r in rows:
        kept = f" (kept from the run of {r.measured})" if r.measured else ""
        notes = (r.notes + kept).replace("|", "\\|")
        lines.append(f"| {r.method} | {cell(r.acc)} | {cell(r.nmi)} | {cell(r.minutes, 1)} | {notes} |")
    return lines


def report(split: Split, rows: Sequence[Row], minutes: float, k: int, threads: int, argv: Sequence[str],
           commit: str, when: datetime) -> str:
    """The Markdown report: table, then how it was measured and every command."""
    lines = [f"# {split.name}: peers against ours, {minutes:g} minutes each", "",
             f"{split.n_train} training images (`{split.train}`), {split.n_test} held out (`{split.test}`), "
             f"{len(split.classes)} classes, k = {k}. Class subfolders are read only to score the "
             "held-out images (Hungarian ACC, NMI).", "", *table(rows), "",
             f"Measured {when:%Y-%m-%d %H:%M} UTC at commit {commit} on {os.cpu_count()} cores "
             f"({platform.processor() or platform.machine()}), {threads} torch threads for every method; "
             f"Python {platform.python_version()}, {versions()}.", "", "Commands:", "",
             f"    python -m mtl_unsup.benchmarks.peers {shlex.join(argv)}"]
    shown: set[str] = set()
    for r in rows:
        lines += [f"    # {r.method}", *("    (as above)" if c in shown else f"    {c}" for c in r.commands)]
        shown.update(r.commands)
    return "\n".join([*lines, ""])


def rows_file(out: Path, split: Split) -> Path:
    """The rows of the last report on this folder, beside it: a method skipped later keeps its row."""
    return out / f"{split.name}.json"


def settings_of(args: argparse.Namespace, k: int, size: int) -> dict:
    """What makes two measurements comparable (the recipe of ours only matters for our row)."""
    return {"minutes": args.minutes, "seed": args.seed, "threads": args.threads, "k": k, "image_size": size,
            "ours": args.ours}


def comparable_rows(path: Path, settings: dict, ours_too: bool) -> tuple[dict, list[dict]]:
    """The settings and rows of the report at ``path`` when it was measured with the same
    ``settings`` (``--ours`` compared only when ``ours_too``; a setting the file does not record is
    taken to be the same); none when they differ or the file is missing or broken (written anew)."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:
        return {}, []
    then = {"minutes": data.get("minutes"), **data.get("settings", {})}
    if not data or any(then.get(key, value) != value for key, value in settings.items()
                       if key != "ours" or ours_too):
        return {}, []
    return then, data["rows"]


def kept_rows(path: Path, method: str, settings: dict) -> list[Row]:
    """The rows ``method`` gave in the report at ``path`` if they were measured with the same
    settings."""
    _, rows = comparable_rows(path, settings, ours_too=method == "ours")
    return [Row(**r) for r in rows if r.pop("source", None) == method and r["acc"] is not None]


def other_ours_rows(path: Path, settings: dict) -> list[tuple[str, Row]]:
    """Our rows of the report at ``path`` made with other ``--ours`` overrides but otherwise the
    same settings, as ``("ours:<overrides>", row)``: the protocols compared in one table, each
    measured in a sitting of its own."""
    then, rows = comparable_rows(path, settings, ours_too=False)
    out = []
    for r in rows:
        source = r.pop("source", "")
        overrides = then.get("ours", "") if source == "ours" else source.removeprefix("ours:")
        if source.startswith("ours") and overrides != settings["ours"] and r["acc"] is not None:
            out.append((f"ours:{overrides}", Row(**{**r, "method": ours_name(overrides)})))
    return out


def write_rows(path: Path, rows: Sequence[tuple[str, Row]], settings: dict, commit: str,
               when: datetime) -> None:
    stamp = f"{when:%Y-%m-%d %H:%M} UTC at commit {commit}"
    data = {"minutes": settings["minutes"], "settings": settings,
            "rows": [{**asdict(r), "measured": r.measured or stamp, "source": method} for method, r in rows]}
    write_text(path, json.dumps(data, indent=1) + "\n")


# ---------------------------------------------------------------- main


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="folder with train/ and test/ inside")
    parser.add_argument("--minutes", type=float, required=True, help="wall-clock budget of each method")
    parser.add_argument("--out", type=Path, default=Path("experiments/peers"))
    parser.add_argument("--ours", default=DEFAULT_OURS, help=f"mtl-train overrides (default: {DEFAULT_OURS})")
    parser.add_argument("--skip", default="", help=f"leave out (comma-separated): {','.join(METHODS)}")
    parser.add_argument("--k", type=int, help="number of clusters (default: the number of classes)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of each method")
    parser.add_argument("--image-size", type=int, help="lightly and pixels (default: the images' own side "
                        "up to 64 px, else 224)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.skip = [s for s in args.skip.split(",") if s]
    unknown = [s for s in args.skip if s not in METHODS]
    if unknown:
        raise InputError(f"--skip {','.join(unknown)}: choose among {','.join(METHODS)}.")
    if args.minutes <= 0 or args.threads < 1 or (args.k is not None and args.k < 2):
        raise InputError("--minutes must be positive, --threads at least 1 and --k at least 2.")
    return args


def run(args: argparse.Namespace, argv: Sequence[str]) -> Path:
    """Every row in turn, then the report; returns its path."""
    split = find_split(args.data)
    commit, when = git_commit(), datetime.now(timezone.utc)  # the code measured is the code at the start
    k, budget_s = args.k or len(split.classes), budget_seconds(args.minutes)
    size = args.image_size or auto_image_size(split.train)
    set_threads(args.threads)
    os.environ.update({key: str(args.threads) for key in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")})
    run_dir = Path("outputs") / "peers" / split.name / when.strftime("%Y-%m-%d_%H-%M-%S")
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"{split.name}: {split.n_train} training, {split.n_test} held-out images, k={k}, "
          f"{budget_s} s each; runs in {run_dir}", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = settings_of(args, k, size)
    earlier = {m: kept_rows(rows_file(args.out, split), m, settings) for m in args.skip}
    rows: list[Row] = []
    sources: list[str] = []
    for method in METHODS:
        before = len(rows)
        if method in args.skip:
            rows += earlier[method] or [Row(ROW_NAMES[method], notes="skipped (--skip)")]
        elif method == "lightly":
            rows.append(lightly_row(split, run_dir / "lightly", budget_s, k, size, args.seed, args.threads))
        elif method == "umap":
            rows += pixel_rows(split, k, size, args.seed)
        else:
            rows.append(ours_row(split, args.ours, k, budget_s, args.seed, run_dir / "ours", args.threads))
        sources += [method] * (len(rows) - before)
        print("\n".join(table(rows[before:])[2:]), flush=True)
    for source, row in other_ours_rows(rows_file(args.out, split), settings):
        rows.append(row)
        sources.append(source)
    path = args.out / f"{split.name}.md"
    path.write_text(report(split, rows, args.minutes, k, args.threads, argv, commit, when))
    write_rows(rows_file(args.out, split), list(zip(sources, rows, strict=True)), settings, commit, when)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    path = run_command(run, parse_args, argv)
    print(path.read_text())
    print(f"written: {path}")


if __name__ == "__main__":
    main()
