"""Fit one epoch (DDP when devices > 1) and save each rank's first clustering and SCAN state.

Usage: python first_clustering.py <out dir> <devices> <image folder> [sharded]. Lightning's DDP
launcher re-runs this script for the other ranks, which is why it is a script and not a test
function. With ``sharded``: ``cluster=sharded`` and no SCAN; the final clustering is saved too.
"""

import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mtl_unsup.train import build_run  # noqa: E402
from tests.conftest import compose_cfg, tiny_folder_overrides  # noqa: E402


class SaveFirstClustering(L.Callback):
    """Saves each rank's first clustering and the RNG state its first augmentation draws from."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_epoch_start(self, trainer, module) -> None:
        if trainer.current_epoch == 0:
            state = module.cluster_state.state_dict()
            name = f"rank{trainer.global_rank}_of{trainer.world_size}"
            torch.save(state, self.out / f"{name}.pt")
            make_views = module.make_views

            def record_then_augment(images):
                if not (self.out / f"{name}_rng.pt").exists():
                    torch.save(torch.get_rng_state(), self.out / f"{name}_rng.pt")
                return make_views(images)

            module.make_views = record_then_augment

    def on_train_end(self, trainer, module) -> None:
        name = f"rank{trainer.global_rank}_of{trainer.world_size}"
        if "scan" not in module.tasks:
            return
        scan = module.tasks["scan"]
        torch.save({"neighbours": scan.neighbours, "head_losses": scan.head_losses.cpu(),
                    "answer": module.answer()}, self.out / f"{name}_scan.pt")


def main() -> None:
    out, devices, root = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    sharded = sys.argv[4:] == ["sharded"]
    overrides = [*tiny_folder_overrides(Path(root)), "trainer.max_epochs=1",
                 "trainer.accelerator=cpu", f"trainer.devices={devices}",
                 f"data.batch_size={16 // devices}", "data.eval_batch_size=8", "~logger"]
    if sharded:
        overrides += ["task=[cluster,rotation]", "cluster=sharded", "cluster.pca_sample=20"]
    else:
        overrides += ["task=[cluster,rotation,contrastive,scan]", "task.scan.start_epoch=0",
                      "task.scan.num_neighbors=3", "task.scan.num_heads=2"]
    if devices > 1:
        overrides += ["trainer.strategy=ddp"]
    cfg = compose_cfg(out / f"run{devices}", overrides)
    run = build_run(cfg)
    run.trainer.callbacks.insert(1, SaveFirstClustering(out))  # right after the pseudo-labels
    run.trainer.fit(run.module, datamodule=run.datamodule)
    if sharded:
        torch.save(run.module.cluster_state.state_dict(),
                   out / f"final_rank{run.trainer.global_rank}_of{devices}.pt")


if __name__ == "__main__":
    main()
