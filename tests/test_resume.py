"""A run killed mid-epoch and resumed (by hand, or as a requeued SLURM job) ends exactly like an
uninterrupted one; a run directory is never written over."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from submitit.slurm.slurm import SlurmExecutor, SlurmJobEnvironment

from mtl_unsup.resume import RunDirError, find_unfinished_run, resolve_start

from .conftest import CONF_DIR, write_shapes

SCRIPT = Path(__file__).parent / "scripts" / "train_until_killed.py"
SETTINGS = ["trainer.max_epochs=3", "trainer.deterministic=true", "data.batch_size=8",
            "checkpoint.every_n_train_steps=3",
            # every kind of task state: k-means targets, neighbours, running head losses
            "task=[cluster,rotation,contrastive,scan,selflabel,overcluster]", "task.scan.start_epoch=0",
            "task.scan.num_neighbors=3", "task.scan.num_heads=2", "task.selflabel.start_epoch=1",
            "task.selflabel.threshold=0.5", "task.overcluster.start_epoch=0", "task.overcluster.k_factor=2"]


def run(out: Path, kill_step: int, root: Path, *extra: str, requeued: bool = False, kill: str = "KILL"
        ) -> subprocess.CompletedProcess:
    """The tiny training in a process of its own; ``requeued``: as SLURM re-runs a requeued job;
    ``kill``: the signal sent at ``kill_step``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "KILL_SIGNAL": kill}
    env.pop("SLURM_RESTART_COUNT", None)
    if requeued:
        env["SLURM_RESTART_COUNT"] = "1"
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(kill_step), str(root), *SETTINGS, *extra],
        env=env, capture_output=True, text=True, timeout=600,
    )


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[Path, Path]:
    """The shapes folder (42 training images: 5 batches of 8 per epoch) and a run that was not
    interrupted."""
    tmp = tmp_path_factory.mktemp("resume")
    root = write_shapes(tmp / "shapes")
    whole = run(tmp / "whole", 0, root)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return root, tmp / "whole"


@pytest.mark.slow
@pytest.mark.parametrize("how", ["resume=true", "SLURM requeue"])
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(uninterrupted, tmp_path, how):
    root, whole = uninterrupted
    killed_dir = tmp_path / "killed"
    killed = run(killed_dir, 7, root)  # last.ckpt at step 6 = 1st batch of epoch 2; dies at 7
    assert killed.returncode == -signal.SIGKILL
    assert not (killed_dir / "metrics.json").exists()
    ckpt = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["epoch"] == 1  # mid-epoch

    if how == "resume=true":
        resumed = run(killed_dir, 0, root, "resume=true")
    else:  # the identical command, re-run by SLURM after a requeue
        resumed = run(killed_dir, 0, root, requeued=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (killed_dir / "metrics.json").read_text() == (whole / "metrics.json").read_text()
    assert (killed_dir / "run_info.resumed-1.json").is_file()
    # not only the (possibly saturated) metrics: every final weight is bit-for-bit the same
    final = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    reference = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=True)
    for name, value in reference["state_dict"].items():
        assert torch.equal(final[name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("name, status", [("TERM", 143), ("INT", 130)])
def test_a_signal_saves_a_checkpoint_names_the_resume_command_and_exits_non_zero(uninterrupted, tmp_path,
                                                                                 name, status):
    root, whole = uninterrupted
    out = tmp_path / "stopped"
    stopped = run(out, 7, root, kill=name)  # the signal comes after step 7: the run stops after step 8
    assert stopped.returncode == status, stopped.stderr[-3000:]
    last = out / "checkpoints" / "last.ckpt"
    assert f"stopped by SIG{name} at epoch 1, step 8; saved {last}" in stopped.stderr
    assert "resume=true" in stopped.stderr.split("resume with:")[1]
    assert torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    assert not (out / "metrics.json").exists()
    resumed = run(out, 0, root, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (out / "metrics.json").read_text() == (whole / "metrics.json").read_text()


def test_a_requeued_slurm_job_continues_its_own_unfinished_run(tmp_path, monkeypatch):
    (tmp_path / "checkpoints").mkdir()
    own = tmp_path / "checkpoints" / "last.ckpt"
    torch.save({"global_step": 3}, own)  # a whole checkpoint (a damaged one falls back, or stops)
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"x")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    with pytest.raises(RunDirError):  # a first run into this directory would overwrite it
        resolve_start(None, False, tmp_path)
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert resolve_start(None, False, tmp_path) == (str(own), tmp_path)
    assert resolve_start(str(other), False, tmp_path) == (str(own), tmp_path)  # newer than ckpt_path
    (tmp_path / "metrics.json").write_text("{}")  # finished: never started again
    with pytest.raises(RunDirError):
        resolve_start(None, False, tmp_path)


def test_the_slurm_launcher_leaves_the_requeue_signal_to_submitit(tmp_path, monkeypatch):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
                                          "trainer.num_nodes=2", f"hydra.sweep.dir={tmp_path}"],
                      return_hydra_config=True)
    params = cfg.hydra.launcher
    assert "signal" not in params.additional_parameters
    assert params.signal_delay_s > 0 and params.max_num_timeout > 0
    # The sbatch script the launcher would submit, built by submitit itself (no SLURM here).
    executors = []
    monkeypatch.setattr(SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # "srun" found
    monkeypatch.setattr(submitit.AutoExecutor, "map_array", lambda self, *a: executors.append(self) or [])
    launcher = instantiate(params)
    launcher.config = cfg
    launcher.launch([["seed=0"]], initial_job_idx=0)
    sbatch = executors[0]._executor._make_submission_file_text("python -m x", "0")
    signal_line = f"#SBATCH --signal={SlurmJobEnvironment.USR_SIG}@{params.signal_delay_s}\n"
    assert signal_line in sbatch  # submitit's own signal (USR2), which its handler requeues on
    for line in ("--ntasks-per-node=4", "--gpus-per-node=4", "--nodes=2"):
        assert f"#SBATCH {line}\n" in sbatch
    assert executors[0]._executor.max_num_timeout == params.max_num_timeout


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


@pytest.mark.slow
def test_a_run_refreshing_from_its_feature_bank_resumes_exactly(uninterrupted, tmp_path):
    root, _ = uninterrupted
    bank = ["cluster.features=bank"]
    whole = run(tmp_path / "whole", 0, root, *bank)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert "from_bank=1" in whole.stdout + whole.stderr  # epochs 1 and 2 refresh from the bank
    killed = run(tmp_path / "killed", 7, root, *bank)
    assert killed.returncode == -signal.SIGKILL
    assert "feature_bank" in torch.load(tmp_path / "killed" / "checkpoints" / "last.ckpt", weights_only=True)
    resumed = run(tmp_path / "killed", 0, root, *bank, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    killed_dir, whole_dir = tmp_path / "killed", tmp_path / "whole"
    assert (killed_dir / "metrics.json").read_text() == (whole_dir / "metrics.json").read_text()
    final = torch.load(killed_dir / "checkpoints" / "last.ckpt", weights_only=True)
    reference = torch.load(whole_dir / "checkpoints" / "last.ckpt", weights_only=True)
    for name, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][name], value), name
    assert torch.equal(final["feature_bank"]["features"], reference["feature_bank"]["features"])
