"""report.html: its content, its thumbnails, the runs that write it, and the page in a real browser."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from mtl_unsup.html import ReportInputs
from mtl_unsup.html.browser import find_browser, rendered_state, screenshot
from mtl_unsup.html.content import report_content
from mtl_unsup.html.thumbs import BACKGROUND, thumbnail, write_sprites
from mtl_unsup.train import train

from .conftest import compose_cfg, tiny_folder_overrides, write_shapes

# CI installs Chromium and sets this: there the browser test must run, not skip
BROWSER_REQUIRED = os.environ.get("MTL_UNSUP_REQUIRE_BROWSER") == "1"


def page_data(page: Path) -> dict:
    text = page.read_text()
    raw = re.search(r'<script type="application/json" id="report-data">(.*?)</script>', text, re.S).group(1)
    return json.loads(raw)


def test_clusters_are_described_by_confidence_and_by_their_classes():
    clusters = np.array([0, 0, 0, 1, 1, 2])
    confidence = np.array([0.5, 0.9, 0.7, 0.6, 0.8, 0.99])
    labels = np.array([1, 1, 0, 2, 2, -1])  # the last image's class is unknown
    content = report_content(ReportInputs("t", "training", clusters, confidence, labels=labels,
                                          classes=["a", "b", "c"]), sprites=None)
    first, second, third = content["clusters"]
    assert first["members"] == [1, 2, 0]  # most confident first
    assert (first["majority"], first["purity"], first["others"]) == (1, round(2 / 3, 4), [2])
    assert second["majority"] == 2 and second["purity"] == 1.0 and second["others"] == []
    assert "majority" not in third  # no known class among its members
    # a cluster takes its matched class's colour, so both embedding panels agree where they should
    assert content["colour"][:2] == [1, 2]
    assert content["confusion"]["acc"] == 0.8  # 4 of the 5 images with a known class
    assert content["labels"] == labels.tolist()
    unlabelled = report_content(ReportInputs("t", "predict", clusters, confidence), sprites=None)
    assert unlabelled["confusion"] is None and "majority" not in unlabelled["clusters"][0]


def test_thumbnails_keep_their_aspect_and_survive_a_missing_file(tmp_path):
    wide = tmp_path / "wide.png"
    Image.new("RGB", (40, 10), (255, 0, 0)).save(wide)
    thumb = np.asarray(thumbnail(wide, 48))
    assert thumb.shape == (48, 48, 3)
    assert tuple(thumb[24, 24]) == (255, 0, 0) and tuple(thumb[2, 24]) == BACKGROUND  # letterboxed
    assert np.asarray(thumbnail(tmp_path / "gone.png", 48)).shape == (48, 48, 3)


def test_sprite_sheets_are_written_once(tmp_path):
    root = write_shapes(tmp_path / "shapes", per_class=5)
    paths = sorted(root.rglob("*.png"))
    order = np.arange(len(paths))[::-1]
    sprites = write_sprites(paths, order, tmp_path / "page", per_sheet=4)
    sheets = sorted((tmp_path / "page" / "report_files").glob("sheet-*.jpg"))
    assert len(sheets) == sprites.sheets == 4  # 15 images, 4 to a sheet
    assert sprites.position[order[0]] == 0 and sprites.position[order[-1]] == len(paths) - 1
    stamps, first = [s.stat().st_mtime_ns for s in sheets], [s.read_bytes() for s in sheets]
    write_sprites(paths, order, tmp_path / "page", per_sheet=4)
    assert [s.stat().st_mtime_ns for s in sheets] == stamps  # reused, not written again
    write_sprites(paths, np.arange(len(paths)), tmp_path / "page", per_sheet=4)
    assert [s.read_bytes() for s in sheets] != first  # another order: written anew


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("report")
    # enough held-out images for the t-SNE (10 or more)
    overrides = [*tiny_folder_overrides(write_shapes(base / "shapes", per_class=40)), "report=true"]
    train(compose_cfg(base / "run", overrides))
    return base / "run"


def test_a_training_run_writes_its_report(trained_run):
    page = trained_run / "report.html"
    data = page_data(page)
    assert data["kind"] == "training" and data["k"] == 3 and data["answer"].startswith("The answer is")
    assert sum(c["size"] for c in data["clusters"]) == data["n"] == len(data["confidence"])
    assert data["metrics"]["test/acc"] == json.loads((trained_run / "metrics.json").read_text())["test/acc"]
    assert "train/loss" in data["curves"] and data["embedding"] is not None and data["confusion"]
    assert len(list((trained_run / "report_files").glob("sheet-*.jpg"))) == data["sprites"]["sheets"]
    assert not re.search(r"(src|href)=.https?:|url\(.?https?:", page.read_text())  # nothing fetched


@pytest.mark.skipif(find_browser() is None and not BROWSER_REQUIRED,
                    reason="no Chromium here (apt-get install chromium); CI installs it and runs this")
def test_the_report_renders_in_a_browser_without_script_errors(trained_run, tmp_path):
    state = rendered_state(trained_run / "report.html")
    assert state.get("data-rendered") == "1", state
    assert state["data-errors"] == "0"
    assert state["data-clusters"] == str(page_data(trained_run / "report.html")["k"])
    shot = screenshot(trained_run / "report.html", tmp_path / "report.png")
    assert Image.open(shot).size == (1280, 2000)
    print(f"screenshot for a person to look at: {shot}")


def test_predict_and_evaluate_write_their_report(trained_run, tmp_path):
    from mtl_unsup.config import DataConfig
    from mtl_unsup.evaluate import EvaluateConfig, evaluate

    folder = write_shapes(tmp_path / "labelled", per_class=6, seed=4)
    cfg = OmegaConf.structured(EvaluateConfig)
    cfg.data = OmegaConf.structured(DataConfig)
    cfg.ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    cfg.data.root, cfg.out_dir, cfg.progress, cfg.pictures = str(folder), str(tmp_path / "ev"), False, False
    result = evaluate(cfg)
    data = page_data(tmp_path / "ev" / "report.html")
    assert data["kind"] == "evaluate" and data["n"] == 18
    assert data["metrics"]["eval/acc"] == result["eval/acc"]
    assert data["confusion"] is not None and "seed: 0" in data["config"]

    from mtl_unsup.predict import PredictConfig, predict

    cfg = OmegaConf.structured(PredictConfig)
    cfg.data = OmegaConf.structured(DataConfig)
    cfg.ckpt, cfg.out_dir = str(trained_run / "checkpoints" / "last.ckpt"), str(tmp_path / "pr")
    cfg.progress = False
    cfg.data.root = str(write_shapes(tmp_path / "new", per_class=3, labelled=False))
    predict(cfg)
    data = page_data(tmp_path / "pr" / "report.html")
    assert data["kind"] == "predict" and data["n"] == 9 and data["labels"] is None and data["sprites"]


def test_a_hostile_name_or_a_nan_cannot_break_the_page(tmp_path):
    from mtl_unsup.html import write_report

    clusters, confidence = np.array([0, 1, 1]), np.array([0.9, float("nan"), 0.5])
    inputs = ReportInputs("t", "predict", clusters, confidence, labels=np.array([0, 1, 1]),
                          classes=["<!--<script", "b"], metrics={"x": float("inf")}, k=4)
    page = write_report(tmp_path, inputs)
    raw = page.read_text()
    embedded = re.search(r'id="report-data">(.*?)</script>', raw, re.S).group(1)
    assert "<!--<script" not in raw and "NaN" not in embedded and "Infinity" not in embedded
    data = page_data(page)
    assert data["classes"][0] == "<!--<script" and data["metrics"]["x"] is None
    assert data["confidence"][1] is None
    assert data["k"] == 4 and [c["size"] for c in data["clusters"]] == [1, 2, 0, 0]  # empty clusters shown
    if find_browser() is not None:
        assert rendered_state(page).get("data-errors") == "0"
