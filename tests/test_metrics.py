import torch

from mtl_unsup.metrics import score_clustering


def test_a_permuted_labelling_scores_perfectly():
    target = torch.randint(0, 5, (200,), generator=torch.Generator().manual_seed(0))
    perm = torch.tensor([3, 0, 4, 1, 2])
    scores = score_clustering(perm[target], target)
    assert set(scores) == {"acc", "nmi", "ari"}
    assert scores["acc"] == 1.0
    assert abs(scores["nmi"] - 1) < 1e-6 and abs(scores["ari"] - 1) < 1e-6


def test_random_clusters_score_near_chance():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (2000,), generator=g)
    preds = torch.randint(0, 4, (2000,), generator=g)
    scores = score_clustering(preds, target)
    assert scores["acc"] < 0.3 and scores["nmi"] < 0.05 and abs(scores["ari"]) < 0.05


def test_more_clusters_than_classes_and_unlabelled_entries():
    target = torch.tensor([0, 0, 1, 1, -1, -1])
    preds = torch.tensor([5, 5, 2, 3, 0, 1])
    scores = score_clustering(preds, target)
    assert scores["acc"] == 0.75  # one of 5 / {2,3} matched to each class, unlabelled ignored
