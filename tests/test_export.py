"""mtl-export: each format, loaded in a fresh process where mtl_unsup cannot be imported, gives the
checkpoint's own features and clusters (those of mtl-predict); a user's mistake is one message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from mtl_unsup.config import DataConfig, EmbeddingDataConfig
from mtl_unsup.errors import CheckpointError, UserError
from mtl_unsup.export import ExportConfig, export
from mtl_unsup.inference import model_from_checkpoint
from mtl_unsup.model_inputs import run_model
from mtl_unsup.train import train

from .conftest import compose_cfg, tiny_folder_overrides, write_shapes
from .test_embedding_file import blobs, run_overrides

FORMATS = ["torchscript", "onnx", "state_dict"]
# head: the cluster head answers; kmeans: no clustering head, so the k-means does (and the images
# were inverted in training); rows: a model trained on rows of embeddings, two SCAN heads
MODELS = ["head", "kmeans", "rows"]
# the onnx case needs onnx (to write) and onnxruntime (to run): the export extra
HAS_ONNX = find_spec("onnx") is not None and find_spec("onnxruntime") is not None

# Run with the export folders in a JSON file; writes fresh.pt into each folder.
FRESH = '''
import sys
import zipfile
sys.modules["mtl_unsup"] = None  # any import of mtl_unsup fails: the exports must do without it
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def image(path, spec):
    """Decoded as export.json says (the test images are at the model's size: no resize)."""
    with Image.open(path) as im:
        im = im.convert("L" if spec["channels"] == 1 else "RGB")
        assert im.size == (spec["image_size"], spec["image_size"])
        x = np.asarray(im, dtype=np.float32) / 255
    return x[None] if x.ndim == 2 else x.transpose(2, 0, 1)


for job in json.loads(Path(sys.argv[1]).read_text()):
    folder = Path(job["dir"])
    info = json.loads((folder / "export.json").read_text())
    spec = info["input"]
    if spec["kind"] == "images":
        x = np.stack([image(p, spec) for p in job["paths"]])
    else:
        x = np.load(job["rows"])
    out = {}
    for name, file in info["files"].items():
        path = str(folder / file)
        if info["format"] == "state_dict":
            out.update({f"{name}/{k}": v for k, v in torch.load(path, weights_only=True).items()})
            continue
        if info["format"] == "torchscript":
            with torch.no_grad():
                y = torch.jit.load(path).eval()(torch.from_numpy(x))
            y = [v.numpy() for v in (y if isinstance(y, tuple) else (y,))]
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
            y = session.run(None, {spec["kind"]: x})
        out.update({f"{name}/{o}": torch.from_numpy(np.asarray(v)) for o, v in zip(info["outputs"][name], y)})
    torch.save(out, folder / "fresh.pt")
'''


def export_cfg(ckpt: Path | str, fmt: str, out_dir: Path, **kw) -> OmegaConf:
    cfg = OmegaConf.structured(ExportConfig)
    cfg.ckpt, cfg.format, cfg.out_dir = str(ckpt), fmt, str(out_dir)
    for key, value in kw.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    shapes = write_shapes(base / "shapes")
    train(compose_cfg(base / "head", tiny_folder_overrides(shapes)))
    no_head = [o for o in tiny_folder_overrides(shapes) if not o.startswith("task.cluster.")]
    train(compose_cfg(base / "kmeans", [*no_head, "task=[rotation]", "data.invert=true",
                                        "trainer.max_epochs=1"]))
    x, _ = blobs(n=120, d=8)
    np.savez(base / "rows.npz", embeddings=x)
    train(compose_cfg(base / "rows", run_overrides(base / "rows.npz", "trainer.max_epochs=3",
                                                   "pictures=false")))
    return {name: base / name / "checkpoints" / "last.ckpt" for name in MODELS}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, OmegaConf]:
    """New images (and rows) for each model, as mtl-predict's data group names them."""
    base = tmp_path_factory.mktemp("inputs")
    images = OmegaConf.structured(DataConfig)
    images.root = str(write_shapes(base / "new", per_class=4, seed=9, labelled=False))
    rows = OmegaConf.structured(EmbeddingDataConfig)
    np.save(base / "rows.npy", blobs(n=20, d=8, seed=3)[0])
    rows.path = str(base / "rows.npy")
    return {"head": images, "kmeans": images, "rows": rows}


@pytest.fixture(scope="module")
def reference(checkpoints, inputs) -> dict:
    """What mtl-predict computes with each checkpoint: the inputs in order, and the predictions."""
    result = {}
    for name, ckpt in checkpoints.items():
        module, train_cfg = model_from_checkpoint(ckpt)
        result[name] = run_model(module, train_cfg, inputs[name], str(ckpt), "predict", "cpu", False)
    return result


@pytest.fixture(scope="module")
def fresh(checkpoints, inputs, reference, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Every model exported in every format, then read back in one fresh process."""
    base = tmp_path_factory.mktemp("exports")
    jobs = []
    for name in MODELS:
        for fmt in FORMATS if HAS_ONNX else [f for f in FORMATS if f != "onnx"]:
            out = export(export_cfg(checkpoints[name], fmt, base / name / fmt))
            paths = reference[name][0].paths
            jobs.append({"dir": str(out), "rows": inputs[name].get("path"),
                         "paths": None if paths is None else [str(p) for p in paths],
                         "key": [name, fmt]})
    (base / "jobs.json").write_text(json.dumps(jobs))
    (base / "fresh.py").write_text(FRESH)
    proc = subprocess.run([sys.executable, str(base / "fresh.py"), str(base / "jobs.json")], cwd=base,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return {tuple(j["key"]): {"dir": Path(j["dir"]),
                              "out": torch.load(Path(j["dir"]) / "fresh.pt", weights_only=True)}
            for j in jobs}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_a_fresh_process_gets_the_checkpoints_clusters_and_features(fresh, reference, name, fmt):
    if fmt == "onnx" and not HAS_ONNX:
        pytest.skip("onnx or onnxruntime is not installed (pip install 'mtl-unsup[export]')")
    out, preds = fresh[(name, fmt)]["out"], reference[name][1]
    assert out["clusterer/cluster"].dtype == torch.int64
    assert np.array_equal(out["clusterer/cluster"].numpy(), preds.clusters)
    assert np.allclose(out["clusterer/confidence"].numpy(), preds.confidence, atol=1e-5)
    if name == "rows":  # the backbone of rows is the identity: only the clusterer is exported
        assert "backbone/features" not in out
    else:
        assert np.allclose(out["backbone/features"].numpy(), preds.features, atol=1e-4)
    assert len(np.unique(preds.clusters)) > 1  # more than a constant to agree on


@pytest.mark.parametrize("name", MODELS)
def test_state_dicts_hold_the_checkpoints_tensors_under_its_names(fresh, checkpoints, name):
    ckpt = torch.load(checkpoints[name], weights_only=True)
    weights, state = ckpt["state_dict"], ckpt["cluster_state"]
    out = fresh[(name, "state_dict")]["out"]
    for key, tensor in out.items():
        model, key = key.split("/", 1)
        expected = state[key.split(".", 1)[1]] if key.startswith("cluster_state.") else weights[key]
        assert torch.equal(tensor, expected), key
    keys = {model: {k.split("/", 1)[1] for k in out if k.startswith(f"{model}/")}
            for model in ("backbone", "clusterer")}
    # rows: no backbone (the identity), nor mean and std
    backbone = set() if name == "rows" else {"mean", "std", *(k for k in weights if k.startswith("backbone"))}
    assert keys["backbone"] == backbone
    answer = json.loads((fresh[(name, "state_dict")]["dir"] / "export.json").read_text())["answer"]
    if name == "kmeans":
        assert answer == "kmeans"
        kmeans = {f"cluster_state.{k}" for k in ("pca_mean", "pca_proj", "centroids")}
        assert keys["clusterer"] == backbone | kmeans
    else:  # the answer's task alone
        task = {"head": "cluster", "rows": "scan"}[name]
        assert answer.split("_")[0] == task
        assert keys["clusterer"] == backbone | {k for k in weights if k.startswith(f"tasks.{task}.")}


def test_export_json_gives_the_input_contract(fresh):
    info = json.loads((fresh[("kmeans", "torchscript")]["dir"] / "export.json").read_text())
    assert info["input"]["shape"] == ["N", 1, 16, 16] and info["input"]["range"] == [0.0, 1.0]
    assert info["input"]["invert"] is True  # and done inside the models
    assert info["input"]["mean"] == [0.3] and info["input"]["std"] == [0.4]
    assert info["k"] == 3 and info["feature_dim"] == 16 and info["backbone"]["widths"] == [8, 16]
    assert info["files"] == {"backbone": "backbone.pt", "clusterer": "clusterer.pt"}
    rows = json.loads((fresh[("rows", "state_dict")]["dir"] / "export.json").read_text())
    assert rows["input"] == {"kind": "rows", "shape": ["N", 8], "dtype": "float32"}
    assert rows["files"] == {"clusterer": "clusterer_state_dict.pt"}


def test_bad_input_is_named_and_nothing_is_overwritten(checkpoints, tmp_path, monkeypatch):
    with pytest.raises(CheckpointError, match=r"ckpt='.*none.ckpt' does not exist"):
        export(export_cfg(tmp_path / "none.ckpt", "torchscript", tmp_path / "a"))
    (tmp_path / "junk.ckpt").write_text("junk")
    with pytest.raises(CheckpointError, match="is truncated, or not a checkpoint"):
        export(export_cfg(tmp_path / "junk.ckpt", "torchscript", tmp_path / "a"))
    with pytest.raises(UserError, match="format='pickle' is not one of torchscript, onnx, state_dict"):
        export(export_cfg(checkpoints["head"], "pickle", tmp_path / "a"))
    monkeypatch.setattr("mtl_unsup.export.find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"format=onnx needs the onnx package: pip install 'mtl-unsup\["):
        export(export_cfg(checkpoints["head"], "onnx", tmp_path / "a"))
    monkeypatch.undo()
    assert not (tmp_path / "a").exists()
    out = tmp_path / "b"
    out.mkdir()
    (out / "clusterer.pt").write_text("mine")
    with pytest.raises(UserError, match=r"Would overwrite .*clusterer.pt.*overwrite=true"):
        export(export_cfg(checkpoints["head"], "torchscript", out))
    assert (out / "clusterer.pt").read_text() == "mine" and not (out / "backbone.pt").exists()
    export(export_cfg(checkpoints["head"], "torchscript", out, overwrite=True))
    assert zipfile.is_zipfile(out / "clusterer.pt")  # a TorchScript archive


def command(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "mtl_unsup.export", *args], cwd=tmp, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_command_writes_into_the_run_dir_and_ends_a_mistake_with_one_message(checkpoints, tmp_path):
    runs = {"good": [f"ckpt={checkpoints['head']}", f"hydra.run.dir={tmp_path / 'good'}"],
            "bad": [f"ckpt={checkpoints['head']}", "format=xml", f"hydra.run.dir={tmp_path / 'bad'}"]}
    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(runs, pool.map(lambda args: command(args, tmp_path), runs.values()), strict=True))
    assert done["good"].returncode == 0, done["good"].stderr
    assert {"backbone.pt", "clusterer.pt", "export.json"} <= {p.name for p in (tmp_path / "good").iterdir()}
    bad = done["bad"]
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: format='xml' is not one of torchscript, onnx, state_dict" in bad.stderr
    assert not (tmp_path / "outputs").exists()  # nothing outside hydra.run.dir
