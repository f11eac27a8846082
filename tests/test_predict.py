"""Using a trained model: predict and evaluate from the checkpoint alone."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from mtl_unsup.config import DataConfig
from mtl_unsup.data.images import DataError
from mtl_unsup.errors import UserError
from mtl_unsup.evaluate import EvaluateConfig, evaluate, knn_accuracy
from mtl_unsup.inference import CheckpointError, model_from_checkpoint
from mtl_unsup.predict import PredictConfig, predict
from mtl_unsup.train import train

from .conftest import CONF_DIR, compose_cfg, tiny_folder_overrides, write_shapes


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("trained")
    train(compose_cfg(base / "run", tiny_folder_overrides(write_shapes(base / "shapes"))))
    return base / "run" / "checkpoints" / "last.ckpt"


def predict_cfg(**kw) -> OmegaConf:
    cfg = OmegaConf.structured(PredictConfig)
    cfg.data = OmegaConf.structured(DataConfig)  # what data=folder brings
    cfg.progress = False
    for key, value in kw.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_checkpoint_alone_rebuilds_the_model(trained):
    module, cfg = model_from_checkpoint(trained)
    assert cfg.cluster.k == 3 and module.cluster_state is not None and not module.training
    raw = torch.load(trained, weights_only=True)  # what the loader uses: no pickled code
    assert torch.equal(module.cluster_state.centroids, raw["cluster_state"]["centroids"])


def test_predict_writes_csv_embeddings_and_sorted_links(trained, tmp_path):
    folder = write_shapes(tmp_path / "new", per_class=4, seed=5, labelled=False)
    (folder / "sub").mkdir()
    (folder / "sub" / "c0_000.png").write_bytes((folder / "c0_000.png").read_bytes())  # same name
    (folder / "naïve ünïcode.png").write_bytes((folder / "c1_000.png").read_bytes())
    out = tmp_path / "out"
    predict(predict_cfg(ckpt=str(trained), **{"data.root": str(folder)}, out_dir=str(out),
                        save_embeddings=True, sort="symlink"))
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert len(rows) == 14 and {r["path"] for r in rows} >= {str(folder / "naïve ünïcode.png")}
    # the head's softmax probability of its choice: at least 1/k
    assert all(0 <= int(r["cluster"]) < 3 and 1 / 3 <= float(r["confidence"]) <= 1 for r in rows)
    emb = np.load(out / "embeddings.npy")
    assert emb.shape[0] == 14 and len((out / "embedding_paths.txt").read_text().split("\n")) == 15
    state = model_from_checkpoint(trained)[0].cluster_state  # distance to the chosen centroid
    clusters = torch.tensor([int(r["cluster"]) for r in rows])
    expected = state.distance_to(torch.from_numpy(emb), clusters)
    assert torch.allclose(torch.tensor([float(r["distance"]) for r in rows]), expected, atol=1e-5)
    links = sorted((out / "clusters").rglob("*.png"))
    assert len(links) == 14 and all(p.is_symlink() for p in links)
    assert all(str(p.resolve()).startswith(str(folder.resolve())) for p in links)


def test_predict_never_overwrites_without_being_told(trained, tmp_path):
    folder = write_shapes(tmp_path / "new", per_class=2, labelled=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "predictions.csv").write_text("mine")
    with pytest.raises(UserError, match="overwrite=true"):  # the command: message alone, exit 2
        predict(predict_cfg(ckpt=str(trained), **{"data.root": str(folder)}, out_dir=str(out)))
    with pytest.raises(UserError, match="sort='shuffle' is not one of none, copy, symlink"):
        predict(predict_cfg(ckpt=str(trained), **{"data.root": str(folder)}, out_dir=str(out),
                            overwrite=True, sort="shuffle"))
    assert (out / "predictions.csv").read_text() == "mine"
    predict(predict_cfg(ckpt=str(trained), **{"data.root": str(folder)}, out_dir=str(out),
                        overwrite=True))
    assert (out / "predictions.csv").read_text().startswith("path,cluster")


def test_bad_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        model_from_checkpoint(tmp_path / "none.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "other.ckpt")
    with pytest.raises(CheckpointError, match="not an mtl-unsup checkpoint"):
        model_from_checkpoint(tmp_path / "other.ckpt")
    (tmp_path / "junk.ckpt").write_text("junk")
    with pytest.raises(CheckpointError, match=r"junk.ckpt' is truncated, or not a checkpoint \(4 bytes"):
        model_from_checkpoint(tmp_path / "junk.ckpt")


def test_evaluate_reports_scores_cluster_table_and_pictures(trained, tmp_path):
    folder = write_shapes(tmp_path / "labelled", per_class=10, seed=7)
    cfg = OmegaConf.structured(EvaluateConfig)
    cfg.data = OmegaConf.structured(DataConfig)
    cfg.ckpt, cfg.data.root, cfg.out_dir = str(trained), str(folder), str(tmp_path / "ev")
    cfg.progress = False
    result = evaluate(cfg)
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert saved == result and {"eval/acc", "eval/nmi", "eval/ari", "eval/knn_acc"} <= set(saved)
    table = list(csv.DictReader((tmp_path / "ev" / "clusters.csv").read_text().splitlines()))
    assert len(table) == 3 and sum(int(r["size"]) for r in table) == 30
    # purity counts each cluster's majority class, which the one-to-one matching cannot beat
    majority = sum(float(r["purity"]) * int(r["size"]) for r in table) / 30
    assert result["eval/acc"] - 1e-4 <= majority <= 1
    assert (tmp_path / "ev" / "confusion.png").is_file() and (tmp_path / "ev" / "cluster_grid.png").is_file()


def compose_command(name: str, overrides: list[str], out_dir: Path) -> OmegaConf:
    """The config of ``mtl-predict`` / ``mtl-evaluate`` as the command line composes it."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(name, overrides=overrides)
    cfg.out_dir, cfg.progress = str(out_dir), False
    return cfg


