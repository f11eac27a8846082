"""Benchmark: sharded k-means of ImageNet-sized synthetic features on 1 and on 2 processes.

``python -m mtl_unsup.benchmarks.sharded [--rows 1280000 --dim 2048 --k 1000 ...]`` runs, for each
process count, that many CPU processes (gloo); each makes its own shard of the same synthetic
features (float16: ``--clusters`` Gaussian blobs, every row drawn from its dataset index's seed)
and calls :func:`~mtl_unsup.clustering.sharded.sharded_kmeans`. It prints ``name=value`` lines:
per process count the peak resident memory of the largest process, the wall time of the
clustering and of the whole run, and the share of rows whose label equals the 1-process label.
Figures are in experiments/speed/README.md.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CHUNK = 16384


def peak_gb() -> float:
    """This process's peak resident memory (``VmHWM``, which, unlike ``ru_maxrss``, does not
    carry over the parent's peak into a process it starts)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # KiB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def make_shard(rows: torch.Tensor, dim: int, clusters: int, seed: int = 0) -> torch.Tensor:
    """float16 features of the dataset indices ``rows``: blob ``index % clusters`` plus noise, each
    chunk of 16,384 indices drawn from its own seed, so any sharding gives the same rows."""
    centres = torch.randn(clusters, dim, generator=torch.Generator().manual_seed(seed)) * 0.5
    out = torch.empty(len(rows), dim, dtype=torch.float16)
    for lo in range(0, len(rows), CHUNK):
        part = rows[lo : lo + CHUNK]
        g = torch.Generator().manual_seed(seed + 1 + int(part[0]))
        out[lo : lo + CHUNK] = (centres[part % clusters] + torch.randn(len(part), dim, generator=g)).half()
    return out


def _rank(rank: int, world: int, args: argparse.Namespace, store: str, out: str) -> None:
    from mtl_unsup.clustering.sharded import sharded_kmeans

    start = time.perf_counter()
    if world > 1:
        dist.init_process_group("gloo", init_method=store, rank=rank, world_size=world)
    # contiguous runs of CHUNK indices per rank, so each chunk's seed is the same in any sharding
    starts = torch.arange(0, args.rows, CHUNK)
    mine = torch.cat([torch.arange(s, min(s + CHUNK, args.rows)) for s in starts[rank::world].tolist()])
    shard = make_shard(mine, args.dim, args.clusters)
    made = time.perf_counter()
    state = sharded_kmeans(shard, mine, args.rows, args.k, pca_dim=args.pca_dim, niter=args.niter,
                           nredo=1, seed=0, sample=args.sample)
    done = time.perf_counter()
    peak = peak_gb()
    Path(f"{out}{rank}.json").write_text(json.dumps(
        {"peak_gb": peak, "cluster_s": done - made, "total_s": done - start,
         "shard_gb": shard.numel() * shard.element_size() / 2**30}))
    if rank == 0:
        torch.save(state.labels, f"{out}labels.pt")
    if world > 1:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_280_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--clusters", type=int, default=1000, help="blobs in the synthetic data")
    parser.add_argument("--pca-dim", type=int, default=256)
    parser.add_argument("--niter", type=int, default=10)
    parser.add_argument("--sample", type=int, default=100_000)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    figures: dict[str, float] = {}
    labels: dict[int, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.processes:
            out = f"{tmp}/p{world}_"
            store = f"file://{tmp}/store{world}"
            if world == 1:
                _rank(0, 1, args, store, out)
            else:
                mp.spawn(_rank, args=(world, args, store, out), nprocs=world, join=True)
            ranks = [json.loads(Path(f"{out}{r}.json").read_text()) for r in range(world)]
            labels[world] = torch.load(f"{out}labels.pt")
            figures[f"processes{world}_peak_gb_per_process"] = max(r["peak_gb"] for r in ranks)
            figures[f"processes{world}_shard_gb_per_process"] = max(r["shard_gb"] for r in ranks)
            figures[f"processes{world}_cluster_seconds"] = max(r["cluster_s"] for r in ranks)
            figures[f"processes{world}_total_seconds"] = max(r["total_s"] for r in ranks)
    first = args.processes[0]
    for world in args.processes[1:]:
        figures[f"processes{world}_same_labels_as_{first}"] = float(
            (labels[world] == labels[first]).double().mean())
    print(" ".join(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()))
    for name, value in figures.items():
        print(f"{name}={value:.4g}")
    return figures


if __name__ == "__main__":
    main()
