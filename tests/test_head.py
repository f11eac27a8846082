"""The centroid-initialised clustering head is the k-means classifier, whatever the feature scale."""

import pytest
import torch

from mtl_unsup.clustering.head import ClusterHead
from mtl_unsup.clustering.kmeans import cluster_features
from mtl_unsup.tasks import ClusterTask


def scaled_blobs(n_per: int = 100, k: int = 5, dim: int = 32, seed: int = 0) -> torch.Tensor:
    """Overlapping blobs away from the origin whose points have norms spread over two decades,
    like raw (un-whitened) backbone features."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, dim, generator=g) * 3 + 5
    x = centres.repeat_interleave(n_per, 0) + 2 * torch.randn(k * n_per, dim, generator=g)
    scale = torch.exp(torch.empty(k * n_per, 1).uniform_(-2.3, 2.3, generator=g))
    return x * scale


@pytest.mark.parametrize("pca_dim", [None, 8, 32])
def test_head_from_centroids_agrees_with_kmeans(pca_dim):
    x = scaled_blobs()
    state = cluster_features(x, k=5, pca_dim=pca_dim, nredo=2, seed=0)
    task = ClusterTask(head_init="centroids", head_temperature=0.1)
    task.build(feature_dim=x.shape[1], num_clusters=5)
    task.reset_head(state)
    head = task.logits(x).argmax(1)
    assert (head == state.labels).float().mean() >= 0.99
    assert torch.equal(head, state.assign(x)[0])  # the same nearest centroid, point for point


def test_a_random_head_lives_in_the_clustering_space_too():
    x = scaled_blobs(seed=1)
    state = cluster_features(x, k=5, pca_dim=8, seed=0)
    head = ClusterHead(x.shape[1], 5)
    head.set_space(state.pca_mean, state.pca_proj)
    assert torch.allclose(head.embed(x)[:, :8], state.transform(x), atol=1e-5)
    assert torch.all(head.embed(x)[:, 8:] == 0)


def test_restarting_the_head_zeroes_its_training_count():
    task = ClusterTask()
    task.build(feature_dim=4, num_clusters=2)
    task.trained_steps += 3
    task.reset_head(None)
    assert int(task.trained_steps) == 0
