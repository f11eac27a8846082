"""Benchmark: our recipes against pixel baselines, on one data set's split, side by side.

``python -m mtl_unsup.benchmarks.recipes --data mnist --root /data/mnist`` reads the training and
held-out images exactly as a training run of ``experiment=<data>`` splits them, clusters the
pixels (k-means; UMAP + k-means), then trains each recipe (one ``mtl_unsup.train`` process per
recipe and seed) and writes one table, ``<out>/<data>.md``, and every run's row, ``<out>/<data>.csv``.
``--recipes ... staged`` also trains the data's staged protocol (``experiment=scan_<data>``, not
run unless named). Held-out (``test/``) ACC, NMI and ARI are ground truth, reported only; each
recipe's answer is chosen without labels. ``--data digits`` needs no folder (scikit-learn's bundled digits).

UMAP needs ``pip install 'mtl-unsup[bench]'`` (umap-learn); without it that row is skipped, saying so.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

# Recipe name -> train overrides on top of ``experiment=<data>`` (settings of tasks a recipe
# leaves out are dropped, see :func:`recipe_overrides`).
RECIPES = {
    "deepcluster": ["task=[cluster,rotation,contrastive]", "cluster.assign=kmeans"],
    "balanced": ["task=[cluster,rotation,contrastive]", "cluster.assign=sinkhorn"],
    "scan": ["task=[cluster,rotation,contrastive,scan,selflabel]"],
    # the data's staged protocol, experiment=scan_<data>, in place of experiment=<data>
    "staged": ["experiment=scan_{data}"],
}
DATA = ("digits", "mnist", "fashion_mnist", "cifar10")


def base_overrides(data: str, root: str | None) -> list[str]:
    overrides = [f"experiment={data}"]
    if data != "digits":
        if not root:
            raise SystemExit(f"--data {data} needs --root, the folder with train/ and test/ inside.")
        overrides.append(f"data.root={root}")
    return overrides


def compose_train(overrides: list[str]) -> DictConfig:
    from hydra import compose, initialize_config_dir

    from mtl_unsup.config import CONF_DIR, register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def recipe_overrides(name: str, overrides: list[str]) -> list[str]:
    """The run's overrides for a recipe: the recipe's on top of ``overrides``, deleting the
    experiment's settings of tasks it leaves out; a recipe naming an experiment replaces it."""
    recipe = RECIPES[name]
    if recipe[0].startswith("experiment="):
        data = next(o for o in overrides if o.startswith("experiment=")).removeprefix("experiment=")
        return [recipe[0].format(data=data) if o.startswith("experiment=") else o for o in overrides]
    tasks = next(o for o in recipe if o.startswith("task=")).removeprefix("task=[").removesuffix("]")
    configured = compose_train([*overrides, *recipe[:1]]).task
    dropped = [f"~task.{t}" for t in configured if t not in tasks.split(",")]
    return [*overrides, *recipe, *dropped]


