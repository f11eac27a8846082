"""Labels never choose anything: not the checkpoint, not the sweep objective, unless named."""

import logging

import lightning as L
import pytest
import torch

from mtl_unsup.clustering.kmeans import ClusterState, cluster_features
from mtl_unsup.config import ConfigValueError
from mtl_unsup.data import ImageFolderDataModule, ImageList
from mtl_unsup.inference import eval_mode
from mtl_unsup.metrics import reads_labels, score_clustering
from mtl_unsup.train import build_run, objective, train

from .conftest import compose_cfg, tiny_folder_overrides


def permute_labels(monkeypatch) -> None:
    """Every data module of the test reads shuffled ground truth (same images, same order)."""
    setup = ImageFolderDataModule.setup

    def shuffled_setup(self, stage=None):
        fresh = not self.splits
        setup(self, stage)
        for name, split in self.splits.items() if fresh else ():
            perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(1)).tolist()
            self.splits[name] = ImageList(split.paths, tuple(split.labels[i] for i in perm), split.classes)

    monkeypatch.setattr(ImageFolderDataModule, "setup", shuffled_setup)


def test_the_default_objective_and_a_label_free_monitor_ignore_labels(shapes_dir, tmp_path, monkeypatch):
    overrides = [*tiny_folder_overrides(shapes_dir), "trainer.max_epochs=3", "trainer.deterministic=true",
                 "checkpoint.monitor=val/silhouette", "checkpoint.save_top_k=1"]
    cfg = compose_cfg(tmp_path / "a", overrides)
    assert cfg.optimized_metric == "val/silhouette" and not reads_labels(cfg.optimized_metric)
    plain = train(cfg)
    permute_labels(monkeypatch)
    shuffled = train(compose_cfg(tmp_path / "b", overrides))
    assert plain["test/acc"] != shuffled["test/acc"]  # the labels did change what is reported...
    assert objective(cfg, plain) == objective(cfg, shuffled) == plain["val/silhouette"]  # ...nothing else
    best = [sorted(p.name for p in (tmp_path / run / "checkpoints").iterdir()) for run in ("a", "b")]
    assert best[0] == best[1] and any(name.startswith("best-") for name in best[0])
    weights = [torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
               for run in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_a_labelled_monitor_works_only_by_name_and_says_so(shapes_dir, tmp_path, caplog, capsys):
    cfg = compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "checkpoint.monitor=val/acc"])
    with caplog.at_level(logging.WARNING):
        train(cfg)
    assert "checkpoint.monitor=val/acc reads ground-truth labels" in caplog.text
    assert "best by val/acc (chosen with ground-truth labels)" in capsys.readouterr().out


@pytest.mark.parametrize(("override", "named"), [
    ("optimized_metric=val/acc", r"optimized_metric=val/acc is not a metric this run gives \(it reads"),
    ("checkpoint.monitor=test/silhouette", "checkpoint.monitor=test/silhouette is not a metric"),
    ("checkpoint.monitor=val/silhoutte", r"val/silhoutte is not a metric.*choices: train/loss"),
    ("checkpoint.monitor=cluster/nmi_prev", "cluster/nmi_prev is not a metric"),  # not every epoch
    ("optimized_metric=train/loss", "optimized_metric=train/loss is not a metric"),
])
def test_a_metric_the_run_cannot_give_stops_it_before_training(tmp_path, override, named):
    from .conftest import write_shapes

    root = write_shapes(tmp_path / "flat", labelled=False)
    cfg = compose_cfg(tmp_path / "run", [*tiny_folder_overrides(root), override])
    with pytest.raises(ConfigValueError, match=named):
        train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_reads_labels_knows_which_metrics_use_ground_truth():
    assert all(reads_labels(m) for m in ("val/acc", "test/kmeans_nmi", "train/ari", "cluster/train_acc"))
    assert not any(reads_labels(m) for m in ("val/silhouette", "cluster/nmi_prev", "train/loss",
                                             "val/agreement"))


class ScrambleClustering(L.Callback):
    """Replaces the training clustering with nonsense right before validation."""

    def on_validation_start(self, trainer, module) -> None:
        old = module.cluster_state
        g = torch.Generator().manual_seed(0)
        self.state = ClusterState(old.labels, torch.randn(old.centroids.shape, generator=g), old.pca_mean,
                                  old.pca_proj, old.epoch)
        module.cluster_state = self.state


def test_validation_kmeans_is_the_training_clustering_unless_a_stage_keeps_an_old_one(shapes_dir, tmp_path):
    """val/kmeans_* assign the split to the training clustering's centroids, as the final test
    does (one name, one computation); a stage that keeps its clustering while the backbone trains
    on (refresh once / never) fits k-means on the current validation features instead."""
    cfg = compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "trainer.max_epochs=1"])
    run = build_run(cfg)
    run.trainer.fit(run.module, datamodule=run.datamodule)
    scramble = ScrambleClustering()
    run.trainer.callbacks.append(scramble)
    val = run.datamodule._dataset("val")
    images = torch.stack([val[i]["image"] for i in range(len(val))])
    with eval_mode(run.module), torch.no_grad():
        features = run.module.features(images)
    labels = torch.tensor(val.images.labels)

    logged = run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)[0]
    assigned = score_clustering(scramble.state.assign(features)[0], labels)
    assert logged["val/kmeans_acc"] == pytest.approx(assigned["acc"])
    assert logged["val/kmeans_nmi"] == pytest.approx(assigned["nmi"], abs=1e-6)

    run.module.refresh_policy = "once"
    logged = run.trainer.validate(run.module, datamodule=run.datamodule, verbose=False)[0]
    fresh = cluster_features(features, 3, pca_dim=8, nredo=cfg.cluster.nredo, seed=cfg.seed).labels
    refit = score_clustering(fresh, labels)
    assert logged["val/kmeans_acc"] == pytest.approx(refit["acc"])
    assert logged["val/kmeans_nmi"] == pytest.approx(refit["nmi"], abs=1e-6)
