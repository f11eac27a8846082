"""The peer benchmark's lightly-train row: SimCLR pretraining of a torchvision ResNet-18 by the
``lightly-train`` package in a child process of its own (epochs estimated from a timed probe to fill
the budget), its embeddings of ``train/`` and ``test/``, and k-means on them. See
:mod:`mtl_unsup.benchmarks.peers`."""

from __future__ import annotations

import importlib.util
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mtl_unsup.benchmarks.peer_runs import (
    ROW_NAMES,
    Row,
    Split,
    child_timeout,
    labelled_images,
    run_logged,
    split_from_dict,
    split_to_dict,
)
from mtl_unsup.stages import max_time_string

LIGHTLY_BATCH = 128
# The probe that times lightly-train's steps runs for a tenth of the budget, within these bounds, or
# two epochs and a step when that is sooner: long enough to cross an epoch boundary (the loader's
# workers restart there) on small sets.
PROBE_SECONDS = (10, 60)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # lightly-train's default


def steps_per_epoch(n_images: int, batch_size: int) -> int:
    """Steps of one epoch with the last partial batch dropped, as lightly-train's loader does."""
    return max(1, n_images // batch_size)


def estimate_epochs(budget_s: float, n_images: int, batch_size: int, step_seconds: float) -> int:
    """Whole epochs that fit in the budget at ``step_seconds`` a step (at least one)."""
    epoch_s = steps_per_epoch(n_images, batch_size) * step_seconds
    return max(1, math.floor(budget_s / epoch_s))


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
    command = [sys.executable, "-c", "import sys; from mtl_unsup.benchmarks.peer_lightly import "
               "lightly_worker; lightly_worker(sys.argv[1])", str(run_dir / "spec.json")]
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
