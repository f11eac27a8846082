"""k-means over rows sharded across ranks: the same clusters from 1 process and from 2."""

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.functional.clustering import normalized_mutual_info_score

from mtl_unsup.clustering.kmeans import cluster_features
from mtl_unsup.clustering.sharded import _assign, assign_matmul, sample_indices, sharded_kmeans


def blobs(n: int = 600, k: int = 6, dim: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    truth = torch.arange(n) % k
    centres = torch.randn(k, dim, generator=g) * 4
    return centres[truth] + torch.randn(n, dim, generator=g), truth


def test_blobs_are_recovered_as_the_unsharded_recipe_recovers_them():
    x, truth = blobs()
    state = sharded_kmeans(x, torch.arange(len(x)), len(x), k=6, pca_dim=8, niter=10, nredo=3, seed=0)
    assert state.labels.shape == (600,) and state.centroids.shape == (6, 8)
    assert normalized_mutual_info_score(state.labels, truth) == pytest.approx(1.0)
    plain = cluster_features(x, 6, pca_dim=8, niter=10, nredo=3)
    assert normalized_mutual_info_score(state.labels, plain.labels) == pytest.approx(1.0)
    # new rows are assigned with the fitted whitening and centroids, as training rows were
    assert torch.equal(state.assign(x[:50])[0], state.labels[:50])


def test_rows_in_any_order_and_in_float16_give_labels_by_dataset_index():
    x, _ = blobs(seed=1)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(3))
    kw = {"k": 6, "pca_dim": 8, "nredo": 3, "seed": 0, "sample": 200}
    ordered = sharded_kmeans(x, torch.arange(len(x)), len(x), **kw)
    shuffled = sharded_kmeans(x[order], order, len(x), **kw)
    assert torch.equal(ordered.labels, shuffled.labels)
    half = sharded_kmeans(x.half(), torch.arange(len(x)), len(x), **kw)
    assert normalized_mutual_info_score(half.labels, ordered.labels) == pytest.approx(1.0)


def test_the_pca_sample_depends_only_on_the_row_count_and_seed():
    a, b = sample_indices(1000, 100, seed=4), sample_indices(1000, 100, seed=4)
    assert torch.equal(a, b) and len(a.unique()) == 100 and bool((a[1:] > a[:-1]).all())
    assert not torch.equal(a, sample_indices(1000, 100, seed=5))
    assert torch.equal(sample_indices(50, 100, seed=4), torch.arange(50))


def test_rows_missing_or_held_twice_are_refused():
    x, _ = blobs(n=60)
    twice = torch.cat([torch.arange(50), torch.arange(10)])
    for index in (torch.arange(50), twice):
        with pytest.raises(ValueError, match="exactly one rank"):
            sharded_kmeans(x[: len(index)], index, 60, k=3, pca_dim=4, sample=20)
    with pytest.raises(ValueError, match="2 <= k"):
        sharded_kmeans(x, torch.arange(60), 60, k=1)


def noise(n: int = 700, dim: int = 16) -> torch.Tensor:
    """No cluster structure: the clusters found depend on every detail of the computation."""
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(7))


def _rank(rank: int, world: int, init: str, out: str, cut: int) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    x = noise()
    # an uneven split (rank 0 may hold nothing), rows in a scrambled order
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(11))
    mine = order[:cut] if rank == 0 else order[cut:]
    state = sharded_kmeans(x[mine], mine, len(x), k=7, pca_dim=6, niter=15, nredo=2, seed=3, sample=300)
    torch.save(state.state_dict(), f"{out}{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_give_the_labels_of_one(tmp_path):
    x = noise()
    one = sharded_kmeans(x, torch.arange(len(x)), len(x), k=7, pca_dim=6, niter=15, nredo=2, seed=3,
                         sample=300)
    for cut in (260, 0):  # 0: rank 0 holds no row and still takes part in every collective
        init, out = f"file://{tmp_path / f'store{cut}'}", str(tmp_path / f"rank{cut}_")
        mp.spawn(_rank, args=(2, init, out, cut), nprocs=2, join=True)
        for rank in range(2):
            two = torch.load(f"{out}{rank}.pt")
            assert torch.equal(two["labels"], one.labels), (cut, rank)
            assert torch.allclose(two["centroids"], one.centroids, atol=1e-6)
            assert torch.equal(two["pca_proj"], one.pca_proj)
    assert len(one.labels.unique()) == 7


def test_the_matrix_product_assignment_for_gpus_matches_faiss():
    x, c = noise(500, 8), noise(9, 8) * 0.5
    faiss_labels, faiss_d2 = _assign(x, c)  # CPU rows: FAISS
    labels, d2 = assign_matmul(x, c, chunk=128)  # what a GPU runs, here on the CPU
    assert torch.equal(labels, faiss_labels)
    assert torch.allclose(d2, faiss_d2, atol=1e-4)


def test_tasks_that_need_every_row_on_one_rank_are_refused_before_any_image_is_read(tmp_path):
    from mtl_unsup.config import ConfigValueError
    from mtl_unsup.train import build_run

    from .conftest import compose_cfg, tiny_folder_overrides

    cfg = compose_cfg(tmp_path, [*tiny_folder_overrides(tmp_path / "no_images_here"), "cluster=sharded",
                                 "task=[cluster,scan]"])
    with pytest.raises(ConfigValueError, match="task scan needs nearest neighbours"):
        build_run(cfg)


def test_a_small_sample_is_raised_to_50_rows_per_cluster():
    x, truth = blobs(n=400, k=4)
    one = sharded_kmeans(x, torch.arange(400), 400, k=4, pca_dim=6, nredo=2, sample=10)
    # 10 sampled rows could not start 4 clusters well; 200 (50 per cluster) do
    assert normalized_mutual_info_score(one.labels, truth) == pytest.approx(1.0)