def split_pixels(overrides: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Train and test images as flat float32 rows with their labels, split as training splits them."""
    from mtl_unsup.data.datamodule import ImageFolderDataModule  # noqa: F401  (hydra target)
    from mtl_unsup.train import build_datamodule

    datamodule = build_datamodule(compose_train(overrides))
    out = {}
    for split in ("train", "test"):
        dataset = datamodule._dataset(split)
        loader = torch.utils.data.DataLoader(dataset, batch_size=512)
        rows = [batch["image"].flatten(1) for batch in loader]
        out[split] = (torch.cat(rows).numpy(), np.asarray(dataset.images.labels))
    return out


def kmeans_fit_assign(train: np.ndarray, test: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means on ``train`` (5 restarts), then each test row's nearest centroid."""
    from mtl_unsup.clustering.kmeans import run_kmeans

    _, centroids, _ = run_kmeans(torch.from_numpy(train), k, niter=50, nredo=5, seed=seed)
    return torch.cdist(torch.from_numpy(test), centroids).argmin(1).numpy()


def pixel_baselines(pixels: dict, k: int, seed: int) -> list[dict]:
    from mtl_unsup.metrics import score_clustering

    (train, _), (test, labels) = pixels["train"], pixels["test"]
    rows = []
    start = time.perf_counter()
    preds = kmeans_fit_assign(train, test, k, seed)
    rows.append({"method": "k-means on pixels", "seed": seed, "minutes": (time.perf_counter() - start) / 60,
                 **score_clustering(torch.from_numpy(preds), torch.from_numpy(labels))})
    try:
        import umap
    except ImportError:
        print("UMAP + k-means skipped: pip install 'mtl-unsup[bench]' (umap-learn)", flush=True)
        return rows
    start = time.perf_counter()
    reducer = umap.UMAP(n_components=10, n_neighbors=15, min_dist=0.0, random_state=seed)
    embedded = reducer.fit_transform(train).astype(np.float32)
    preds = kmeans_fit_assign(embedded, reducer.transform(test).astype(np.float32), k, seed)
    rows.append({"method": "UMAP + k-means on pixels", "seed": seed,
                 "minutes": (time.perf_counter() - start) / 60,
                 **score_clustering(torch.from_numpy(preds), torch.from_numpy(labels))})
    return rows


def train_recipe(name: str, overrides: list[str], seed: int, run_dir: Path) -> dict:
    """One training run in a process of its own; its held-out scores and wall time."""
    command = [sys.executable, "-m", "mtl_unsup.train", *recipe_overrides(name, overrides),
               f"seed={seed}",
               "print_config=false", "pictures=false", "trainer.enable_progress_bar=false",
               f"hydra.run.dir={run_dir}"]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    minutes = (time.perf_counter() - start) / 60
    (run_dir.parent / f"{run_dir.name}.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        print(f"{name} seed {seed} failed; see {run_dir}.log", flush=True)
        return {"method": name, "seed": seed, "minutes": minutes, "failed": True}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    answer = torch.load(final_checkpoint(run_dir), weights_only=True).get("answer", "")
    return {"method": name, "seed": seed, "minutes": minutes, "answer": answer,
            **{m: metrics.get(f"test/{m}") for m in ("acc", "nmi", "ari", "kmeans_acc")},
            "val_silhouette": metrics.get("val/silhouette")}


def final_checkpoint(run_dir: Path) -> Path:
    """The run's last checkpoint: ``checkpoints/last.ckpt``, or with stages the last stage's."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        return last
    from mtl_unsup.staged import read_progress

    done, _ = read_progress(run_dir)
    return run_dir / "checkpoints" / list(done)[-1] / "last.ckpt"


def check_staged(overrides: list[str]) -> None:
    """The staged recipe's config checked before anything trains: an extra override it refuses
    (``trainer.max_epochs``, which each stage replaces) stops here, not hours later."""
    from mtl_unsup.config import check_config
    from mtl_unsup.stage_checks import replaced_overrides

    staged = recipe_overrides("staged", overrides)
    cfg = compose_train(staged)
    check_config(cfg)
    problems = replaced_overrides(cfg, staged)
    if problems:
        raise SystemExit("--recipes staged: " + " ".join(problems))


def summarise(rows: list[dict]) -> list[str]:
    def cell(values: list[float]) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        spread = f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else ""
        return f"{statistics.mean(values):.3f}{spread}"

    lines = ["| method | runs | test ACC | test NMI | test ARI | k-means on features ACC | minutes per run |",
             "|---|---|---|---|---|---|---|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method and not r.get("failed")]
        failed = sum(1 for r in rows if r["method"] == method and r.get("failed"))
        runs = f"{len(mine)}" + (f" (+{failed} failed)" if failed else "")
        lines.append(f"| {method} | {runs} | " + " | ".join(
            cell([r.get(m) for r in mine]) for m in ("acc", "nmi", "ari", "kmeans_acc", "minutes")) + " |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", choices=DATA, required=True)
    parser.add_argument("--root", help="folder with train/ and test/ (not for digits)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--recipes", nargs="*", choices=list(RECIPES),
                        default=[r for r in RECIPES if r != "staged"])
    parser.add_argument("--no-baselines", action="store_true", help="skip the pixel baselines")
    parser.add_argument("--out", type=Path, default=Path("experiments/recipes"))
    parser.add_argument("overrides", nargs="*", help="extra train overrides for every recipe")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # the code measured is the code at the start (a commit made during a long run is not in it)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout
    if "staged" in args.recipes and args.data == "digits":
        raise SystemExit("--recipes staged: digits has no staged protocol (experiment=scan_digits); "
                         "leave it out for --data digits.")
    overrides = [*base_overrides(args.data, args.root), *args.overrides]
    if "staged" in args.recipes:
        check_staged(overrides)
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    if not args.no_baselines:
        pixels = split_pixels(overrides)
        print(f"{args.data}: {len(pixels['train'][0])} training, {len(pixels['test'][0])} held-out images",
              flush=True)
        for seed in args.seeds:
            rows += pixel_baselines(pixels, 10, seed)
            print(rows[-1], flush=True)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d_%H-%M-%S")
    for name in args.recipes:
        for seed in args.seeds:
            rows.append(train_recipe(name, overrides, seed, Path("outputs") / "benchmarks" / args.data / stamp
                                     / f"{name}_seed{seed}"))
            print(rows[-1], flush=True)
    table = [f"# {args.data}: recipes against pixel baselines (held-out ACC, seeds {args.seeds})", "",
             f"Measured {stamp} UTC at commit {commit.strip() or '?'} with:", "",
             f"    python -m mtl_unsup.benchmarks.recipes {' '.join(argv or sys.argv[1:])}", "",
             *summarise(rows), ""]
    (args.out / f"{args.data}.md").write_text("\n".join(table))
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(args.out / f"{args.data}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print("\n".join(table))


if __name__ == "__main__":
    main()
