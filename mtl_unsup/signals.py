"""A run stopped by SIGTERM (what ``kill``, Kubernetes and schedulers send) or SIGINT (Ctrl+C):
it saves ``last.ckpt`` at the next step boundary, says where it stopped and the command that
resumes it, and exits with status 128 + the signal (143, 130), so a sweep, a script or a scheduler
reads it as unfinished. Lightning notices SIGTERM itself (``trainer.received_sigterm``) but then
exits with status 0 and no checkpoint; SIGINT it turns into an exit without one."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import lightning as L


class StoppedBySignal(SystemExit):
    """Training stopped by a signal after saving its checkpoint; the exit status is 128 + it."""


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that continues this run: the same one with ``resume=true``."""
    argv = list(sys.argv if argv is None else argv)
    program = "mtl-train" if Path(argv[0]).name == "mtl-train" else "python -m mtl_unsup.train"
    args = [a for a in argv[1:] if not a.startswith(("resume=", "+resume="))]
    return " ".join([program, *map(shlex.quote, args), "resume=true"])


class StopOnSignal(L.Callback):
    """Checks for SIGTERM and SIGINT after every training step (every rank agrees); on one, saves
    ``last_path`` and raises :class:`StoppedBySignal`. Its handlers replace Lightning's for the
    fit (which would end the run with status 0 and no checkpoint); a second signal stops at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, last_path: Path) -> None:
        self.last_path = Path(last_path)
        self.received: signal.Signals | None = None
        self._previous: dict[int, Any] = {}

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self.received is not None:  # the second one: no waiting for the step to end
            self._restore()
            raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)
        self.received = signal.Signals(signum)
        print(f"\n{self.received.name}: stopping after this training step, with a checkpoint (send it again "
              "to stop at once).", file=sys.stderr, flush=True)

    def _restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        # after Lightning has put its own handlers in place for the fit
        self.received = None
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._on_signal) for s in self.SIGNALS}

    def on_train_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, module: L.LightningModule, exception: BaseException) -> None:
        self._restore()

    def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        codes = [int(s) for s in self.SIGNALS]
        received = int(self.received or 0)
        if trainer.world_size > 1:  # every rank stops at the same step, or none does
            import torch

            found = torch.tensor([float(received == c) for c in codes], device=module.device)
            found = trainer.strategy.reduce(found, reduce_op="max")
            received = next((c for c, hit in zip(codes, found.tolist(), strict=True) if hit), 0)
        if not received:
            return
        trainer.save_checkpoint(self.last_path)
        self._restore()
        if trainer.is_global_zero:
            print(f"\nstopped by {signal.Signals(received).name} at epoch {trainer.current_epoch}, step "
                  f"{trainer.global_step}; saved {self.last_path}; resume with:\n  {resume_command()}",
                  file=sys.stderr, flush=True)
        raise StoppedBySignal(128 + received)
