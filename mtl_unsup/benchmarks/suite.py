"""The suite that chooses the defaults: ours against the peer on several real folders, at two budgets,
with seeds, on one machine.

    python -m mtl_unsup.benchmarks.suite --root /tmp/data
    python -m mtl_unsup.benchmarks.suite --root /tmp/data --folders imagenette-96 --budgets 10 \\
        --ours "protocol=single" --skip-peer

Each cell is a folder (``<root>/<folder>`` with ``train/`` and ``test/`` class subfolders) at a
budget in minutes; in it the peer (lightly-train SimCLR + k-means, as in
:mod:`mtl_unsup.benchmarks.peers`, at the images' own side up to 64 px) runs once and each of our
settings (``--ours``, one or more override strings; by default what ``data=folder`` trains) once
per seed: ``--seeds`` seeds at the
first budget, one at the others (``--seeds-after``). Every run is a process of its own with
``trainer.max_time`` the budget, one after the other, on every core.

Every run's row goes to ``<out>/rows.json`` as soon as it ends, so the suite can be run in several
sittings (a row measured with the same settings is kept, not measured again; ``--again`` measures
anew). ``<out>/README.md`` is then written from all the rows: per folder and budget, ours as mean ±
sd over its seeds against the peer, and the mean lead over the suite of each of our settings;
how each label-free criterion of the answer would have chosen among our runs' candidates
(``candidates.json``: the chosen candidate's ACC against the best and the worst, and the rank
correlation of criterion and ACC); and ``<out>/acc_vs_minutes.png``, held-out ACC against minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from mtl_unsup.atomic import write_text
from mtl_unsup.benchmarks.peer_lightly import lightly_row
from mtl_unsup.benchmarks.peer_runs import (
    InputError,
    Row,
    auto_image_size,
    budget_seconds,
    find_split,
    run_command,
    set_threads,
)
from mtl_unsup.benchmarks.peers import DEFAULT_OURS, git_commit, ours_row
from mtl_unsup.benchmarks.suite_report import write_report

FOLDERS = ("cifar10-jpg", "fashion-mnist-png", "imagenette-96")
PEER = "peer"
PEER_MAX_SIZE = 64


def row_key(folder: str, minutes: float, method: str, seed: int) -> str:
    return f"{folder}|{minutes:g}|{method}|{seed}"


def load_rows(path: Path) -> dict[str, dict]:
    return json.loads(path.read_text()) if path.is_file() else {}


def plan_runs(args: argparse.Namespace) -> list[tuple[str, float, str, int]]:
    """(folder, minutes, method, seed) of every run the suite asks for, in order."""
    runs = []
    for folder in args.folders:
        for i, minutes in enumerate(args.budgets):
            if not args.skip_peer:
                runs.append((folder, minutes, PEER, 0))
            seeds = args.seeds if i == 0 else args.seeds_after
            for ours in args.ours:
                runs += [(folder, minutes, ours, seed) for seed in range(seeds)]
    return runs


def measure(folder: str, minutes: float, method: str, seed: int, args: argparse.Namespace,
            run_root: Path) -> dict:
    """One run, as a row of ``rows.json``."""
    split = find_split(args.root / folder)
    k, budget = len(split.classes), budget_seconds(minutes)
    tag = hashlib.sha1(method.encode()).hexdigest()[:8]  # the setting, stable across processes
    name = "peer" if method == PEER else f"ours-{tag}-seed{seed}"
    run_dir = run_root / folder / f"{minutes:g}min" / name
    attempt = 1
    while run_dir.exists():  # a retried or re-measured row: a directory of its own, the old one kept
        attempt += 1
        run_dir = run_root / folder / f"{minutes:g}min" / f"{name}-{attempt}"
    run_dir.mkdir(parents=True)
    if method == PEER:
        # the images' own side up to 64 px: at the peers benchmark's 224 for larger ones (Imagenette's
        # 96), ResNet-18 ran 26 steps in 10 minutes on 2 cores, not a comparison
        size = min(auto_image_size(split.train), PEER_MAX_SIZE)
        row: Row = lightly_row(split, run_dir, budget, k, size, seed, args.threads)
        extra: dict = {"image_size": size}
    else:
        row = ours_row(split, method, k, budget, seed, run_dir / "run", args.threads)
        extra = ours_details(run_dir / "run")
    # "minutes": what the run used (the row's); "budget": what it was given
    # "method": the setting (or "peer"), "name": the row's own
    return {**asdict(row), "name": row.method, "folder": folder, "budget": minutes, "method": method,
            "seed": seed, "commit": args.commit, **extra}


def ours_details(run: Path) -> dict:
    """What our run's files say beyond ACC: its plan and actuals, and its candidates."""
    out: dict = {"run_dir": str(run)}
    for name in ("plan.json", "candidates.json", "metrics.json"):
        path = run / name
        if path.is_file():
            data = json.loads(path.read_text())
            if name == "metrics.json":
                data = {k: v for k, v in data.items() if k.startswith(("test/", "train/")) or "/test/" in k}
            out[name.split(".")[0]] = data
    return out


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="folder holding the data sets")
    parser.add_argument("--folders", nargs="+", default=list(FOLDERS))
    parser.add_argument("--budgets", nargs="+", type=float, default=[10.0, 30.0], help="minutes")
    parser.add_argument("--seeds", type=int, default=2, help="seeds of ours at the first budget")
    parser.add_argument("--seeds-after", type=int, default=1, help="seeds of ours at the other budgets")
    parser.add_argument("--ours", nargs="+", default=[DEFAULT_OURS], help="override strings, one per setting")
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--again", action="store_true", help="measure rows already in rows.json anew")
    parser.add_argument("--report-only", action="store_true", help="write README.md from rows.json only")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--out", type=Path, default=Path("experiments/suite"))
    args = parser.parse_args(argv)
    if any(m <= 0 for m in args.budgets) or args.seeds < 1 or args.seeds_after < 0:
        raise InputError("--budgets must be positive, --seeds at least 1, --seeds-after at least 0.")
    missing = [f for f in args.folders if not (args.root / f).is_dir()]
    if missing and not args.report_only:
        raise InputError(f"{', '.join(str(args.root / f) for f in missing)}: no such folder (extract the "
                         "archives of ../shared/data there, see its README).")
    return args


