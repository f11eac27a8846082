"""DDP on CPU (gloo, 2 processes): every rank holds the same pseudo-labels as one process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from .conftest import write_shapes

SCRIPT = Path(__file__).parent / "scripts" / "first_clustering.py"


def run_script(out: Path, devices: int, root: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), str(out), str(devices), str(root)],
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


@pytest.mark.slow
def test_ddp_from_the_command_line_writes_one_run_dir_and_prints_once(tmp_path):
    root = write_shapes(tmp_path / "shapes", per_class=16)
    run_dir = tmp_path / "run"
    args = ["backbone.widths=[8,16]", "backbone.convs_per_stage=1", "trainer.max_epochs=2",
            "trainer.enable_progress_bar=false", "print_config=false", "data=folder",
            f"data.root={root}", "data.channels=1", "data.image_size=16", "data.mean=[0.3]",
            "data.std=[0.4]", "data.batch_size=8", "cluster.k=3", "cluster.pca_dim=8",
            "cluster.every_n_epochs=1", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
            f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "mtl_unsup.train", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "shapes"]
    assert (run_dir / "metrics.json").is_file() and (run_dir / ".hydra" / "config.yaml").is_file()
    assert proc.stdout.count("| test |") == 1 and proc.stdout.count("metrics:    ") == 1
    assert proc.stdout.count("clusters: ") + proc.stderr.count("clusters: ") == 2  # rank 0 only
