"""Pseudo-labels belong to their data: a checkpoint never lends its labels to other images."""

import logging
import shutil

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from mtl_unsup.data import ImageFolderDataModule, scan_folder
from mtl_unsup.data.images import DataError
from mtl_unsup.train import train

from .conftest import compose_cfg, tiny_folder_overrides


def renamed_copy(src, dst):
    """The same number of images of the same sizes, under other names: another data set."""
    for path in sorted(src.rglob("*.png")):
        target = dst / path.parent.name / f"other_{path.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    return dst


def test_the_fingerprint_follows_the_images_not_the_folder(shapes_dir, tmp_path):
    moved = shutil.copytree(shapes_dir, tmp_path / "moved")
    other = renamed_copy(shapes_dir, tmp_path / "other")
    prints = [scan_folder(root).fingerprint() for root in (shapes_dir, moved, other)]
    assert prints[0] == prints[1] != prints[2]
    images = scan_folder(shapes_dir)
    assert images.subset([1, 0]).fingerprint() != images.subset([0, 1]).fingerprint()  # order counts
    bitmaps = []  # same names, same sizes (BMP has no compression), other pixels
    for seed in (0, 1):
        folder = tmp_path / f"bmp{seed}"
        folder.mkdir()
        pixels = np.random.default_rng(seed).integers(0, 255, (2, 16, 16), dtype=np.uint8)
        for i, img in enumerate(pixels):
            Image.fromarray(img, mode="L").save(folder / f"{i}.bmp")
        bitmaps.append(scan_folder(folder).fingerprint())
    assert bitmaps[0] != bitmaps[1]


def test_resuming_on_other_images_stops_naming_both_folders(shapes_dir, tmp_path):
    train(compose_cfg(tmp_path / "run", [*tiny_folder_overrides(shapes_dir), "trainer.max_epochs=1"]))
    other = renamed_copy(shapes_dir, tmp_path / "other")
    before = (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes()
    cfg = compose_cfg(tmp_path / "run", [*tiny_folder_overrides(other), "trainer.max_epochs=2",
                                         "resume=true"])
    with pytest.raises(DataError, match=rf"(?s){shapes_dir}.*{other}.*ckpt_path="):
        train(cfg)
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").read_bytes() == before


class RecordClustering(L.Callback):
    def __init__(self) -> None:
        self.fingerprints: list[str] = []

    def on_train_epoch_start(self, trainer, module) -> None:  # after the pseudo-label callback
        self.fingerprints.append(module.cluster_state.fingerprint)


def test_a_new_run_from_a_checkpoint_of_other_images_clusters_afresh(shapes_dir, tmp_path, caplog):
    train(compose_cfg(tmp_path / "first", tiny_folder_overrides(shapes_dir)))  # finished: 2 epochs
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    first = torch.load(ckpt, weights_only=True)["state_dict"]
    other = renamed_copy(shapes_dir, tmp_path / "other")
    recorder = RecordClustering()
    cfg = compose_cfg(tmp_path / "second", [*tiny_folder_overrides(other), f"ckpt_path={ckpt}"])
    with caplog.at_level(logging.WARNING):
        train(cfg, extra_callbacks=(recorder,))
    assert "its clustering is not" in caplog.text
    dm = ImageFolderDataModule(str(other), channels=1, image_size=16)
    dm.setup()
    # a new run: its own 2 epochs from epoch 0, each on labels of its own images
    assert recorder.fingerprints == [dm.fingerprint] * 2
    saved = torch.load(tmp_path / "second" / "checkpoints" / "last.ckpt", weights_only=True)
    assert saved["cluster_state"]["fingerprint"] == dm.fingerprint
    assert not torch.equal(saved["state_dict"]["backbone.net.0.weight"], first["backbone.net.0.weight"])


def test_a_checkpoint_of_another_model_is_named(shapes_dir, tmp_path):
    from mtl_unsup.errors import CheckpointError

    train(compose_cfg(tmp_path / "first", tiny_folder_overrides(shapes_dir)))
    ckpt = tmp_path / "first" / "checkpoints" / "last.ckpt"
    cfg = compose_cfg(tmp_path / "second", [*tiny_folder_overrides(shapes_dir), f"ckpt_path={ckpt}",
                                            "backbone.widths=[8,32]"])
    with pytest.raises(CheckpointError, match=r"ckpt_path=.*does not fit this model"):
        train(cfg)
