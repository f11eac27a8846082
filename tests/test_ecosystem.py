"""The tools researchers already use: loggers, callbacks, debug presets, a hyper-parameter search,
and a command line that answers before the heavy libraries load."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtl_unsup.config import CONF_DIR, ConfigValueError, register_configs
from mtl_unsup.extensions import check_extensions
from mtl_unsup.history import read_history
from mtl_unsup.train import build_run, train

from .conftest import compose_cfg, tiny_folder_overrides, write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return write_shapes(tmp_path_factory.mktemp("eco") / "shapes", per_class=12)


@pytest.mark.slow
def test_every_logger_writes_and_the_curves_need_none(shapes, tmp_path):
    everything = ["logger=[csv,tensorboard,mlflow,wandb]",
                  "callbacks=[default,lr_monitor,early_stopping,rich_progress_bar]",
                  "trainer.enable_progress_bar=true", "pictures=true", "pictures_every_n_epochs=1"]
    train(compose_cfg(tmp_path / "all", [*tiny_folder_overrides(shapes), *everything]))
    out = tmp_path / "all"
    assert (out / "csv" / "metrics.csv").is_file()
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "mlflow.db").stat().st_size > 0
    assert list((out / "wandb").glob("offline-run-*"))  # offline: nothing left the machine
    # the pictures, in each logger's own way: images in TensorBoard and W&B, artifacts in MLflow,
    # files for CSV; every epoch (pictures_every_n_epochs=1) and at the end
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "tensorboard").rglob("events.out.tfevents.*")).parent),
                              size_guidance={"images": 0})
    images = events.Reload().Tags()["images"]
    assert {"pictures/cluster_grid", "pictures/confusion", "pictures/training_curves"} <= set(images)
    assert len(events.Images("pictures/cluster_grid")) == 3  # epochs 0 and 1, then the end
    assert len(list((out / "wandb").rglob("media/images/pictures/cluster_grid_*.png"))) == 3
    logged = {p.name for p in (out / "mlflow-artifacts").rglob("*.png")}
    assert {"epoch000_cluster_grid.png", "cluster_grid.png", "confusion.png"} <= logged
    assert (out / "pictures" / "epochs" / "epoch001_confusion.png").is_file()
    rows = read_history(out / "epochs.jsonl")
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[0]["train/lr"] == pytest.approx(0.002) and "val/silhouette" in rows[1]
    # no logger at all: the history, and the picture drawn from it, are still there; a metric
    # appears in the epochs that measured it (validation every 2nd epoch, clustering from epoch 2)
    sparse = ["~logger", "pictures=true", "trainer.max_epochs=4", "trainer.check_val_every_n_epoch=2",
              "task.cluster.start_epoch=2"]
    train(compose_cfg(tmp_path / "none", [*tiny_folder_overrides(shapes), *sparse]))
    assert not (tmp_path / "none" / "csv").exists()
    rows = read_history(tmp_path / "none" / "epochs.jsonl")
    assert [("val/silhouette" in r, "cluster/size_min" in r, "train/loss" in r) for r in rows] == [
        (False, False, True), (True, False, True), (False, True, True), (True, True, True)]
    assert (tmp_path / "none" / "pictures" / "training_curves.png").stat().st_size > 1000


def test_a_missing_package_names_its_extra_before_any_data_is_read(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    cfg = compose_cfg(tmp_path, ["logger=[csv,wandb]", "data.root=/nowhere"])
    with pytest.raises(ConfigValueError, match=r"logger.wandb needs the wandb package: pip install "
                                               r"'mtl-unsup\[wandb\]'"):
        check_extensions(cfg)
    no_logger = compose_cfg(tmp_path, [*tiny_folder_overrides(tmp_path), "~logger", "callbacks=[lr_monitor]"])
    with pytest.raises(ConfigValueError, match="lr_monitor writes to a logger"):
        build_run(no_logger)  # before any data is read: this folder has no images


def test_early_stopping_stops_on_a_label_free_metric_and_a_typo_is_named(shapes, tmp_path):
    stop = ["callbacks=[early_stopping]", "callbacks.early_stopping.patience=0",
            "callbacks.early_stopping.min_delta=10", "trainer.max_epochs=6"]
    train(compose_cfg(tmp_path / "a", [*tiny_folder_overrides(shapes), *stop]))
    # the first validation sets the best; the second cannot beat it by 10: the run stops there
    assert [r["epoch"] for r in read_history(tmp_path / "a" / "epochs.jsonl")] == [0, 1]
    typo = compose_cfg(tmp_path / "b", [*tiny_folder_overrides(shapes), "callbacks=[early_stopping]",
                                        "callbacks.early_stopping.monitor=val/silhouete"])
    with pytest.raises(ConfigValueError, match="early_stopping.monitor=val/silhouete.*Label-free"):
        build_run(typo)
    loss = compose_cfg(tmp_path / "c", [*tiny_folder_overrides(tmp_path / "none"),
                                        "callbacks=[early_stopping]",
                                        "callbacks.early_stopping.monitor=train/loss"])
    with pytest.raises(ConfigValueError, match="mode=min"):  # before any image is read
        build_run(loss)


def compose_with_hydra(overrides: list[str]):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(("preset", "expect"), [
    ("fdr", {"trainer.fast_dev_run": True, "data.limit": 256}),
    ("limit", {"trainer.max_epochs": 3, "data.limit": 1000}),
    ("overfit", {"trainer.overfit_batches": 1}),
    ("profiler", {"trainer.profiler": "simple"}),
])
def test_debug_presets_set_their_keys_and_write_apart(preset, expect):
    cfg = compose_with_hydra([f"debug={preset}"])
    for key, value in expect.items():
        assert OmegaConf.select(cfg, key) == value, key
    assert cfg.hydra.run.dir.startswith("outputs/debug/runs/")
    assert cfg.hydra.sweep.dir.startswith("outputs/debug/multirun/")


def test_a_fast_dev_run_reads_at_most_the_limit_and_runs_everything(tmp_path):
    root = write_shapes(tmp_path / "many", per_class=40)  # 120 images
    cfg = compose_cfg(tmp_path / "run", [*tiny_folder_overrides(root), "debug=fdr", "data.limit=20"])
    run = build_run(cfg)
    assert {k: len(v) for k, v in run.datamodule.splits.items()} == {"train": 20, "val": 12, "test": 20}
    metrics = train(cfg)
    assert "test/acc" in metrics and (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_a_two_trial_optuna_search_optimises_the_label_free_objective(shapes, tmp_path):
    args = [*tiny_folder_overrides(shapes), "hparams_search=optuna", "hydra.sweeper.n_trials=2",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "print_config=false", "pictures=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "mtl_unsup.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    trials = [json.loads((tmp_path / "sweep" / str(i) / "metrics.json").read_text()) for i in (0, 1)]
    assert result["best_value"] == pytest.approx(max(t["val/silhouette"] for t in trials))
    # the search space of conf/hparams_search/optuna.yaml, less what the command fixed (batch size)
    assert set(result["best_params"]) == {"optimizer.lr", "optimizer.weight_decay"}


BLOCK_HEAVY = """
import sys
for name in ("torch", "lightning", "faiss", "torchvision", "kornia", "sklearn"):
    sys.modules[name] = None  # importing any of them now fails
