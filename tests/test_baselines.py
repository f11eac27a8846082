"""Classical clusterings of the model's features, scored beside its answer by ``mtl-evaluate``."""

import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from mtl_unsup import baselines
from mtl_unsup.baselines import BASELINES, run_baseline, score_labels
from mtl_unsup.config import ConfigValueError, DataConfig
from mtl_unsup.evaluate import EvaluateConfig, evaluate
from mtl_unsup.train import train

from .conftest import compose_cfg, tiny_folder_overrides, write_shapes


def blobs(n_per: int = 100, dim: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Three well-separated gaussian blobs (unit spread, centres ~4 sqrt(dim) apart) and their labels."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((3, dim)) * 4
    labels = np.repeat(np.arange(3), n_per)
    order = rng.permutation(len(labels))  # not sorted by class
    labels = labels[order]
    return (centres[labels] + rng.standard_normal((len(labels), dim))).astype(np.float32), labels


# The blobs span a plane: PCA to 2 whitens that plane; None keeps all 16 axes (centred, normalised).
@pytest.mark.parametrize("pca_dim", [2, None])
@pytest.mark.parametrize("name", BASELINES)
def test_each_baseline_recovers_separated_blobs(name, pca_dim):
    x, y = blobs()
    pred, info = run_baseline(name, x, 3, pca_dim=pca_dim, seed=0, nredo=2)
    assert pred.shape == (300,) and pred.dtype == np.int64
    assert info["clusters"] == 3 and info["noise"] < 0.05 and info["seconds"] >= 0
    assert score_labels(pred, y, info["clusters"])["acc"] > 0.95


def test_large_sets_are_fitted_on_a_sample_and_the_rest_assigned():
    x, y = blobs(n_per=200)
    for fn in (baselines.agglomerative, baselines.hdbscan):
        pred, info = fn(x, 3, pca_dim=2, seed=1, max_points=150)
        assert info["fitted_on"] == 150 and len(pred) == 600
        assert score_labels(pred, y, info["clusters"])["acc"] > 0.95


def test_hdbscan_noise_is_scored_as_one_more_cluster():
    x, y = blobs()
    far = np.random.default_rng(3).uniform(-60, 60, (30, 16)).astype(np.float32)  # scattered points
    pred, info = baselines.hdbscan(np.concatenate([x, far]), 3, pca_dim=None, min_cluster_size=20)
    assert info["clusters"] == 3 and 0 < info["noise"] == pytest.approx(np.mean(pred == -1))
    target = np.concatenate([y, np.zeros(30, np.int64)])
    scores = score_labels(pred, target, info["clusters"])
    assert 0.85 < scores["acc"] <= 1 and set(scores) == {"acc", "nmi", "ari"}
    # all noise: one cluster, still defined
    assert score_labels(np.full(6, -1), np.array([0, 0, 1, 1, 2, 2]), 0)["ari"] == pytest.approx(0)


@pytest.mark.parametrize("name", BASELINES)
def test_baselines_never_read_labels(name):
    assert not {"labels", "target", "y"} & set(inspect.signature(getattr(baselines, name)).parameters)
    x, y = blobs()
    y_shuffled = np.random.default_rng(1).permutation(y)
    first, _ = run_baseline(name, x, 3, pca_dim=2, seed=0, nredo=2)
    again, _ = run_baseline(name, x, 3, pca_dim=2, seed=0, nredo=2)
    np.testing.assert_array_equal(first, again)  # the clusters do not depend on any labels...
    true, shuffled = score_labels(first, y, 3), score_labels(first, y_shuffled, 3)
    assert true["acc"] > 0.95 and shuffled["acc"] < 0.6  # ...only their scores do


def test_unknown_baseline_is_named_before_any_compute(tmp_path):
    cfg = OmegaConf.structured(EvaluateConfig)
    cfg.data = OmegaConf.structured(DataConfig)  # what data=folder brings
    cfg.ckpt, cfg.data.root = str(tmp_path / "missing.ckpt"), str(tmp_path)  # never read
    cfg.out_dir, cfg.baselines = str(tmp_path / "ev"), ["kmeans", "dbscan"]
    with pytest.raises(ConfigValueError, match=r"baselines: 'dbscan' is not a baseline.*kmeans, "
                                               r"agglomerative, hdbscan"):
        evaluate(cfg)
    with pytest.raises(ConfigValueError, match="baselines"):
        run_baseline("kmean", np.zeros((4, 2), np.float32), 2)
    assert not (tmp_path / "ev").exists()


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("trained")
    train(compose_cfg(base / "run", tiny_folder_overrides(write_shapes(base / "shapes"))))
    return base / "run" / "checkpoints" / "last.ckpt"


def evaluate_cfg(ckpt: Path, root: Path, out: Path, **kw) -> OmegaConf:
    cfg = OmegaConf.structured(EvaluateConfig)
    cfg.data = OmegaConf.structured(DataConfig)
    cfg.ckpt, cfg.data.root, cfg.out_dir = str(ckpt), str(root), str(out)
    cfg.progress, cfg.pictures = False, False
    for key, value in kw.items():
        OmegaConf.update(cfg, key, value)
    return cfg


def test_evaluate_scores_the_baselines_side_by_side(trained, tmp_path, capsys):
    folder = write_shapes(tmp_path / "labelled", per_class=10, seed=7)
    result = evaluate(evaluate_cfg(trained, folder, tmp_path / "ev"))
    saved = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert saved == result
    for name in BASELINES:
        assert {f"eval/{name}/{m}" for m in ("acc", "nmi", "ari")} <= set(saved)
        assert all(0 <= saved[f"eval/{name}/{m}"] <= 1 for m in ("acc", "nmi"))
    assert isinstance(saved["eval/hdbscan/clusters"], int) and 0 <= saved["eval/hdbscan/noise"] <= 1
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("| ")]
    assert table[-4].startswith("| model (") and [r.split(" | ")[0] for r in table[-3:]] == [
        "| kmeans", "| agglomerative", "| hdbscan"]
    assert f"{saved['eval/agglomerative/acc']:.4f}" in table[-2]

    result = evaluate(evaluate_cfg(trained, folder, tmp_path / "ev", overwrite=True, baselines=[]))
    assert not any(key.count("/") == 2 for key in result)
    assert "| kmeans |" not in capsys.readouterr().out
