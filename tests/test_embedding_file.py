"""Bring your own embeddings: data=embeddings reads .npz, .npy + paths file and Parquet, checks them
before any training, and clusters the rows with the same recipes and outputs as images."""

import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from mtl_unsup.config import CONF_DIR, ConfigValueError, check_config
from mtl_unsup.data.embedding_datamodule import EmbeddingFileDataModule
from mtl_unsup.data.embedding_file import read_embeddings
from mtl_unsup.data.images import DataError
from mtl_unsup.evaluate import evaluate
from mtl_unsup.inference import CheckpointError, model_from_checkpoint, predict_images
from mtl_unsup.predict import predict
from mtl_unsup.train import build_run, train
from tests.conftest import compose_cfg


def blobs(n: int = 240, k: int = 3, d: int = 12, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``k`` well separated Gaussian clusters in ``d`` dimensions, and which cluster each row is."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    centres = rng.normal(size=(k, d)) * 6
    return (centres[labels] + rng.normal(size=(n, d))).astype(np.float32), labels


def run_overrides(path, *extra: str, scan: bool = True) -> list[str]:
    return ["data=embeddings", f"data.path={path}", "cluster.k=3", "cluster.pca_dim=8",
            "trainer.max_epochs=12", "trainer.check_val_every_n_epoch=4", "trainer.enable_progress_bar=false",
            "data.batch_size=32", *(["task.scan.num_neighbors=5", "task.scan.num_heads=2"] if scan else []),
            "print_config=false", *extra]


def test_each_format_gives_the_same_rows_paths_and_labels(tmp_path):
    x, y = blobs(n=8, d=4)
    names = np.array(["cat", "dog", "owl"])[y]
    paths = [f"imgs/{c}/{i}.png" for i, c in enumerate(names)]
    np.savez(tmp_path / "a.npz", embeddings=x, paths=np.array(paths), labels=names)
    np.save(tmp_path / "b.npy", x)
    (tmp_path / "b.txt").write_text("".join(f"{p}\n" for p in paths))
    pq.write_table(pa.table({"path": paths, "embedding": list(x.astype(np.float64)), "class": names}),
                   tmp_path / "c.parquet")
    pq.write_table(pa.table({f"d{j}": x[:, j] for j in range(4)} | {"file": paths}), tmp_path / "d.parquet")
    tables = [read_embeddings(str(tmp_path / "a.npz")),
              read_embeddings(str(tmp_path / "b.npy"), paths_file=str(tmp_path / "b.txt")),  # subfolders
              read_embeddings(str(tmp_path / "c.parquet")),
              read_embeddings(str(tmp_path / "d.parquet"))]  # one column per dimension
    for table in tables:
        assert table.features.shape == (8, 1, 4) and np.allclose(table.features[:, 0], x)
        assert table.paths == tuple(tmp_path / p for p in paths)  # relative to the file's folder
        assert table.classes == ("cat", "dog", "owl") and list(table.labels) == y.tolist()
    assert read_embeddings(str(tmp_path / "a.npz"), labels="none").classes == ()
    # a numeric column beside the dimensions (a label kept as a float) never joins the features
    pq.write_table(pa.table({f"d{j}": x[:, j] for j in range(4)} | {"category": y.astype(float)}),
                   tmp_path / "e.parquet")
    table = read_embeddings(str(tmp_path / "e.parquet"))
    assert table.features.shape == (8, 1, 4) and np.allclose(table.features[:, 0], x)
    # np.savez(path, x) names the array arr_0; missing labels (NaN, -1) are left out of the scores
    partial = np.where(np.arange(8) % 4 == 0, np.nan, y.astype(float))
    np.savez(tmp_path / "f.npz", x, labels=partial)
    table = read_embeddings(str(tmp_path / "f.npz"))
    known = sorted({int(v) for i, v in enumerate(y) if i % 4})
    assert table.features.shape == (8, 1, 4) and table.classes == tuple(map(str, known))  # not '0.0'
    assert [v for i, v in enumerate(table.labels) if i % 4 == 0] == [-1, -1]
    no_paths = read_embeddings(str(tmp_path / "b.npy"))
    assert no_paths.paths is None and set(no_paths.labels) == {-1}
    elsewhere = read_embeddings(str(tmp_path / "a.npz"), image_root="/data")
    assert str(elsewhere.paths[0]) == f"/data/{paths[0]}"


@pytest.mark.parametrize("case, message", [
    ("nan", r"row 5 of the embeddings holds NaN"),
    ("key", r"data.key='feats' is not in .*it has: embeddings, labels"),
    ("no_embeddings", r"which embeddings\? It has: vectors, scores.*data.key=<name>"),
    ("hf_images", r"'image' column .* is not a column of paths \(row 0 is dict\)"),
    ("fractional", r"fractional labels"),
    ("paths", r"has 3 paths for 10 embeddings"),
    ("labels", r"has 4 labels for 10 rows"),
    ("objects", r"stored as Python objects"),
    ("suffix", r"use a .npz, .npy, .parquet, .pq file"),
    ("missing", r"does not exist"),
    ("ragged", r"vectors of different lengths \(row 0 has 2, row 1 has 3\)"),
    ("shape", r"shape \(1, 1, 4\); expected"),
    ("subfolders", r"data.labels=subfolders needs paths"),
])
def test_a_bad_file_is_refused_with_one_message_naming_it(tmp_path, case, message):
    x, y = blobs(n=10, d=4)
    path, kwargs = tmp_path / "e.npz", {}
    if case == "nan":
        x[5, 2] = np.nan
        np.savez(path, embeddings=x)
    elif case == "key":
        np.savez(path, embeddings=x, labels=y)
        kwargs["key"] = "feats"
    elif case == "no_embeddings":  # two candidates: which one is not guessed
        np.savez(path, vectors=x, scores=x[:, :2])
    elif case == "hf_images":
        pq.write_table(pa.table({"embedding": list(x), "image": [{"bytes": b"\x89PNG", "path": None}] * 10}),
                       path := tmp_path / "e.parquet")
    elif case == "fractional":
        np.savez(path, embeddings=x, labels=np.linspace(0, 1, 10))
    elif case == "paths":
        np.save(path := tmp_path / "e.npy", x)
        (tmp_path / "p.txt").write_text("a.png\nb.png\nc.png\n")
        kwargs["paths_file"] = str(tmp_path / "p.txt")
    elif case == "labels":
        np.savez(path, embeddings=x, labels=y[:4])
    elif case == "objects":
        np.savez(path, embeddings=x, paths=np.array([f"{i}.png" for i in range(10)], dtype=object))
    elif case == "suffix":
        path = tmp_path / "e.csv"
        path.write_text("1,2\n")
    elif case == "ragged":
        pq.write_table(pa.table({"embedding": [[1.0, 2.0], [1.0, 2.0, 3.0]]}), path := tmp_path / "e.parquet")
    elif case == "shape":
        np.savez(path, embeddings=x[:1])
    elif case == "subfolders":
        np.savez(path, embeddings=x)
        kwargs["labels"] = "subfolders"
    with pytest.raises(DataError, match=message):
        read_embeddings(str(path), **kwargs)


def write_thumbnails(root, labels) -> list[str]:
    """A small PNG per row (its class's grey level), under <root>/<class>/."""
    paths = []
    for i, label in enumerate(labels):
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), 60 * label + 40, np.uint8)).save(root / str(label) / f"{i}.png")
        paths.append(f"{root.name}/{label}/{i}.png")
    return paths


