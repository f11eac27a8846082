import pytest
import torch

from mtl_unsup.clustering.sinkhorn import balanced_labels, sinkhorn


def test_rows_are_distributions_and_columns_take_their_share():
    scores = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    q = sinkhorn(scores, epsilon=0.1)
    assert torch.allclose(q.sum(1), torch.ones(60), atol=1e-5)
    assert torch.allclose(q.sum(0), torch.full((4,), 15.0), atol=1e-3)
    shares = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert torch.allclose(sinkhorn(scores, 0.1, cluster_shares=shares).sum(0), 60 * shares, atol=1e-2)


def test_a_model_that_favours_one_cluster_still_gets_balanced_labels():
    g = torch.Generator().manual_seed(1)
    truth = torch.arange(4).repeat_interleave(25)
    scores = torch.nn.functional.one_hot(truth, 4).float() + 0.1 * torch.randn(100, 4, generator=g)
    scores[:, 0] += 1.5  # every image prefers cluster 0: the argmax collapses...
    assert (scores.argmax(1) == 0).all()
    labels = balanced_labels(scores, epsilon=0.05)  # ...the balanced assignment does not
    assert torch.equal(torch.bincount(labels, minlength=4), torch.full((4,), 25))
    assert torch.equal(labels, truth)


def test_confident_scores_do_not_overflow():
    scores = torch.tensor([[1000.0, -1000.0], [-1000.0, 1000.0], [900.0, -900.0], [-900.0, 900.0]])
    q = sinkhorn(scores, epsilon=0.01)
    assert torch.isfinite(q).all() and torch.equal(q.argmax(1), torch.tensor([0, 1, 0, 1]))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(torch.zeros(3, 2), epsilon=0)
    with pytest.raises(ValueError, match="cluster_shares"):
        sinkhorn(torch.zeros(3, 2), cluster_shares=torch.tensor([0.9, 0.9]))
