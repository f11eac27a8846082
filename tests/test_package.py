"""A regular (non-editable) install works: the wheel carries the YAML configs and every command
composes its config from the installed package, from any working directory."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def build_and_install(tmp: Path) -> tuple[Path, Path]:
    """Build the wheel from a copy of the sources (the repository gets no build/ or egg-info) and
    install it alone into a folder; returns the wheel and that folder."""
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("conf", "mtl_unsup"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    built = subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"),
                            str(src)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    # no setuptools warning (a Python warning category, e.g. "BuildBackendWarning: ...")
    assert "Warning:" not in built.stdout + built.stderr, built.stdout + built.stderr
    wheel = next((tmp / "dist").glob("mtl_unsup-*.whl"))
    installed = subprocess.run([*pip, "install", "--no-deps", "--target", str(tmp / "site"), str(wheel)],
                               capture_output=True, text=True, timeout=300)
    assert installed.returncode == 0, installed.stderr[-3000:]
    return wheel, tmp / "site"


@pytest.mark.slow
def test_the_wheel_installs_a_package_that_composes_its_configs(tmp_path):
    wheel, site = build_and_install(tmp_path)
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        assert f"mtl_unsup/conf/{path.relative_to(ROOT / 'conf').as_posix()}" in names
    for path in sorted((ROOT / "mtl_unsup").rglob("*.py")):  # a new subpackage must be listed
        assert path.relative_to(ROOT).as_posix() in names
    for path in sorted((ROOT / "mtl_unsup" / "html" / "assets").iterdir()):  # the report's script and style
        assert path.relative_to(ROOT).as_posix() in names

    env = {**os.environ, "PYTHONPATH": str(site), "MTL_UNSUP_CACHE": str(tmp_path / "cache")}
    commands = {
        "where": [sys.executable, "-c", "import mtl_unsup.config as c; print(c.__file__, c.CONF_DIR)"],
        "train": [sys.executable, "-m", "mtl_unsup.train", "--cfg", "job"],
        "predict": [str(site / "bin" / "mtl-predict"), "ckpt=a.ckpt", "data.root=images", "--cfg", "job"],
        "evaluate": [str(site / "bin" / "mtl-evaluate"), "ckpt=a.ckpt", "data=folder", "data.root=images",
                     "--cfg", "job"],
        "report": [sys.executable, "-m", "mtl_unsup.report", "--help"],
    }
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(subprocess.run, cmd, cwd=tmp_path, env=env, capture_output=True,
                                     text=True, timeout=300) for name, cmd in commands.items()}
    out = {}
    for name, future in futures.items():
        proc = future.result()
        assert proc.returncode == 0, f"{name}: {proc.stderr[-3000:]}"
        out[name] = proc.stdout
    module_file, conf_dir = out["where"].split()
    assert Path(module_file).is_relative_to(site) and Path(conf_dir) == site / "mtl_unsup" / "conf"
    assert "max_epochs: 80" in out["train"] and "_target_: mtl_unsup.tasks.ClusterTask" in out["train"]
    assert "ckpt: a.ckpt" in out["predict"] and "root: images" in out["predict"]
    assert "ckpt: a.ckpt" in out["evaluate"] and "root: images" in out["evaluate"]
    assert "sweep_dir" in out["report"]