def test_a_run_on_embeddings_clusters_every_row_and_writes_what_an_image_run_does(tmp_path):
    x, y = blobs()
    paths = write_thumbnails(tmp_path / "thumbs", y)
    np.savez(tmp_path / "emb.npz", embeddings=x, paths=np.array(paths), labels=y)
    out = tmp_path / "run"
    metrics = train(compose_cfg(out, run_overrides(tmp_path / "emb.npz")))
    assert metrics["test/kmeans_acc"] >= 0.95 and metrics["test/acc"] >= 0.9
    rows = list(csv.DictReader((out / "predictions.csv").read_text().splitlines()))
    assert [int(r["row"]) for r in rows] == list(range(len(x)))  # every row, in the file's order
    assert {r["split"] for r in rows} == {"train", "val", "test"}
    assert rows[7]["path"] == str(tmp_path / paths[7])
    clusters = np.array([int(r["cluster"]) for r in rows])
    agree = max(np.mean(clusters[y == c] == np.bincount(clusters[y == c]).argmax()) for c in range(3))
    assert agree >= 0.9  # rows of one blob share a cluster
    assert {p.name for p in (out / "pictures").iterdir()} >= {"cluster_grid.png", "confusion.png",
                                                              "embedding.png", "training_curves.png"}
    # the model is the heads on the rows: the checkpoint rebuilds it, and refuses images
    module, cfg = model_from_checkpoint(out / "checkpoints" / "last.ckpt")
    assert module.backbone.feature_dim == 12 and cfg.backbone.dim == 12
    with pytest.raises(CheckpointError, match="clusters rows of embeddings.*data=embeddings"):
        predict_images(module, cfg, None)


