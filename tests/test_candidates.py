"""The answer is chosen among every stage's heads and k-means, by a label-free criterion: the
criteria, the choice, what a run writes, and labels that never reach it."""

import json

import pytest
import torch

from mtl_unsup.answer.candidates import Candidate, StageClusterings, choose, score_candidates
from mtl_unsup.config import ConfigValueError, check_config
from mtl_unsup.inference import model_from_checkpoint
from mtl_unsup.train import train

from .conftest import compose_cfg, staged_overrides, tiny_folder_overrides
from .test_selection import permute_labels


def blobs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three well-separated blobs of 30 points in 4-D, and which blob each point is in."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(3).repeat_interleave(30)
    centres = torch.eye(4)[:3] * 10
    return centres[truth] + torch.randn(90, 4, generator=g), truth


def test_the_criteria_prefer_the_clustering_that_follows_the_features():
    space, truth = blobs()
    shuffled = truth[torch.randperm(90, generator=torch.Generator().manual_seed(3))]
    early = StageClusterings("pretext", space, [Candidate("pretext", "kmeans", truth, last_answer=True)])
    late = StageClusterings("scan", space, [Candidate("scan", "scan", shuffled, last_answer=True),
                                            Candidate("scan", "kmeans", truth.clone())])
    candidates = score_candidates([early, late])
    by_key = {c.key: c for c in candidates}
    assert by_key["pretext/kmeans"].criteria["silhouette"] > 0.5 > by_key["scan/scan"].criteria["silhouette"]
    assert by_key["scan/scan"].criteria["consensus"] < by_key["pretext/kmeans"].criteria["consensus"]
    # a tie between the same clusters goes to the later stage
    assert choose(candidates, "silhouette").key == "scan/kmeans"
    assert choose(candidates, "last").key == "scan/scan"  # the last stage's own answer, as before


def test_an_unknown_criterion_is_named_with_the_choices(tmp_path):
    with pytest.raises(ValueError, match=r"cluster.choose='best': choose among silhouette, silhouette_last"):
        choose([], "best")
    with pytest.raises(ConfigValueError, match=r"cluster.choose='acc': use one of silhouette"):
        check_config(compose_cfg(tmp_path, ["cluster.choose=acc"]))


def chosen_of(run) -> tuple[str, str]:
    data = json.loads((run / "candidates.json").read_text())
    [chosen] = [c for c in data["candidates"] if c["chosen"]]
    return chosen["stage"], chosen["name"]


def test_a_staged_run_lists_every_candidate_and_labels_never_choose(shapes_dir, tmp_path, monkeypatch):
    overrides = [*staged_overrides(shapes_dir), "stages.selflabel=null", "trainer.deterministic=true",
                 "cluster.choose=silhouette"]
    metrics = train(compose_cfg(tmp_path / "a", overrides))
    data = json.loads((tmp_path / "a" / "candidates.json").read_text())
    keys = [(c["stage"], c["name"]) for c in data["candidates"]]
    assert ("pretext", "kmeans") in keys and ("scan", "kmeans") in keys
    assert any(stage == "scan" and name.startswith("scan") for stage, name in keys)
    assert data["criterion"] == "silhouette"
    for stage, name in keys:
        assert f"candidates/{stage}/{name}/silhouette" in metrics
        assert f"candidates/{stage}/{name}/consensus" in metrics
        assert f"candidates/{stage}/{name}/test/acc" in metrics  # for reading: the shapes are labelled
    stage, name = chosen_of(tmp_path / "a")
    assert metrics["test/acc"] == metrics[f"candidates/{stage}/{name}/test/acc"]  # the run's answer
    permute_labels(monkeypatch)
    shuffled = train(compose_cfg(tmp_path / "b", overrides))
    assert chosen_of(tmp_path / "b") == (stage, name)
    free = [k for k in metrics if k.startswith("candidates/") and not k.endswith(("acc", "nmi", "ari"))]
    assert [shuffled[k] for k in free] == pytest.approx([metrics[k] for k in free])


def test_an_earlier_stages_kmeans_chosen_is_the_model_of_answer_ckpt(shapes_dir, tmp_path):
    from mtl_unsup.answer.choice import settle_answer

    overrides = [*staged_overrides(shapes_dir), "stages.selflabel=null", "cluster.choose=silhouette"]
    cfg = compose_cfg(tmp_path, overrides)
    train(cfg)
    done = {s: {k.split("/", 1)[1]: v for k, v in json.loads((tmp_path / "metrics.json").read_text()).items()
                if k.startswith(f"{s}/")} for s in ("pretext", "scan")}
    # the pretext's k-means follows its features; the SCAN head's clusters do not
    space, truth = blobs()
    noise = torch.randint(0, 3, (90,), generator=torch.Generator().manual_seed(5))
    stages = [StageClusterings("pretext", space, [Candidate("pretext", "kmeans", truth, last_answer=True)]),
              StageClusterings("scan", space, [Candidate("scan", "scan_h0", noise, last_answer=True)])]
    module, _ = model_from_checkpoint(tmp_path / "checkpoints" / "scan" / "last.ckpt")
    dirs = {s: tmp_path / "checkpoints" / s for s in ("pretext", "scan")}
    metrics, path = settle_answer(cfg, stages, done, module, tmp_path, dirs)
    assert path == tmp_path / "checkpoints" / "answer.ckpt"
    assert metrics["test/acc"] == done["pretext"]["test/kmeans_acc"]  # the chosen's, from its stage
    assert module.answer() is None and "k-means of the features of stage pretext" in module.explain_answer()
    chosen, _ = model_from_checkpoint(path)  # what mtl-predict loads
    pretext, _ = model_from_checkpoint(dirs["pretext"] / "last.ckpt")
    assert chosen.answer() is None
    assert all(torch.equal(a, b) for a, b in zip(chosen.backbone.state_dict().values(),
                                                 pretext.backbone.state_dict().values(), strict=True))
    assert torch.equal(chosen.cluster_state.centroids, pretext.cluster_state.centroids)


def test_cluster_answer_kmeans_names_kmeans_and_a_one_stage_run_has_candidates(shapes_dir, tmp_path):
    metrics = train(compose_cfg(tmp_path, [*tiny_folder_overrides(shapes_dir), "cluster.answer=kmeans"]))
    assert chosen_of(tmp_path) == ("", "kmeans")
    assert metrics["test/acc"] == metrics["test/kmeans_acc"]
    assert "candidates/cluster/silhouette" in metrics and "candidates/kmeans/silhouette" in metrics
