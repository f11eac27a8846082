"""A tiny staged run (pretext -> scan -> selflabel); with a kill step, SIGKILL this very process
right after that step of stage ``KILL_STAGE`` (an index, 1 by default). Saves each rank's
neighbours as the scan stage mined them (``<out>/neighbours_rank<r>_of<world>.pt``).

Usage: python staged_run.py <out dir> <kill step, 0 for none> <image folder> [override...].
Lightning's DDP launcher re-runs this script for the other ranks, which is why it is a script.
"""

import os
import signal
import sys
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mtl_unsup.train import train  # noqa: E402
from tests.conftest import compose_cfg, staged_overrides  # noqa: E402


class KillAt(L.Callback):
    def __init__(self, step: int, stage: int) -> None:
        self.step, self.stage = step, stage

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if self.step and module.stage_index == self.stage and trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SaveNeighbours(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_epoch_start(self, trainer, module) -> None:
        scan = module.tasks["scan"]
        if module.task_weight("scan") > 0 and trainer.current_epoch == 0:
            name = f"neighbours_rank{trainer.global_rank}_of{trainer.world_size}.pt"
            torch.save(scan.neighbours, self.out / name)


def main() -> None:
    out, kill_step, root, extra = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    cfg = compose_cfg(out, [*staged_overrides(Path(root)), *extra])
    out.mkdir(parents=True, exist_ok=True)
    train(cfg, extra_callbacks=(KillAt(kill_step, int(os.environ.get("KILL_STAGE", "1"))),
                                SaveNeighbours(out)))


if __name__ == "__main__":
    main()