def test_labels_in_the_file_change_the_scores_only(tmp_path):
    x, y = blobs(n=160)
    losses = []
    for name, labels in (("plain", y), ("permuted", np.random.default_rng(1).permutation(y))):
        np.savez(tmp_path / f"{name}.npz", embeddings=x, labels=labels)
        out = tmp_path / name
        train(compose_cfg(out, run_overrides(tmp_path / f"{name}.npz", "trainer.max_epochs=4",
                                             "pictures=false", "cluster.every_n_epochs=1")))
        log = list(csv.DictReader((out / "csv" / "metrics.csv").read_text().splitlines()))
        # fixed features: clustered once, at the start, not at every epoch asked for
        assert [r["epoch"] for r in log if r.get("cluster/size_min")] == ["0"]
        losses.append([r["train/loss"] for r in log if r.get("train/loss")])
        losses.append(json.loads((out / "metrics.json").read_text())["test/acc"])
    assert losses[0] == losses[2] and len(losses[0]) == 4  # the same training, step for step
    assert losses[1] != losses[3]  # ... scored against other labels


def test_automatic_k_and_augmented_copies_on_embeddings(tmp_path):
    x, y = blobs(n=300, k=4, d=8)
    copies = x[:, None] + np.random.default_rng(2).normal(size=(300, 2, 8)).astype(np.float32) * 0.1
    np.savez(tmp_path / "e.npz", embeddings=np.concatenate([x[:, None], copies], axis=1), labels=y)
    out = tmp_path / "run"
    metrics = train(compose_cfg(out, run_overrides(tmp_path / "e.npz", "cluster.k=auto",
                                                   "cluster.k_range=[2,7]", "task=[cluster]",
                                                   "pictures=false", scan=False)))
    assert metrics["cluster/k"] == 4 and metrics["test/kmeans_acc"] >= 0.95
    run = build_run(compose_cfg(tmp_path / "probe", run_overrides(tmp_path / "e.npz")))
    rows = run.datamodule._dataset("train").rows(torch.arange(5))
    assert rows.shape == (5, 3, 8)
    view = run.datamodule.augmentations["strong"](rows)  # one of the two copies, never the plain row
    assert not torch.allclose(view, rows[:, 0]) and view.shape == (5, 8)


def test_image_settings_do_not_apply_to_embeddings(tmp_path):
    x, _ = blobs(n=40)
    np.savez(tmp_path / "e.npz", embeddings=x)
    with pytest.raises(ConfigValueError, match="takes no image backbone.*drop the backbone= override"):
        build_run(compose_cfg(tmp_path, run_overrides(tmp_path / "e.npz", "backbone=small_cnn")))
    with pytest.raises(ConfigValueError, match=r"task.rotation works on images, but data=embeddings"):
        build_run(compose_cfg(tmp_path, run_overrides(tmp_path / "e.npz", "task=[cluster,rotation]",
                                                      scan=False)))


