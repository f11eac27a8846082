"""cluster.features=bank: refreshes read the training pass's features instead of a pass of their own."""

import csv

import numpy as np
import pytest
import torch

from mtl_unsup.clustering.bank import FeatureBank
from mtl_unsup.data.datamodule import ImageFolderDataModule
from mtl_unsup.train import build_run, train

from .conftest import compose_cfg, tiny_folder_overrides


def test_the_bank_keeps_the_latest_row_per_image_and_says_which_rows_it_has():
    bank = FeatureBank(5, 3)
    bank.remember(torch.tensor([0, 2]), torch.ones(2, 3), step=1)
    bank.remember(torch.tensor([2, 4]), torch.full((2, 3), 2.0), step=2)
    features, written = bank.gather()
    assert written.tolist() == [True, False, True, False, True]
    assert features[2].tolist() == [2.0, 2.0, 2.0] and features[0].tolist() == [1.0, 1.0, 1.0]
    again = FeatureBank(5, 3)
    again.load_checkpoint_state(bank.checkpoint_state())
    assert torch.equal(again.gather()[0], features) and torch.equal(again.written, bank.written)
    other = FeatureBank(6, 3)
    other.load_checkpoint_state(bank.checkpoint_state())  # another data set: starts empty
    assert not other.gather()[1].any()


@pytest.mark.parametrize("source", ["pass", "bank"])
def test_with_the_bank_only_the_first_and_the_final_clustering_embed_the_training_set(
        shapes_dir, tmp_path, monkeypatch, source):
    passes = []
    original = ImageFolderDataModule.cluster_dataloader
    monkeypatch.setattr(ImageFolderDataModule, "cluster_dataloader",
                        lambda self, *a, **k: passes.append(1) or original(self, *a, **k))
    out = tmp_path / source
    overrides = [*tiny_folder_overrides(shapes_dir), "trainer.max_epochs=3", f"cluster.features={source}"]
    metrics = train(compose_cfg(out, overrides))
    # a refresh at each of the 3 epochs, and the final clustering (always a full, exact pass)
    assert len(passes) == (4 if source == "pass" else 2)
    assert metrics["test/kmeans_acc"] > 0.5
    if source == "bank":
        log = list(csv.DictReader((out / "csv" / "metrics.csv").read_text().splitlines()))
        assert [r["cluster/from_bank"] for r in log if r.get("cluster/from_bank")] == ["0.0", "1.0", "1.0"]


def test_fixed_features_get_no_bank(shapes_dir, tmp_path):
    image_run = build_run(compose_cfg(tmp_path / "a", tiny_folder_overrides(shapes_dir)))
    assert image_run.module.feature_bank is not None  # the default: cluster.features=bank
    x = torch.randn(40, 6)
    np.savez(tmp_path / "rows.npz", embeddings=x.numpy())
    rows = ["data=embeddings", f"data.path={tmp_path / 'rows.npz'}", "cluster.k=3", "cluster.pca_dim=4",
            "task.scan.num_neighbors=3"]
    rows_run = build_run(compose_cfg(tmp_path / "b", rows))
    assert rows_run.module.features_fixed and rows_run.module.feature_bank is None