from mtl_unsup.{command} import main
main()
"""


@pytest.mark.parametrize("command", ["train", "predict", "evaluate", "export"])
def test_help_and_config_errors_need_no_heavy_library(command, tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", BLOCK_HEAVY.format(command=command), *args],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    helped = run("--help")
    assert helped.returncode == 0 and "Configuration groups" in helped.stdout, helped.stderr[-2000:]
    key = "trainer.max_epoch" if command == "train" else "devise"
    typo = run(f"{key}=3")
    assert typo.returncode == 2 and f"Could not override '{key}'" in typo.stderr, typo.stderr[-2000:]
    if command == "train":
        bad = run("cluster.every_n_epochs=0")
        assert bad.returncode == 2 and "cluster.every_n_epochs=0: must be >= 1" in bad.stderr


def test_a_diverged_trial_scores_nan_and_the_sweep_goes_on(shapes, tmp_path):
    from mtl_unsup.clustering.callback import check_finite
    from mtl_unsup.models.module import NonFiniteLossError

    with pytest.raises(NonFiniteLossError, match="weights have diverged"):
        check_finite(torch.tensor([[0.0, float("nan")]]), epoch=3)
    args = ["-m", *tiny_folder_overrides(shapes), "optimizer.lr=1e12,0.002", "scheduler=null",
            f"hydra.sweep.dir={tmp_path / 'sweep'}", "print_config=false"]
    proc = subprocess.run([sys.executable, "-m", "mtl_unsup.train", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "This trial scores NaN; the sweep goes on." in proc.stdout
    assert not (tmp_path / "sweep" / "0" / "metrics.json").exists()
    assert (tmp_path / "sweep" / "1" / "metrics.json").is_file()  # the next job ran