@pytest.mark.parametrize("name", ["predict", "evaluate"])
def test_predict_and_evaluate_take_the_data_group_as_training_does(trained, tmp_path, name):
    folder = write_shapes(tmp_path / "labelled", per_class=4, seed=3)
    chosen = compose_command(name, [f"ckpt={trained}", "data=folder", f"data.root={folder}",
                                    "data.eval_batch_size=5"], tmp_path / "out")
    plain = compose_command(name, [f"ckpt={trained}", f"data.root={folder}"], tmp_path / "out")
    assert chosen.data.root == plain.data.root == str(folder) and chosen.data.eval_batch_size == 5
    assert chosen.data.labels == "auto"
    if name == "predict":
        assert len(predict(chosen).read_text().splitlines()) == 1 + 12
    else:
        assert evaluate(chosen)["eval/images"] == 12
        flat = write_shapes(tmp_path / "flat", per_class=4, seed=3, labelled=False)
        unlabelled = compose_command(name, [f"ckpt={trained}", f"data.root={flat}"], tmp_path / "out2")
        with pytest.raises(DataError, match="has no labels: evaluation needs them.*<class>/ folders"):
            evaluate(unlabelled)


def test_predict_on_the_builtin_digits(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MTL_UNSUP_CACHE", str(tmp_path / "cache"))
    cfg = compose_command("predict", [f"ckpt={trained}", "data=digits"], tmp_path / "out")
    rows = predict(cfg).read_text().splitlines()  # the digits are written first
    assert len(rows) == 1 + 1797 and (tmp_path / "cache" / "digits" / "9").is_dir()


def test_knn_accuracy_on_separable_and_random_features():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    separable = np.eye(3)[labels] + 0.01 * rng.standard_normal((60, 3))
    assert knn_accuracy(separable.astype(np.float32), labels, 5) == 1.0
    noise = rng.standard_normal((60, 8)).astype(np.float32)
    assert knn_accuracy(noise, labels, 5) < 0.6


def test_knn_accuracy_lets_a_small_class_win_its_own_vote():
    features = np.repeat(np.eye(3, dtype=np.float32), 10, axis=0)  # three perfectly separated classes
    labels = np.repeat(np.arange(3), 10)
    assert knn_accuracy(features, labels, 20) == 1.0  # 20 would let 11 strangers outvote 9 peers
