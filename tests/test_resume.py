"""A run killed mid-epoch and resumed ends exactly like an uninterrupted one."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from mtl_unsup.resume import RunDirError, find_unfinished_run, resolve_start

from .conftest import write_shapes

SCRIPT = Path(__file__).parent / "scripts" / "train_until_killed.py"
SETTINGS = ["trainer.max_epochs=3", "trainer.deterministic=true", "data.batch_size=8",
            "checkpoint.every_n_train_steps=3"]


def run(out: Path, kill_step: int, root: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(kill_step), str(root), *SETTINGS, *extra],
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600,
    )


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path):
    root = write_shapes(tmp_path / "shapes")  # 42 training images: 5 batches of 8 per epoch
    whole = run(tmp_path / "whole", 0, root)
    assert whole.returncode == 0, whole.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    killed = run(killed_dir, 7, root)  # last.ckpt at step 6 = 1st batch of epoch 2; dies at 7
    assert killed.returncode == -signal.SIGKILL
    assert not (killed_dir / "metrics.json").exists()
    ckpt = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1  # mid-epoch

    resumed = run(killed_dir, 0, root, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (killed_dir / "metrics.json").read_text() == (tmp_path / "whole" / "metrics.json").read_text()
    assert (killed_dir / "run_info.resumed-1.json").is_file()
    # not only the (possibly saturated) metrics: every final weight is bit-for-bit the same
    final = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    reference = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=True)
    for name, value in reference["state_dict"].items():
        assert torch.equal(final[name], value), name


def test_a_finished_run_dir_is_never_overwritten(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(RunDirError, match="resume=true"):
        resolve_start(None, False, tmp_path)
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_missing_ckpt_path_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="ckpt_path='nope.ckpt'"):
        resolve_start("nope.ckpt", False, tmp_path)


def make_run(parent: Path, name: str, overrides: list[str], finished: bool) -> Path:
    run_dir = parent / name
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run_dir / "checkpoints").mkdir()
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"x")
    if finished:
        (run_dir / "metrics.json").write_text("{}")
    return run_dir


def test_resume_finds_the_unfinished_run_of_the_same_command(tmp_path):
    runs = tmp_path / "runs"
    make_run(runs, "a", ["cluster.k=5"], finished=False)
    make_run(runs, "b", ["cluster.k=7"], finished=False)
    make_run(runs, "c", ["cluster.k=5"], finished=True)
    new = runs / "d"
    new.mkdir()
    assert find_unfinished_run(new, ["cluster.k=5", "resume=true"]) == runs / "a"
    assert find_unfinished_run(new, ["cluster.k=6", "resume=true"]) is None
