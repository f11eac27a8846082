"""DDP on CPU (gloo, 2 processes) does what one process does: same pseudo-labels, same test
metrics, the global batch's contrastive loss; only the augmentations differ per rank."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mtl_unsup.tasks.losses import nt_xent
from mtl_unsup.train import train

from .conftest import compose_cfg, tiny_folder_overrides, write_shapes

SCRIPTS = Path(__file__).parent / "scripts"
SCRIPT = SCRIPTS / "first_clustering.py"


def run_script(out: Path, devices: int, root: Path, script: Path = SCRIPT, *extra: str) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(out), str(devices), str(root), *extra],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
def test_ddp_ranks_share_the_clustering_of_the_full_feature_set(tmp_path):
    # 48 images -> 33 for training: DistributedSampler pads one duplicate in for 2 ranks
    root = write_shapes(tmp_path / "shapes", per_class=16)
    run_script(tmp_path, 2, root)
    run_script(tmp_path, 1, root)
    rank0 = torch.load(tmp_path / "rank0_of2.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1_of2.pt", weights_only=True)
    single = torch.load(tmp_path / "rank0_of1.pt", weights_only=True)
    assert len(single["labels"]) == 33
    for key in ("labels", "centroids", "pca_mean", "pca_proj"):
        assert torch.equal(rank0[key], rank1[key]), key
    assert torch.equal(rank0["labels"], single["labels"])
    assert torch.allclose(rank0["centroids"], single["centroids"], atol=1e-4)
    # each rank augments with its own draws; rank 0 draws what a one-process run draws
    rng = {name: torch.load(tmp_path / f"{name}_rng.pt") for name in ("rank0_of2", "rank1_of2", "rank0_of1")}
    assert not torch.equal(rng["rank0_of2"], rng["rank1_of2"])
    assert torch.equal(rng["rank0_of2"], rng["rank0_of1"])
    # neighbours mined from the full feature set; the heads' running losses (which pick the
    # answer) averaged over ranks, so every rank names the same answer
    scan = {name: torch.load(tmp_path / f"{name}_scan.pt", weights_only=True)
            for name in ("rank0_of2", "rank1_of2", "rank0_of1")}
    assert torch.equal(scan["rank0_of2"]["neighbours"], scan["rank1_of2"]["neighbours"])
    assert torch.equal(scan["rank0_of2"]["neighbours"], scan["rank0_of1"]["neighbours"])
    assert torch.equal(scan["rank0_of2"]["head_losses"], scan["rank1_of2"]["head_losses"])
    assert scan["rank0_of2"]["answer"] == scan["rank1_of2"]["answer"]


@pytest.mark.slow
def test_ddp_test_metrics_equal_one_process_on_the_same_checkpoint(tmp_path):
    # 48 images: 33 train, 5 val, 10 test; with 2 ranks and batches of 4 every split is padded
    root = write_shapes(tmp_path / "shapes", per_class=16)
    train(compose_cfg(tmp_path / "trained", tiny_folder_overrides(root)))
    ckpt = tmp_path / "trained" / "checkpoints" / "last.ckpt"
    script = SCRIPTS / "evaluate_checkpoint.py"
    run_script(tmp_path / "one.json", 1, root, script, str(ckpt))
    run_script(tmp_path / "two.json", 2, root, script, str(ckpt))
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert set(one) == set(two) and {"test/acc", "val/acc", "train/kmeans_nmi"} <= set(one)
    for key, value in one.items():
        assert two[key] == pytest.approx(value, abs=1e-5), key


def _nt_xent_rank(rank: int, world: int, init: str, z1: torch.Tensor, z2: torch.Tensor, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    b = len(z1) // world
    mine1 = z1[rank * b : (rank + 1) * b].clone().requires_grad_()
    mine2 = z2[rank * b : (rank + 1) * b].clone().requires_grad_()
    loss = nt_xent(mine1, mine2, 0.2, gather=True)
    loss.backward()
    torch.save({"loss": loss.detach(), "g1": mine1.grad, "g2": mine2.grad}, f"{out}{rank}.pt")
    dist.destroy_process_group()


def test_gathered_nt_xent_is_the_loss_of_the_global_batch(tmp_path):
    torch.manual_seed(0)
    z1, z2 = torch.randn(8, 5), torch.randn(8, 5)
    init, out = f"file://{tmp_path / 'store'}", str(tmp_path / "rank")
    mp.spawn(_nt_xent_rank, args=(2, init, z1, z2, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}{r}.pt") for r in range(2)]
    full1, full2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = nt_xent(full1, full2, 0.2)
    full.backward()
    assert torch.stack([r["loss"] for r in ranks]).mean() == pytest.approx(full.item(), rel=1e-5)
    # DDP averages gradients over the 2 ranks: that average is the global batch's gradient
    g1 = torch.cat([r["g1"] for r in ranks]) / 2
    g2 = torch.cat([r["g2"] for r in ranks]) / 2
    assert torch.allclose(g1, full1.grad, atol=1e-6) and torch.allclose(g2, full2.grad, atol=1e-6)
    assert nt_xent(z1[:4], z2[:4], 0.2).item() != pytest.approx(full.item(), rel=1e-3)  # fewer negatives


@pytest.mark.slow
def test_ddp_from_the_command_line_writes_one_run_dir_and_prints_once(tmp_path):
    root = write_shapes(tmp_path / "shapes", per_class=16)
    run_dir = tmp_path / "run"
    args = ["backbone.widths=[8,16]", "backbone.convs_per_stage=1", "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false", "print_config=false", "data=folder",
            "protocol=single",
            f"data.root={root}", "data.channels=1", "data.image_size=16", "data.mean=[0.3]",
            "data.std=[0.4]", "data.batch_size=8", "cluster.k=3", "cluster.pca_dim=8",
            "cluster.every_n_epochs=1", "task.cluster.start_epoch=0", "trainer=ddp",
            "trainer.accelerator=cpu", "trainer.devices=2",
            f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mtl_unsup.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "shapes"]
    assert (run_dir / "metrics.json").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert proc.stdout.count("| test |") == 1 and proc.stdout.count("metrics:    ") == 1
    assert proc.stdout.count("clusters: ") + proc.stderr.count("clusters: ") == 2  # rank 0 only


@pytest.mark.slow
def test_sharded_clustering_under_ddp_gives_the_clusters_of_one_process(tmp_path):
    # cluster=sharded: no rank gathers the features; the 33 training images are split 17/16
    root = write_shapes(tmp_path / "shapes", per_class=16)
    run_script(tmp_path, 2, root, SCRIPT, "sharded")
    run_script(tmp_path, 1, root, SCRIPT, "sharded")
    names = ("rank0_of2", "rank1_of2", "rank0_of1")
    first = {n: torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in names}
    assert len(first["rank0_of1"]["labels"]) == 33
    for key in ("labels", "centroids", "pca_proj"):
        assert torch.equal(first["rank0_of2"][key], first["rank1_of2"][key]), key
    assert torch.equal(first["rank0_of2"]["labels"], first["rank0_of1"]["labels"])
    assert torch.allclose(first["rank0_of2"]["centroids"], first["rank0_of1"]["centroids"], atol=1e-5)
    # the final clustering (after a DDP epoch) is computed together and agrees on both ranks
    final = [torch.load(tmp_path / f"final_rank{r}_of2.pt", weights_only=True) for r in range(2)]
    assert torch.equal(final[0]["labels"], final[1]["labels"]) and len(final[0]["labels"]) == 33
