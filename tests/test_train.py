"""End to end through Hydra: the compose API, the real command line, sweeps and config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from PIL import Image

from mtl_unsup.config import ConfigValueError
from mtl_unsup.data.images import DataError
from mtl_unsup.inference import model_from_checkpoint, predict_images
from mtl_unsup.metrics import score_clustering
from mtl_unsup.report import report
from mtl_unsup.train import build_run, train

from .conftest import compose_cfg, tiny_folder_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_compose_train_writes_metrics_and_checkpoints(shapes_dir, tmp_path):
    metrics = train(compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "pictures=true"]))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved == metrics
    names = {"silhouette", "agreement", "acc", "nmi", "ari", "kmeans_acc", "kmeans_nmi", "kmeans_ari"}
    own = {k for k in saved if not k.startswith("candidates/")}
    assert own == {f"{split}/{name}" for split in ("test", "val", "train") for name in names}
    # the answer's candidates: the head and k-means, each with its criteria and, read, its scores
    assert {k for k in saved if k.endswith("/silhouette_last")} == {
        "candidates/cluster/silhouette_last", "candidates/kmeans/silhouette_last"}
    assert saved["train/agreement"] >= 0.5  # the head reported is a clustering, not a stale one
    # the figures are those of the saved model, predicted in eval mode, one image at a time or not
    # (the model of the chosen answer: checkpoints/answer.ckpt when it is not the head's)
    answer = tmp_path / "checkpoints" / "answer.ckpt"
    module, cfg = model_from_checkpoint(answer if answer.exists() else tmp_path / "checkpoints" / "last.ckpt")
    run = build_run(compose_cfg(tmp_path / "again", tiny_folder_overrides(shapes_dir)))
    test = run.datamodule.splits["test"]
    preds = predict_images(module.train(), cfg, test, batch_size=5, progress=False)
    scores = score_clustering(torch.from_numpy(preds.clusters), torch.tensor(test.labels))
    assert scores["acc"] == pytest.approx(saved["test/acc"])
    assert module.training  # predict_images restored the mode it was given
    # the default keeps last.ckpt (and the one it replaced, the fallback of a resume) only: no
    # checkpoint is chosen, least of all with labels
    kept = ["last.ckpt", "last.ckpt.prev"] + (["answer.ckpt"] if answer.exists() else [])
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == sorted(kept)
    assert (tmp_path / "csv" / "metrics.csv").is_file()
    for name in ("cluster_grid", "confusion", "embedding", "training_curves"):
        with Image.open(tmp_path / "pictures" / f"{name}.png") as picture:
            assert picture.format == "PNG" and np.asarray(picture.convert("L")).std() > 10


def run_cli(args: list[str], cwd: Path, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MTL_UNSUP_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "mtl_unsup.train", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_command_line_run_on_default_digits(tmp_path):
    """The main job's path: built-in digits written once, Hydra run dir, table printed, and a
    console without the third-party noise users cannot act on."""
    run_dir = tmp_path / "run"
    args = ["backbone.widths=[8,16]", "backbone.convs_per_stage=1", "trainer.max_epochs=2",
            "task.cluster.start_epoch=1", "trainer.check_val_every_n_epoch=1",
            "trainer.enable_progress_bar=false", "print_config=false", f"hydra.run.dir={run_dir}"]
    proc = run_cli(args, cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    console = proc.stdout + proc.stderr
    for noise in ("Tip: For seamless", "`weights_only` was not set", "is deprecated",
                  "smaller than the logging interval", "Sparse invariant checks", "Warning"):
        assert noise not in console, noise
    assert "epoch 1 clusters:" in console  # what is ours stays
    assert "| test |" in proc.stdout and str(run_dir / "metrics.json") in proc.stdout
    assert (tmp_path / "cache" / "digits" / "0").is_dir()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"test/acc", "test/nmi", "test/ari", "train/acc"} <= set(metrics)


@pytest.mark.slow
def test_multirun_gives_each_job_its_own_dir_and_metrics(shapes_dir, tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [o for o in tiny_folder_overrides(shapes_dir) if not o.startswith("cluster.k")]
    args = ["-m", *overrides, "trainer.max_epochs=1", "trainer.enable_progress_bar=false",
            "cluster.k=2,3", f"hydra.sweep.dir={sweep}"]
    proc = run_cli(args, cwd=tmp_path, cache=tmp_path / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    for job, k in zip(jobs, ("2", "3"), strict=True):
        assert {"test/acc", "val/silhouette"} <= set(json.loads((job / "metrics.json").read_text()))
        ckpt = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
        assert ckpt["cluster_state"]["centroids"].shape[0] == int(k)  # each job ran its own k
        assert f"cluster.k={k}" in (job / ".hydra" / "overrides.yaml").read_text()
        info = json.loads((job / "run_info.json").read_text())
        assert info["libraries"]["torch"] and info["hardware"]["cpu_count"]
    table = report(sweep)  # the sweep ends in a results table grouped by the swept key
    assert "| cluster.k | runs |" in table and "| 2 | 1/1 |" in table and "| 3 | 1/1 |" in table


@pytest.mark.parametrize(
    ("override", "error", "names"),
    [
        ("cluster.kk=3", ConfigCompositionException, "cluster.kk"),
        ("cluster.niter=ten", ConfigCompositionException, "cluster.niter"),
        ("backbone=resnet1000", MissingConfigException, "resnet1000"),
        ("task=[cluster,jigsaw]", MissingConfigException, "jigsaw"),
    ],
)
def test_config_mistakes_fail_at_composition_naming_the_key(tmp_path, override, error, names):
    with pytest.raises(error, match=names):
        compose_cfg(tmp_path, [override])


@pytest.mark.parametrize(
    ("override", "names"),
    [
        ("cluster.k=1", "cluster.k=1"),
        ("task=[]", "task is empty"),
        ("task.cluster.weight=-1", "task.cluster.weight=-1"),
    ],
)
def test_bad_values_fail_before_any_data_is_read(tmp_path, override, names):
    cfg = compose_cfg(tmp_path, ["data=folder", "protocol=single", f"data.root={tmp_path / 'missing'}",
                                 override])
    with pytest.raises(ConfigValueError, match=names):
        train(cfg)


def test_k_above_the_number_of_images_is_named(shapes_dir, tmp_path):
    cfg = compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "cluster.k=500"])
    with pytest.raises(DataError, match="cluster.k=500 is larger than the 42 training images"):
        train(cfg)


def test_missing_data_root_is_named(tmp_path):
    cfg = compose_cfg(tmp_path, ["data=folder", f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(DataError, match="nowhere does not exist"):
        train(cfg)




def test_same_seed_gives_identical_metrics(shapes_dir, tmp_path):
    overrides = [*tiny_folder_overrides(shapes_dir), "trainer.deterministic=true", "seed=0"]
    first = train(compose_cfg(tmp_path / "a", overrides))
    second = train(compose_cfg(tmp_path / "b", overrides))
    assert (tmp_path / "a" / "metrics.json").read_text() == (tmp_path / "b" / "metrics.json").read_text()
    other = train(compose_cfg(tmp_path / "c", [*overrides[:-1], "seed=1"]))
    assert first == second and other != first


def test_slurm_launcher_config_follows_the_trainer(tmp_path):
    from hydra import compose, initialize_config_dir

    from .conftest import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4 and launcher.nodes == 2


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shapes_dir, tmp_path):
    from mtl_unsup.models.module import NonFiniteLossError

    cfg = compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "optimizer.lr=1e30",
                                 "checkpoint.every_n_train_steps=1", "trainer.max_epochs=20",
                                 "scheduler=null"])
    with pytest.raises(NonFiniteLossError, match=r"became (nan|inf).*last good checkpoint is .*last\.ckpt"):
        train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "metrics.json").exists()


def test_a_second_run_into_the_same_dir_is_refused(shapes_dir, tmp_path):
    from mtl_unsup.resume import RunDirError

    train(compose_cfg(tmp_path, tiny_folder_overrides(shapes_dir)))
    before = (tmp_path / "metrics.json").read_text()
    with pytest.raises(RunDirError, match="already holds a run"):
        train(compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "seed=3"]))
    assert (tmp_path / "metrics.json").read_text() == before


def test_a_ckpt_path_that_is_no_checkpoint_is_named_before_training(shapes_dir, tmp_path):
    from mtl_unsup.inference import CheckpointError

    junk = tmp_path / "junk.ckpt"
    junk.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"ckpt_path='.*junk\.ckpt' is truncated, or not a checkpoint"):
        train(compose_cfg(tmp_path / "run", [*tiny_folder_overrides(shapes_dir), f"ckpt_path={junk}"]))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_time_budget_given_as_a_dict_reaches_lightning(shapes_dir, tmp_path):
    overrides = [*tiny_folder_overrides(shapes_dir), "trainer.max_time={minutes: 5}"]
    metrics = train(compose_cfg(tmp_path, overrides))
    assert "test/kmeans_acc" in metrics
