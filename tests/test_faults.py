"""Faults a cluster and a disk cause: a write that fails keeps the previous file, a run directory
has one writer."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtl_unsup.atomic import DiskFullError, write_text
from mtl_unsup.checkpoint_io import AtomicCheckpointIO
from mtl_unsup.integrity import checkpoint_problem, previous_of
from mtl_unsup.resume import RunDirError
from mtl_unsup.run_lock import LOCK, acquire, release

ROOT = Path(__file__).resolve().parents[1]


def other_process_locks(run_dir: Path, hold: float = 0.0) -> subprocess.Popen:
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from mtl_unsup.run_lock import acquire; "
            f"acquire(__import__('pathlib').Path({str(run_dir)!r})); print('locked', flush=True); "
            f"time.sleep({hold})")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def test_a_locked_run_directory_refuses_a_second_writer_and_a_dead_ones_lock_is_taken(tmp_path, caplog):
    run_dir = tmp_path / "run"
    other = other_process_locks(run_dir, hold=60)
    assert other.stdout.readline().strip() == "locked"
    with pytest.raises(RunDirError, match=rf"in use by another run \(process {other.pid} on "):
        acquire(run_dir)
    other.send_signal(signal.SIGKILL)  # dies holding it: the lock goes with the process
    other.wait()
    assert acquire(run_dir)
    assert f"locked by process {other.pid}, which ended without releasing it" in caplog.text
    assert not acquire(run_dir)  # this process holds it already
    release(run_dir)
    assert (run_dir / LOCK).read_text() == ""  # a released lock names nobody


def test_a_failed_write_keeps_the_previous_file_and_names_the_path_and_free_space(tmp_path, monkeypatch):
    target = tmp_path / "metrics.json"
    write_text(target, "good")

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(DiskFullError, match=rf"Could not write {target}: the disk is full \(.* MiB free"):
        write_text(target, "half")
    monkeypatch.undo()
    assert target.read_text() == "good"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temporary file left


def test_a_checkpoint_is_written_whole_and_the_one_it_replaces_is_kept(tmp_path, monkeypatch):
    io, path = AtomicCheckpointIO(), tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)
    io.save_checkpoint({"step": 2}, path)
    assert torch.load(path)["step"] == 2 and torch.load(previous_of(path))["step"] == 1

    def dies_midway(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_midway)
    with pytest.raises(DiskFullError, match="last.ckpt: the disk is full"):
        io.save_checkpoint({"step": 3}, path)
    monkeypatch.undo()
    assert torch.load(path)["step"] == 2  # the last good checkpoint, whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt", "last.ckpt.prev"]
    io.remove_checkpoint(path)
    assert not any(path.parent.iterdir())


@pytest.mark.slow
def test_two_commands_into_one_run_directory(tmp_path):
    from .conftest import tiny_folder_overrides, write_shapes

    root = write_shapes(tmp_path / "shapes", per_class=12)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "mtl_unsup.train", *tiny_folder_overrides(root), "trainer.max_epochs=6",
               f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not ((run_dir / LOCK).is_file() and (run_dir / LOCK).read_text()):
        time.sleep(0.2)
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    output = first.communicate(timeout=600)[0]
    assert first.returncode == 0, output[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by another run (process {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert not list((run_dir / "checkpoints").glob("last-v*.ckpt"))  # nothing interleaved
    assert not (run_dir / "run_info.resumed-1.json").exists()


def test_damaged_checkpoints_are_named_and_resuming_falls_back_to_the_one_before(tmp_path, caplog):
    from mtl_unsup.errors import CheckpointError
    from mtl_unsup.resume import usable_checkpoint

    io, last = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 6, "w": torch.arange(4000)}, last)
    io.save_checkpoint({"global_step": 9, "w": torch.arange(4000)}, last)
    whole = last.read_bytes()
    assert checkpoint_problem(last) is None and usable_checkpoint(last) == last
    last.write_bytes(whole[: len(whole) // 2])  # cut short
    assert checkpoint_problem(last).startswith(f"truncated, or not a checkpoint ({len(whole) // 2:,} bytes")
    assert usable_checkpoint(last) == previous_of(last)
    assert "last.ckpt is truncated" in caplog.text and "resuming from last.ckpt.prev" in caplog.text
    assert "at step 6" in caplog.text
    flipped = bytearray(whole)
    flipped[len(whole) // 3] ^= 0x10  # torch.load reads this without complaint
    last.write_bytes(bytes(flipped))
    assert "fails its checksum" in checkpoint_problem(last)
    previous_of(last).write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"last.ckpt is corrupt .* \(last.ckpt.prev\) is empty"):
        usable_checkpoint(last)


def test_jobs_sharing_a_fresh_cache_write_the_digits_once(tmp_path):
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from mtl_unsup.data.digits import write_digits_folder; "
            f"write_digits_folder({str(tmp_path / 'digits')!r})")
    command = [sys.executable, "-c", code]
    jobs = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [job.communicate(timeout=120)[1] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0, 0], errors
    assert len(list((tmp_path / "digits").glob("*/*.png"))) == 1797
    assert not list(tmp_path.glob(".digits-*"))  # no half-written folder left
