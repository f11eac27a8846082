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
   of its own (all of ``train/`` trained on, as by the peers); its ``metrics.json`` gives ``test/acc``
   and ``test/nmi`` (its answer is chosen without labels).

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
time on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from mtl_unsup.atomic import write_text
from mtl_unsup.stages import max_time_string

# The training overrides of the "ours" row: SCAN's protocol as stages, sized for CPUs.
DEFAULT_OURS = "experiment=scan_cifar10_cpu"
METHODS = ("lightly", "umap", "ours")
ROW_NAMES = {"lightly": "lightly-train SimCLR", "umap": "UMAP + k-means on pixels", "ours": "ours"}
LIGHTLY_BATCH = 128
# The probe that times lightly-train's steps runs for a tenth of the budget, within these bounds, or
# two epochs and a step when that is sooner: long enough to cross an epoch boundary (the loader's
# workers restart there) on small sets.
PROBE_SECONDS = (10, 60)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # lightly-train's default
REPO = Path(__file__).resolve().parents[2]


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


def budget_seconds(minutes: float) -> int:
    """The budget in whole seconds (at least one)."""
    return max(1, round(minutes * 60))


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Steps of one epoch with the last partial batch dropped, as lightly-train's loader does."""
    return max(1, n_images // batch_size)


def estimate_epochs(budget_s: float, n_images: int, batch_size: int, step_seconds: float) -> int:
    """Whole epochs that fit in the budget at ``step_seconds`` a step (at least one)."""
    epoch_s = steps_per_epoch(n_images, batch_size) * step_seconds
    return max(1, math.floor(budget_s / epoch_s))


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


# ---------------------------------------------------------------- lightly-train SimCLR


def lightly_pretrain_args(split: Split, out: Path, epochs: int, image_size: int, seed: int,
                          trainer_args: dict) -> dict:
    """Keyword arguments of ``lightly_train.pretrain`` (JSON-serialisable, for the report too)."""
    transform: dict = {"image_size": [image_size, image_size]}
    if image_size <= 64:
        transform["gaussian_blur"] = None  # as SimCLR's CIFAR recipe
    return {"out": str(out), "data": str(split.train), "model": "torchvision/resnet18", "method": "simclr",
            "epochs": epochs, "batch_size": LIGHTLY_BATCH, "devices": 1, "seed": seed, "overwrite": True,
            "transform_args": transform, "trainer_args": {**trainer_args, "log_every_n_steps": 1}}


def read_steps(metrics_jsonl: Path) -> list[dict]:
    """lightly-train's logged training steps (the rows with a ``train_loss``)."""
    if not metrics_jsonl.exists():
        return []
    rows = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    return [r for r in rows if "train_loss" in r]


def probe_limits(budget_s: int, n_images: int) -> dict:
    """The probe's trainer limits: a tenth of the budget (bounded), or two epochs and a step."""
    low, high = PROBE_SECONDS
    return {"max_time": max_time_string(min(high, max(low, budget_s // 10))),
            "max_steps": 2 * steps_per_epoch(n_images, LIGHTLY_BATCH) + 1}


def probe_step_seconds(steps: list[dict]) -> float:
    """Mean seconds a step (the batch plus the wait for it, epoch boundaries included), the first,
    warm-up step left out."""
    times = [r.get("profiling/batch_time", 0.0) + r.get("profiling/data_time", 0.0) for r in steps]
    times = times[1:] or times
    if not times:
        raise RuntimeError("the lightly-train probe logged no step")
    return statistics.mean(times)


def embed_images(weights: Path, paths: Sequence[Path], image_size: int, threads: int) -> np.ndarray:
    """ResNet-18 features (global average pool, L2 normalised) of the images, in eval mode."""
    import torch
    import torchvision
    from torchvision import transforms

    from mtl_unsup.data.images import load_image

    torch.set_num_threads(threads)
    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.fc = torch.nn.Identity()
    model.eval()
    prepare = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.ToTensor(),
                                  transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), 256):
            batch = torch.stack([prepare(load_image(p, 3)) for p in paths[start:start + 256]])
            out.append(torch.nn.functional.normalize(model(batch), dim=1))
    return torch.cat(out).numpy().astype(np.float32)


def probe_epochs(split: Split, out: Path, image_size: int, seed: int, budget_s: int) -> dict:
    """Time a few lightly-train steps; the epochs that fill the budget at that pace."""
    import lightly_train

    # many epochs, so that the probe's own limits stop it
    lightly_train.pretrain(**lightly_pretrain_args(split, out, 1000, image_size, seed,
                                                   probe_limits(budget_s, split.n_train)))
    steps = read_steps(out / "metrics.jsonl")
    step_s = probe_step_seconds(steps)
    return {"probe_steps": len(steps), "step_seconds": step_s,
            "epochs": estimate_epochs(budget_s, split.n_train, LIGHTLY_BATCH, step_s)}


def save_embeddings(split: Split, weights: Path, image_size: int, threads: int, path: Path) -> None:
    """Both splits' embeddings and labels, in one ``.npz``."""
    arrays = {}
    for name, folder in (("train", split.train), ("test", split.test)):
        paths, labels = labelled_images(folder, split.classes)
        arrays[name], arrays[f"{name}_labels"] = embed_images(weights, paths, image_size, threads), labels
    np.savez(path, **arrays)


def lightly_worker(spec_path: str) -> None:
    """The lightly row's child process: probe, pretrain within the budget, embed; writes result.json."""
    import torch

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    import lightly_train

    split, out, size, seed, budget_s = (split_from_dict(spec["split"]), Path(spec["out"]), spec["image_size"],
                                        spec["seed"], spec["budget_s"])
    start = time.perf_counter()
    result = probe_epochs(split, out / "probe", size, seed, budget_s)
    probe_s, start = time.perf_counter() - start, time.perf_counter()
    args = lightly_pretrain_args(split, out / "train", result["epochs"], size, seed,
                                 {"max_time": max_time_string(budget_s)})
    lightly_train.pretrain(**args)
    train_s, start = time.perf_counter() - start, time.perf_counter()
    save_embeddings(split, out / "train" / "exported_models" / "exported_last.pt", size, spec["threads"],
                    out / "embeddings.npz")
    steps = read_steps(out / "train" / "metrics.jsonl")
    result.update(probe_seconds=probe_s, train_seconds=train_s, embed_seconds=time.perf_counter() - start,
                  steps_done=len(steps), n_train=split.n_train, pretrain_args=args,
                  last_loss=steps[-1]["train_loss"] if steps else None)
    (out / "result.json").write_text(json.dumps(result, indent=1))


def cluster_embeddings(embeddings: Path, k: int, seed: int) -> dict[str, float]:
    """k-means on the training embeddings, test on the nearest centroid: held-out ACC, NMI."""
    import torch

    from mtl_unsup.benchmarks.recipes import kmeans_fit_assign
    from mtl_unsup.metrics import score_clustering

    data = np.load(embeddings)
    preds = kmeans_fit_assign(data["train"], data["test"], k, seed)
    return score_clustering(torch.from_numpy(preds), torch.from_numpy(data["test_labels"]))


def lightly_notes(result: dict, budget_s: int) -> str:
    """What the lightly row ran and how its budget was spent."""
    planned = result["epochs"] * steps_per_epoch(result["n_train"], LIGHTLY_BATCH)
    stop = "finished its epochs" if result["steps_done"] >= planned else "stopped by max_time"
    if result["steps_done"] >= planned and result["train_seconds"] < 0.75 * budget_s:
        stop += " early (the probe's steps were slower than training's: a busy machine?)"
    size = result["pretrain_args"]["transform_args"]["image_size"][0]
    return (f"torchvision ResNet-18 (ImageNet stem), SimCLR, batch {LIGHTLY_BATCH}, {size} px; "
            f"epochs={result['epochs']} estimated from a {result['probe_steps']}-step probe "
            f"({result['step_seconds']:.2f} s/step; probe {result['probe_seconds']:.0f} s, counted in the "
            f"minutes), trainer max_time {max_time_string(budget_s)}: {stop} after {result['steps_done']} "
            f"of {planned} steps ({result['train_seconds'] / 60:.1f} min with setup and export); "
            "k-means on its L2-normalised 512-d features")


def lightly_row(split: Split, run_dir: Path, budget_s: int, k: int, image_size: int, seed: int,
                threads: int) -> Row:
    """The lightly-train SimCLR row, or a skipped one saying why."""
    if importlib.util.find_spec("lightly_train") is None:
        return Row(ROW_NAMES["lightly"], notes="skipped: lightly-train is not installed "
                   "(pip install 'mtl-unsup[peers]', best in a virtual environment of its own)")
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"split": split_to_dict(split), "out": str(run_dir), "image_size": image_size, "seed": seed,
            "threads": threads, "budget_s": budget_s}
    (run_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    command = [sys.executable, "-c", "import sys; from mtl_unsup.benchmarks.peers import lightly_worker; "
               "lightly_worker(sys.argv[1])", str(run_dir / "spec.json")]
    log = run_dir.parent / "lightly.log"
    code, minutes, cpu = run_logged(command, log, threads, child_timeout(budget_s))
    row = Row(ROW_NAMES["lightly"], minutes=minutes, commands=[shlex.join(command)])
    if code != 0:
        row.notes = f"failed ({'timed out' if code is None else f'exit status {code}'}); see {log}"
        return row
    start = time.perf_counter()
    scores = cluster_embeddings(run_dir / "embeddings.npz", k, seed)
    row.acc, row.nmi = scores["acc"], scores["nmi"]
    row.minutes = minutes + (time.perf_counter() - start) / 60
    result = json.loads((run_dir / "result.json").read_text())
    row.notes = f"{cpu}; {lightly_notes(result, budget_s)}"
    row.commands.append(f"lightly_train.pretrain(**{json.dumps(result['pretrain_args'])})")
    return row


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


def epochs_run(run_dir: Path, metrics: dict[str, float] | None = None) -> str:
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
        parts.append(f"{name} {count(run_dir / name / 'epochs.jsonl')} of {stage.epochs} epochs{score}")
    return "; ".join(parts)


def ours_row(split: Split, ours: str, k: int, budget_s: int, seed: int, run_dir: Path,
             threads: int) -> Row:
    """Our training in a process of its own; held-out ACC and NMI from its metrics.json."""
    command = ours_command(split, ours, k, budget_s, seed, run_dir)
    log = run_dir.parent / "ours.log"
    code, minutes, cpu = run_logged(command, log, threads, child_timeout(budget_s))
    row = Row(ROW_NAMES["ours"], minutes=minutes, commands=[shlex.join(command)])
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
                 f"{epochs_run(run_dir, metrics)}; "
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


def kept_rows(path: Path, method: str, settings: dict) -> list[Row]:
    """The rows ``method`` gave in the report at ``path`` if they were measured with the same
    settings (a file that does not record one is taken to have used the same)."""
    try:
        data = json.loads(path.read_text()) if path.exists() else {}
    except ValueError:  # a broken file keeps nothing, and is written anew
        return []
    then = {"minutes": data.get("minutes"), **data.get("settings", {})}
    keys = [key for key in settings if key in then and (key != "ours" or method == "ours")]
    if not data or any(then[key] != settings[key] for key in keys):
        return []
    return [Row(**r) for r in data["rows"] if r.pop("source", None) == method and r["acc"] is not None]


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
    path = args.out / f"{split.name}.md"
    path.write_text(report(split, rows, args.minutes, k, args.threads, argv, commit, when))
    write_rows(rows_file(args.out, split), list(zip(sources, rows, strict=True)), settings, commit, when)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        path = run(parse_args(argv), argv)
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(path.read_text())
    print(f"written: {path}")


if __name__ == "__main__":
    main()
