import pytest
import torch

from mtl_unsup.clustering.kmeans import (
    ClusterState,
    cluster_features,
    fill_empty_clusters,
    fit_pca_whitening,
)
from mtl_unsup.metrics import score_clustering


def blobs(n_per: int = 50, k: int = 4, dim: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 10
    labels = torch.arange(k).repeat_interleave(n_per)
    return centres[labels] + torch.randn(len(labels), dim, generator=g), labels


def test_known_blobs_are_recovered():
    x, y = blobs()
    state = cluster_features(x, k=4, pca_dim=8, niter=20, nredo=3, seed=0)
    assert score_clustering(state.labels, y)["acc"] == 1.0
    assert state.centroids.shape == (4, 8)
    # assigning the training points again gives the same clusters
    assert torch.equal(state.assign(x)[0], state.labels)


def test_pca_whitening_gives_unit_covariance_and_shrinks_with_few_points():
    x, _ = blobs(n_per=100, k=3, dim=10)
    mean, proj = fit_pca_whitening(x, 5)
    z = (x - mean) @ proj
    cov = z.t() @ z / (len(z) - 1)
    assert torch.allclose(cov, torch.eye(5), atol=1e-3)
    _, proj_few = fit_pca_whitening(x[:4], 5)
    assert proj_few.shape == (10, 3)  # at most n - 1 components
    _, ident = fit_pca_whitening(x, None)
    assert torch.equal(ident, torch.eye(10))


def test_empty_clusters_never_survive():
    x, _ = blobs(n_per=10, k=2, dim=4)
    labels = torch.zeros(len(x), dtype=torch.long)  # everything in cluster 0 of 5
    centroids = torch.zeros(5, 4)
    new_labels, new_centroids = fill_empty_clusters(x, labels, centroids)
    counts = torch.bincount(new_labels, minlength=5)
    assert (counts > 0).all() and counts.sum() == len(x)
    for c in range(5):
        assert torch.allclose(new_centroids[c], x[new_labels == c].mean(0), atol=1e-5)


def test_kmeans_with_duplicate_points_leaves_no_cluster_empty():
    x = torch.cat([torch.zeros(30, 3), torch.ones(2, 3)])  # 2 distinct points, k=4
    state = cluster_features(x, k=4, pca_dim=None, seed=0)
    assert (torch.bincount(state.labels, minlength=4) > 0).all()


def test_state_round_trips_through_a_dict():
    x, _ = blobs()
    state = cluster_features(x, k=4, pca_dim=8, seed=0, epoch=3)
    again = ClusterState.from_state_dict(state.state_dict())
    assert again.epoch == 3 and torch.equal(again.labels, state.labels)


def test_k_larger_than_points_is_refused():
    with pytest.raises(ValueError, match="k"):
        cluster_features(torch.randn(3, 4), k=5, pca_dim=None)


def test_warm_start_keeps_cluster_identities():
    x, y = blobs(n_per=40, k=4, dim=8, seed=1)
    first = cluster_features(x, k=4, pca_dim=None, seed=0)
    moved = x + 0.05 * torch.randn_like(x)  # the features drift a little between refreshes
    warm = cluster_features(moved, k=4, pca_dim=None, seed=123, init_labels=first.labels)
    assert torch.equal(warm.labels, first.labels)


def test_relabelling_to_a_reference_keeps_the_partition():
    x, _ = blobs(n_per=30, k=4, dim=8, seed=2)
    state = cluster_features(x, k=4, pca_dim=None, seed=0)
    reference = torch.tensor([2, 0, 3, 1])[state.labels]  # the same partition, other names
    from mtl_unsup.clustering.kmeans import matching_permutation

    renamed = state.relabelled(matching_permutation(state.labels, reference, 4))
    assert torch.equal(renamed.labels, reference)
    assert torch.equal(renamed.assign(x)[0], renamed.labels)  # centroids moved with their names
    assert torch.allclose(renamed.distance_to(x, renamed.labels), renamed.assign(x)[1], atol=1e-5)