def test_the_fingerprint_follows_the_training_rows(tmp_path):
    x, _ = blobs(n=40)
    np.savez(tmp_path / "a.npz", embeddings=x)
    np.savez(tmp_path / "b.npz", embeddings=x)
    np.savez(tmp_path / "c.npz", embeddings=x * 2)

    def fingerprint(name: str, seed: int = 0) -> str:
        dm = EmbeddingFileDataModule(str(tmp_path / name), split_seed=seed)
        dm.setup()
        return dm.fingerprint

    assert fingerprint("a.npz") == fingerprint("b.npz")  # the same rows, wherever they are
    assert fingerprint("a.npz") != fingerprint("c.npz")
    assert fingerprint("a.npz") != fingerprint("a.npz", seed=1)  # another split: other rows


def test_data_embeddings_brings_the_recipe_for_rows_and_the_command_line_wins(tmp_path):
    cfg = compose_cfg(tmp_path, ["data=embeddings", "data.path=e.npz"])
    assert cfg.backbone._target_.endswith("FeatureInput") and list(cfg.task) == ["cluster", "scan"]
    assert (cfg.warmup_epochs, cfg.task.scan.start_epoch, cfg.task.cluster.start_epoch) == (0, 0, 0)
    assert (cfg.trainer.max_epochs, cfg.data.batch_size) == (20, 1024)
    cfg = compose_cfg(tmp_path, ["data=embeddings", "data.path=e.npz", "cluster.every_n_epochs=3",
                                 "task=[cluster,overcluster]", "warmup_epochs=2", "trainer=gpu",
                                 "trainer.max_epochs=7"])
    assert (cfg.cluster.every_n_epochs, list(cfg.task), cfg.task.overcluster.start_epoch) == (
        3, ["cluster", "overcluster"], 2)
    assert (cfg.trainer.accelerator, cfg.trainer.max_epochs) == ("gpu", 7)


def compose_command(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


def test_predict_and_evaluate_run_a_rows_model_on_new_rows_and_refuse_what_does_not_fit(tmp_path):
    x, y = blobs(n=250)
    np.savez(tmp_path / "train.npz", embeddings=x[:200], labels=y[:200])
    out = tmp_path / "run"
    train(compose_cfg(out, run_overrides(tmp_path / "train.npz", "pictures=false")))
    ckpt = out / "checkpoints" / "last.ckpt"
    np.savez(tmp_path / "new.npz", embeddings=x[200:], labels=y[200:])  # new rows of the same blobs
    common = [f"ckpt={ckpt}", "data=embeddings", f"data.path={tmp_path / 'new.npz'}", "progress=false"]
    written = predict(compose_command("predict", [*common, f"out_dir={tmp_path / 'p'}"]))
    rows = list(csv.DictReader(written.read_text().splitlines()))
    assert [int(r["row"]) for r in rows] == list(range(50))
    result = evaluate(compose_command("evaluate", [*common, f"out_dir={tmp_path / 'e'}", "pictures=false"]))
    assert result["eval/images"] == 50 and result["eval/acc"] >= 0.9
    np.savez(tmp_path / "wide.npz", embeddings=np.zeros((5, 13), np.float32))
    with pytest.raises(DataError, match="rows of 13 features; the model .* trained on rows of 12"):
        wide = [f"ckpt={ckpt}", "data=embeddings", f"data.path={tmp_path / 'wide.npz'}"]
        predict(compose_command("predict", [*wide, f"out_dir={tmp_path / 'w'}"]))
    with pytest.raises(ConfigValueError, match="sort=copy .* has no paths"):
        predict(compose_command("predict", [*common, "sort=copy", f"out_dir={tmp_path / 's'}"]))
    with pytest.raises(CheckpointError, match="clusters rows of embeddings.*data=embeddings"):
        predict(compose_command("predict", [f"ckpt={ckpt}", f"data.root={tmp_path}",
                                            f"out_dir={tmp_path / 'i'}"]))
    assert not (tmp_path / "w").exists() and not (tmp_path / "s").exists()


def test_a_data_option_without_its_schema_is_named(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mine.yaml").write_text("root: /somewhere\nbatch_size: 8\n")
    cfg = compose_cfg(tmp_path, [f"hydra.searchpath=[file://{tmp_path}]", "data=mine"])
    with pytest.raises(ConfigValueError, match=r"data option has no schema.*/schema/data/images@_here_"):
        check_config(cfg)
