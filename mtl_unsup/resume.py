"""Which checkpoint a run starts from, and where it writes: never over another run's files.

``resume=true`` continues ``<run dir>/checkpoints/last.ckpt``; when the run directory is new
(Hydra names it by the time), it continues the newest unfinished run of the same command: a
sibling directory with the same overrides, a ``last.ckpt`` and no ``metrics.json``.

A SLURM job that was requeued (timed out or preempted; submitit re-runs the same call into the
same run directory) continues its own unfinished run from its ``last.ckpt`` without being told.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import yaml
from hydra.core.hydra_config import HydraConfig

from mtl_unsup.errors import CheckpointError, UserError
from mtl_unsup.integrity import checkpoint_problem, previous_of

log = logging.getLogger(__name__)

IGNORED = ("resume=", "ckpt_path=", "hydra.run.dir=", "hydra.sweep.dir=")


class RunDirError(UserError, FileExistsError):
    """The run directory already holds another run's results."""


class MissingCheckpointError(UserError, FileNotFoundError):
    """``ckpt_path`` names no file."""


def slurm_restart_count() -> int:
    """How often SLURM has restarted this job (``SLURM_RESTART_COUNT``, set on a requeue); 0 if never."""
    value = os.environ.get("SLURM_RESTART_COUNT", "")
    return int(value) if value.isdigit() else 0


def run_checkpoint(out_dir: Path) -> Path | None:
    """The run's newest ``last.ckpt``: ``checkpoints/last.ckpt``, or in a run of stages the
    newest ``checkpoints/<stage>/last.ckpt`` (None: none yet)."""
    own = out_dir / "checkpoints" / "last.ckpt"
    if own.is_file():
        return own
    staged = [p for p in (out_dir / "checkpoints").glob("*/last.ckpt") if p.is_file()]
    return max(staged, key=lambda p: p.stat().st_mtime_ns) if staged else None


def usable_checkpoint(last: Path) -> Path:
    """``last``, or when it is damaged (truncated, corrupt) the checkpoint it replaced, saying so;
    a :class:`CheckpointError` when neither is whole."""
    problem = checkpoint_problem(last)
    if problem is None:
        return last
    previous = previous_of(last)
    before = checkpoint_problem(previous) if previous.is_file() else "missing"
    if before is not None:
        raise CheckpointError(f"{last} is {problem}, and the checkpoint before it ({previous.name}) is "
                              f"{before}. Start afresh (without resume=true, in a new hydra.run.dir) or "
                              "from another checkpoint with ckpt_path=...")
    import torch

    step = torch.load(previous, map_location="cpu", weights_only=True).get("global_step", "?")
    log.warning("%s is %s: resuming from %s, the checkpoint before it, at step %s; the steps trained after "
                "it are trained again (a checkpoint comes every checkpoint.every_n_train_steps steps).",
                last, problem, previous.name, step)
    return previous


def requeued_run(out_dir: Path) -> Path | None:
    """``last.ckpt`` of ``out_dir`` when this is a requeued SLURM job whose run there is unfinished."""
    last = run_checkpoint(out_dir)
    if slurm_restart_count() >= 1 and last is not None and not (out_dir / "metrics.json").exists():
        return usable_checkpoint(last)
    return None


def _same_command(overrides: list[str]) -> list[str]:
    return sorted(o for o in overrides if not o.lstrip("+~").startswith(IGNORED))


def current_overrides() -> list[str] | None:
    if not HydraConfig.initialized():
        return None
    return list(HydraConfig.get().overrides.task)


def find_unfinished_run(out_dir: Path, overrides: list[str]) -> Path | None:
    """Newest sibling of ``out_dir`` run with ``overrides`` that has a last.ckpt but no metrics."""
    wanted = _same_command(overrides)
    candidates = []
    for run in out_dir.parent.iterdir() if out_dir.parent.is_dir() else []:
        last, saved = run_checkpoint(run), run / ".hydra" / "overrides.yaml"
        if run == out_dir or last is None or not saved.is_file():
            continue
        if (run / "metrics.json").exists():
            continue
        if _same_command(yaml.safe_load(saved.read_text()) or []) == wanted:
            candidates.append((last.stat().st_mtime, run))
    return max(candidates)[1] if candidates else None


def holds_a_run(out_dir: Path) -> bool:
    ckpts = out_dir / "checkpoints"
    return (out_dir / "metrics.json").exists() or (ckpts.is_dir() and any(ckpts.iterdir()))


def resolve_start(ckpt_path: str | None, resume: bool, out_dir: Path) -> tuple[str | None, Path]:
    """The checkpoint to start from (None: from scratch) and the directory to write into."""
    requeued = requeued_run(out_dir)
    if requeued is not None:  # before ckpt_path: the run's own last.ckpt is newer
        log.info("SLURM requeued this job (restart %d): continuing its run from %s",
                 slurm_restart_count(), requeued)
        return str(requeued), out_dir
    if ckpt_path:
        path = Path(ckpt_path).expanduser()
        if not path.is_file():
            raise MissingCheckpointError(f"ckpt_path={ckpt_path!r} does not exist. Point it at a .ckpt file.")
        if holds_a_run(out_dir) and not resume:
            raise RunDirError(
                f"{out_dir} already holds a run. Add resume=true to continue in it, or choose a "
                "new hydra.run.dir."
            )
        return str(path), out_dir
    if resume:
        own = run_checkpoint(out_dir)
        if own is not None:
            return str(usable_checkpoint(own)), out_dir
        overrides = current_overrides()
        match = find_unfinished_run(out_dir, overrides) if overrides is not None else None
        if match is not None:
            log.info("Resuming the unfinished run in %s", match)
            return str(usable_checkpoint(run_checkpoint(match))), match
        log.warning("resume=true, but no unfinished run of this command was found: starting afresh.")
        return None, out_dir
    if holds_a_run(out_dir):
        raise RunDirError(
            f"{out_dir} already holds a run (checkpoints or metrics.json) and would be overwritten. "
            "Add resume=true to continue it, or choose a new hydra.run.dir."
        )
    return None, out_dir
