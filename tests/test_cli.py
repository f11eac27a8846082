"""The console commands end a user's mistake with one message naming the key or path, exit 2;
the trainer group is typed like the rest of the config."""

from __future__ import annotations

import dataclasses
import inspect
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException, InstantiationException
from hydra.utils import instantiate
from lightning.pytorch import Trainer

from mtl_unsup.cli import user_message
from mtl_unsup.config import ConfigValueError, TrainerConfig, check_config
from mtl_unsup.data.images import DataError
from mtl_unsup.errors import UserError
from mtl_unsup.inference import CheckpointError
from mtl_unsup.models.backbones import ConfigError
from mtl_unsup.predict import OutputExistsError
from mtl_unsup.resume import MissingCheckpointError, RunDirError

from .conftest import CONF_DIR, compose_cfg, tiny_folder_overrides, write_shapes

# The tiny run on the shapes folder, without its cluster.k; {shapes}, {empty}, {out} are filled in.
FOLDER = [o for o in tiny_folder_overrides(Path("{shapes}")) if not o.startswith("cluster.k=")]
# id: (module, arguments, what stderr must name)
CASES = {
    "k_too_small": ("train", [*FOLDER, "cluster.k=1"], "cluster.k=1: at least 2 clusters"),
    "k_above_images_in_a_sweep": ("train", ["-m", *FOLDER, "cluster.k=100000"],
                                  "cluster.k=100000 is larger than the 42 training images"),
    "empty_folder": ("train", [*FOLDER, "data.root={empty}"], "No images found in {empty}"),
    "misspelt_key": ("train", ["cluster.kk=3"], "cluster.kk"),
    "wrong_type": ("train", ["cluster.niter=ten"], "full_key: cluster.niter"),
    "k_neither_number_nor_auto": ("train", ["cluster.k=ten"], "cluster.k='ten': use a number of clusters"),
    "trainer_wrong_type": ("train", ["trainer.max_epochs=abc"], "full_key: trainer.max_epochs"),
    "run_setting_each_stage_replaces": (
        "train", ["data=folder", "data.root={shapes}", "optimizer.lr=0.1"],
        "optimizer.lr=0.1: every stage of this run sets its own optimizer"),
    "folder_protocol_without_its_tasks": (
        "train", ["data=folder", "data.root={shapes}", "task=[cluster,scan]"],
        "task=[cluster,scan] lacks contrastive"),
    "protocol_beside_an_experiment": (
        "train", ["experiment=scan_cifar10_cpu", "data.root={shapes}", "protocol=folder"],
        "protocol=folder with experiment=scan_cifar10_cpu"),
    "group_set_to_null": ("train", ["backbone=null"], "backbone=null: the run needs one of"),
    "missing_ckpt": ("predict", ["ckpt={out}/none.ckpt", "data.root={shapes}"], "{out}/none.ckpt"),
}


def command(module: str, args: list[str], tmp: Path, full_error: bool = False
            ) -> subprocess.CompletedProcess:
    """``python -m mtl_unsup.<module> ...`` from ``tmp``, writing only below it."""
    env = {**os.environ, "MTL_UNSUP_CACHE": str(tmp / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    if full_error:
        env["HYDRA_FULL_ERROR"] = "1"
    dirs = [f"hydra.run.dir={tmp / 'out'}", f"hydra.sweep.dir={tmp / 'sweep'}"]
    return subprocess.run([sys.executable, "-m", f"mtl_unsup.{module}", *args, *dirs], cwd=tmp,
                          env=env, capture_output=True, text=True, timeout=300)


def fill(text: str, tmp: Path) -> str:
    return text.format(shapes=tmp / "shapes", empty=tmp / "empty", out=tmp / "out")


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """Every case run once, a few at a time (each command spends seconds importing torch)."""
    jobs = {}
    for case, (module, args, _) in CASES.items():
        tmp = tmp_path_factory.mktemp(case)
        write_shapes(tmp / "shapes")
        (tmp / "empty").mkdir()
        jobs[case] = (module, [fill(arg, tmp) for arg in args], tmp)
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = {case: pool.submit(command, *job) for case, job in jobs.items()}
    return {case: (futures[case].result(), fill(CASES[case][2], jobs[case][2])) for case in CASES}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_user_mistake_ends_with_one_message_and_exit_status_2(results, case):
    proc, names = results[case]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert names in proc.stderr
    assert "Traceback" not in proc.stderr and "Set the environment variable HYDRA_FULL_ERROR" in proc.stderr


@pytest.mark.slow
def test_hydra_full_error_shows_the_traceback(tmp_path):
    root = write_shapes(tmp_path / "shapes")
    proc = command("train", [*tiny_folder_overrides(root), "cluster.k=1"], tmp_path, full_error=True)
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ConfigValueError: Invalid configuration" in proc.stderr
    assert "cluster.k=1: at least 2 clusters" in proc.stderr


@pytest.mark.parametrize("error", [DataError, ConfigValueError, ConfigError, CheckpointError, RunDirError,
                                   MissingCheckpointError, OutputExistsError])
def test_every_user_facing_error_is_a_user_error(error):
    assert issubclass(error, UserError)


def test_a_user_error_inside_instantiate_is_still_reported_as_one(tmp_path):
    with pytest.raises(InstantiationException) as failed:  # how build_datamodule meets it
        instantiate({"_target_": "mtl_unsup.data.ImageFolderDataModule", "root": str(tmp_path),
                     "channels": 2})
    assert "data.channels=2" in (user_message(failed.value) or "")
    assert user_message(RuntimeError("a bug")) is None


def test_the_trainer_schema_lists_only_trainer_arguments_with_the_yaml_defaults():
    params = inspect.signature(Trainer.__init__).parameters
    documented = yaml.safe_load((Path(CONF_DIR) / "trainer" / "default.yaml").read_text())
    fields = {f.name: f.default for f in dataclasses.fields(TrainerConfig)}
    assert set(documented) <= set(fields)
    for name, default in fields.items():
        if name == "_target_":
            assert default == documented[name] == "lightning.pytorch.Trainer"
            continue
        assert name in params, f"{name} is not an argument of lightning.pytorch.Trainer"
        assert default == documented.get(name, params[name].default), name


def test_a_wrong_trainer_type_fails_at_composition_naming_the_key(tmp_path):
    with pytest.raises(ConfigCompositionException) as failed:
        compose_cfg(tmp_path, ["trainer.max_epochs=abc"])
    assert "trainer.max_epochs" in f"{failed.value} {failed.value.__cause__}"


@pytest.mark.parametrize("override", ["trainer.limit_train_batches=abc", "trainer.limit_val_batches=1.5",
                                      "trainer.devices=true", "trainer.precision=17",
                                      "trainer.fast_dev_run=-1", "trainer.deterministic=maybe"])
def test_trainer_arguments_of_several_types_are_checked_naming_the_key(tmp_path, override):
    cfg = compose_cfg(tmp_path, [override])
    with pytest.raises(ConfigValueError, match=override.split("=")[0] + "="):
        check_config(cfg)


@pytest.mark.parametrize("overrides", [["trainer=ddp"], ["trainer=gpu"], ["trainer.profiler=simple"],
                                       ["trainer.limit_train_batches=0.5", "trainer.devices=[0,1]",
                                        "trainer.precision=16", "trainer.max_time=00:12:00:00"]])
def test_trainer_presets_and_plain_arguments_compose_and_pass_the_checks(tmp_path, overrides):
    check_config(compose_cfg(tmp_path, overrides))