def run(args: argparse.Namespace, argv: Sequence[str]) -> Path:
    args.out.mkdir(parents=True, exist_ok=True)
    rows_path = args.out / "rows.json"
    rows = load_rows(rows_path)
    args.commit = git_commit()
    if not args.report_only:
        set_threads(args.threads)
        os.environ.update({key: str(args.threads) for key in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")})
        run_root = Path("outputs") / "suite"
        for folder, minutes, method, seed in plan_runs(args):
            key = row_key(folder, minutes, method, seed)
            if key in rows and not args.again and rows[key].get("acc") is not None:
                continue
            print(f"suite: {folder}, {minutes:g} min, {method}, seed {seed}", flush=True)
            try:
                rows[key] = measure(folder, minutes, method, seed, args, run_root)
            except (OSError, ValueError, RuntimeError) as err:  # one broken run does not end the suite
                rows[key] = {"folder": folder, "budget": minutes, "method": method, "seed": seed,
                             "acc": None, "notes": f"failed: {type(err).__name__}: {err}"}
            write_text(rows_path, json.dumps(rows, indent=1) + "\n")
            print(f"  ACC {rows[key].get('acc')}, NMI {rows[key].get('nmi')}, {rows[key].get('minutes')} min",
                  flush=True)
    return write_report(list(rows.values()), args.out, argv)


def main(argv: Sequence[str] | None = None) -> None:
    print(f"written: {run_command(run, parse_args, argv)}")


if __name__ == "__main__":
    main()
