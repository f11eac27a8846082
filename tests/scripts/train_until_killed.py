"""Train the tiny config; with a kill step, SIGKILL this very process right after that step
(or the signal named by ``KILL_SIGNAL``, e.g. TERM or INT, which the run handles itself).

Usage: python train_until_killed.py <out dir> <kill step, 0 for none> <image folder> [override...]
"""

import os
import signal
import sys
from pathlib import Path

import lightning as L

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mtl_unsup.train import train  # noqa: E402
from tests.conftest import compose_cfg, tiny_folder_overrides  # noqa: E402


class KillAt(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, "SIG" + os.environ.get("KILL_SIGNAL", "KILL")))


def main() -> None:
    out, kill_step, root, extra = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
    cfg = compose_cfg(out, [*tiny_folder_overrides(Path(root)), *extra])
    train(cfg, extra_callbacks=(KillAt(kill_step),) if kill_step else ())


if __name__ == "__main__":
    main()
