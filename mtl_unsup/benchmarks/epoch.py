"""Benchmark: where a training epoch's time goes, and the framework against a bare loop.

``python -m mtl_unsup.benchmarks.epoch [train overrides]`` (e.g. ``data.root=<folder>``, which
implies ``data=folder``; the bundled digits by default) measures in one process, on the same data,
and prints ``name=value`` lines:

- ``setup_seconds``: building the data module (scanning the folder, checking every file's size
  and header, split).
- ``decode_seconds``: decoding the training split into the in-memory cache (once a run, before
  the first step; 0 when the split is streamed).
- ``framework_epoch_seconds``: the second training epoch of ``mtl-train`` (Lightning, callbacks,
  logging, ``last.ckpt`` every ``checkpoint.every_n_train_steps``), the refresh excluded.
- ``bare_epoch_seconds``: one epoch of a bare PyTorch loop over the same loader, model, tasks,
  augmentations and targets (``training_step``, ``backward``, the optimizer's step; no Lightning).
- ``framework_vs_bare``: bare seconds / framework seconds (1.0: the framework costs nothing).
- ``loader_wait_share``: of the framework epoch's steps, the share spent waiting for the next batch
  (fetching, collating and moving it to the device) rather than computing.
- ``refresh_seconds``, ``refresh_share``: the pseudo-label refresh at the start of the second
  epoch (feature pass, PCA, k-means, neighbours), and its share of that epoch's training time.
- ``kmeans_seconds``, ``kmeans_vs_flop_limit``: k-means of the training set's size (N rows of
  ``cluster.pca_dim``, k clusters, ``niter`` x ``nredo`` iterations, random rows) against its
  floor, N*k*d*2 flops per iteration at the matmul speed measured here (``matmul_gflops``).

The run uses ``warmup_epochs=0`` and ``cluster.every_n_epochs=1``, so that every task trains in
both epochs and the second starts with a refresh; tasks that read other images by index (``scan``)
are left out of the bare loop's reach, so the default tasks are the image-view ones.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

DEFAULTS = ["warmup_epochs=0", "cluster.every_n_epochs=1", "trainer.max_epochs=2",
            "trainer.check_val_every_n_epoch=100", "print_config=false", "pictures=false",
            "trainer.enable_progress_bar=false", "protocol=single"]


class StepTimer(L.Callback):
    """Per epoch: seconds computing steps, seconds waiting between them, and the whole epoch."""

    def __init__(self) -> None:
        self.epochs: list[dict[str, float]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epochs.append({"step": 0.0, "wait": 0.0, "steps": 0})
        self._start = self._last_end = time.perf_counter()

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        now = time.perf_counter()
        self.epochs[-1]["wait"] += now - self._last_end
        self._step_start = now

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        self._last_end = time.perf_counter()
        self.epochs[-1]["step"] += self._last_end - self._step_start
        self.epochs[-1]["steps"] += 1

    def on_train_epoch_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self.epochs[-1]["epoch"] = time.perf_counter() - self._start


def bare_epoch(module: Any, loader: Any) -> float:
    """Seconds of one epoch of a plain loop: the module's own training step, backward, step."""
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    module._trainer = None  # self.log without a trainer is a no-op
    module.train()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, batch in enumerate(loader):
            batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss = module.training_step(batch, i)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return time.perf_counter() - start


def matmul_gflops(size: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def kmeans_seconds(n: int, d: int, k: int, niter: int, nredo: int) -> float:
    from mtl_unsup.clustering.kmeans import run_kmeans

    x = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    start = time.perf_counter()
    run_kmeans(x, k, niter=niter, nredo=nredo, seed=0)
    return time.perf_counter() - start


def measure(overrides: list[str], out: Path) -> dict[str, float]:
    from hydra import compose, initialize_config_dir

    from mtl_unsup.clustering.callback import PseudoLabelCallback
    from mtl_unsup.config import CONF_DIR, max_clusters, register_configs
    from mtl_unsup.train import build_datamodule, build_run

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={out}"])
    start = time.perf_counter()
    datamodule = build_datamodule(cfg.copy())
    setup = time.perf_counter() - start
    datamodule.train_dataloader()
    decode = time.perf_counter() - start - setup
    del datamodule
    run = build_run(cfg)
    timer, refreshes = StepTimer(), []
    refresh = PseudoLabelCallback.refresh

    def timed_refresh(self: Any, *args: Any, **kwargs: Any) -> Any:
        begin = time.perf_counter()
        result = refresh(self, *args, **kwargs)
        refreshes.append(time.perf_counter() - begin)
        return result

    PseudoLabelCallback.refresh = timed_refresh
    try:
        run.trainer.callbacks.append(timer)
        run.trainer.fit(run.module, datamodule=run.datamodule)
    finally:
        PseudoLabelCallback.refresh = refresh
    epoch = timer.epochs[-1]
    bare = bare_epoch(run.module, run.datamodule.train_dataloader())
    n, k = run.datamodule.num_train, max_clusters(cfg.cluster)
    d = cfg.cluster.pca_dim or run.module.backbone.feature_dim
    kmeans = kmeans_seconds(n, d, k, cfg.cluster.niter, cfg.cluster.nredo)
    gflops = matmul_gflops()
    floor = 2 * n * k * d * cfg.cluster.niter * cfg.cluster.nredo / (gflops * 1e9)
    return {
        "setup_seconds": setup, "decode_seconds": decode, "train_images": n,
        "steps_per_epoch": epoch["steps"],
        "framework_epoch_seconds": epoch["epoch"], "bare_epoch_seconds": bare,
        "framework_vs_bare": bare / epoch["epoch"],
        "loader_wait_share": epoch["wait"] / (epoch["wait"] + epoch["step"]),
        "refresh_seconds": refreshes[-1], "refresh_share": refreshes[-1] / epoch["epoch"],
        "kmeans_seconds": kmeans, "matmul_gflops": gflops, "kmeans_vs_flop_limit": kmeans / floor,
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    given = list(sys.argv[1:] if argv is None else argv)
    if any(o.startswith("data.root=") for o in given) and not any(o.startswith("data=") for o in given):
        given.insert(0, "data=folder")  # a folder of images, not the digits' cache folder
    overrides = [*DEFAULTS, *given]
    with tempfile.TemporaryDirectory() as tmp:
        figures = measure(overrides, Path(tmp) / "run")
    print(f"overrides={' '.join(overrides)}")
    for name, value in figures.items():
        print(f"{name}={value:.4g}" if isinstance(value, float) else f"{name}={value}")
    return figures


if __name__ == "__main__":
    main()
