"""The peers benchmark (mtl_unsup.benchmarks.peers) on tiny generated folders: no lightly-train,
no network, no ../shared."""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from mtl_unsup.benchmarks import peer_lightly, peer_runs, peers
from mtl_unsup.stages import max_time_string

from .conftest import TINY, write_shapes


@pytest.fixture
def split_dir(tmp_path: Path) -> Path:
    root = tmp_path / "shapes-split"
    write_shapes(root / "train", per_class=12, seed=0)
    write_shapes(root / "test", per_class=6, seed=1)
    return root


def test_budget_arithmetic():
    assert peer_runs.budget_seconds(2) == 120
    assert peer_runs.budget_seconds(0.001) == 1
    assert max_time_string(120) == "00:00:02:00"
    assert max_time_string(90 * 60 + 7) == "00:01:30:07"
    assert max_time_string(86400 + 61) == "01:00:01:01"
    assert peer_lightly.steps_per_epoch(2000, 128) == 15  # the last partial batch is dropped
    assert peer_lightly.steps_per_epoch(50, 128) == 1
    # 15 steps of 1 s: 8 whole epochs in 2 minutes; never fewer than one
    assert peer_lightly.estimate_epochs(120, 2000, 128, 1.0) == 8
    assert peer_lightly.estimate_epochs(5, 2000, 128, 1.0) == 1
    # the probe: a tenth of the budget within 10-60 s, or two epochs and a step
    assert peer_lightly.probe_limits(120, 2000) == {"max_time": "00:00:00:12", "max_steps": 31}
    assert peer_lightly.probe_limits(30, 2000)["max_time"] == "00:00:00:10"
    assert peer_lightly.probe_limits(3600, 50000)["max_time"] == "00:00:01:00"


def test_probe_timing_leaves_out_the_warm_up_step(tmp_path: Path):
    log = tmp_path / "metrics.jsonl"
    rows = [{"lr": 0.1, "step": 0}, {"train_loss": 6.0, "profiling/batch_time": 9.0, "step": 0}]
    rows += [{"train_loss": 6.0, "profiling/batch_time": b, "profiling/data_time": 0.1, "step": i}
             for i, b in enumerate([1.0, 1.2, 0.9], start=1)]
    log.write_text("\n".join(json.dumps(r) for r in rows))
    steps = peer_lightly.read_steps(log)
    assert len(steps) == 4
    assert peer_lightly.probe_step_seconds(steps) == pytest.approx(1.133333)  # the mean of the last three
    assert peer_lightly.read_steps(tmp_path / "absent.jsonl") == []


def test_split_reads_train_and_test_with_the_same_classes(split_dir: Path):
    split = peer_runs.find_split(split_dir)
    assert (split.n_train, split.n_test, split.classes) == (36, 18, ("class_0", "class_1", "class_2"))
    paths, labels = peer_runs.labelled_images(split.test, split.classes)
    assert len(paths) == 18 and sorted(set(labels.tolist())) == [0, 1, 2]
    assert all(p.parent.name == split.classes[y] for p, y in zip(paths, labels, strict=True))
    assert peer_runs.auto_image_size(split.train) == 16  # small images keep their size
    sent = json.loads(json.dumps(peer_runs.split_to_dict(split)))  # to the lightly worker
    assert peer_runs.split_from_dict(sent) == split
    command = peers.ours_command(split, "experiment=cifar10 seed=3", 3, 120, 0, Path("run"))
    # fixed settings first, so --ours can override them; the budget last
    assert command.index("data.val_fraction=0") < command.index("seed=3")
    assert "trainer.max_time=00:00:02:00" in command


@pytest.mark.parametrize("layout, message", [
    (None, "no such folder"),
    (["train"], "no test/ subfolder"),
    ([], "no train/ or test/ subfolder"),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path: Path, capsys, layout, message):
    root = tmp_path / "data"
    for sub in layout or []:
        write_shapes(root / sub, per_class=2)
    if layout == []:
        root.mkdir()
    with pytest.raises(SystemExit) as stop:
        peers.main(["--data", str(root), "--minutes", "1", "--out", str(tmp_path / "out")])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err


def test_unknown_skip_is_refused(split_dir: Path, capsys):
    with pytest.raises(SystemExit):
        peers.main(["--data", str(split_dir), "--minutes", "1", "--skip", "lightly,simclr"])
    assert "--skip simclr" in capsys.readouterr().err


def test_missing_lightly_train_is_a_skipped_row(split_dir: Path, tmp_path: Path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lightly_train" else real(name, *a))
    row = peer_lightly.lightly_row(peer_runs.find_split(split_dir), tmp_path / "lightly", 60, 3, 16, 0, 1)
    assert row.acc is None and row.minutes is None
    assert row.notes.startswith("skipped: lightly-train is not installed")
    assert not (tmp_path / "lightly").exists()  # nothing was started


def test_report_has_the_table_commands_date_commit_and_cores(split_dir: Path):
    split = peer_runs.find_split(split_dir)
    rows = [peer_runs.Row("lightly-train SimCLR", notes="skipped: lightly-train is not installed"),
            peer_runs.Row("ours", 0.5, 0.25, 2.04, "a | b", ["python -m mtl_unsup.train x=1"])]
    when = datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)
    text = peers.report(split, rows, 2, 3, 2, ["--data", "d", "--minutes", "2"], "abc1234", when)
    assert "| method | held-out ACC | NMI | minutes used | notes |" in text
    assert "| lightly-train SimCLR | - | - | - | skipped: lightly-train is not installed |" in text
    assert "| ours | 0.500 | 0.250 | 2.0 | a \\| b |" in text  # a pipe in the notes keeps the table
    assert "2026-01-02 03:04 UTC at commit abc1234" in text and "cores" in text
    assert "python -m mtl_unsup.benchmarks.peers --data d --minutes 2" in text
    assert "    python -m mtl_unsup.train x=1" in text


def test_pixel_rows_without_umap(split_dir: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # as if umap-learn were not installed
    rows = peers.pixel_rows(peer_runs.find_split(split_dir), 3, 16, 0)
    assert [r.method for r in rows] == ["k-means on pixels", "UMAP + k-means on pixels"]
    assert 0 <= rows[0].acc <= 1 and rows[0].minutes is not None
    assert rows[1].acc is None and "umap-learn is not installed" in rows[1].notes


def test_ours_runs_end_to_end_within_a_tiny_budget(split_dir: Path, tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # run directories go under ./outputs
    ours = " ".join([*TINY, "protocol=single", "data.channels=1", "data.image_size=16", "data.mean=[0.3]",
                     "data.std=[0.4]"])
    # (a minute: the run plans its 2 epochs within it, and a loaded machine's start-up fits too)
    peers.main(["--data", str(split_dir), "--minutes", "1", "--skip", "lightly,umap", "--threads", "1",
                "--ours", ours, "--out", "bench"])
    text = (tmp_path / "bench" / "shapes-split.md").read_text()
    ours_line = next(line for line in text.splitlines() if line.startswith("| ours |"))
    acc = float(ours_line.split("|")[2])
    assert 0 <= acc <= 1, ours_line
    assert "trainer.max_time=00:00:01:00" in text and "skipped (--skip)" in text
    assert "| ours |" in text and "CPU " in ours_line  # the CPU the child got, beside its wall time


def test_lightly_notes_say_whether_the_budget_stopped_it():
    result = {"epochs": 8, "n_train": 2000, "steps_done": 120, "step_seconds": 1.0, "probe_seconds": 20,
              "probe_steps": 31,
              "train_seconds": 130, "pretrain_args": {"transform_args": {"image_size": [32, 32]}}}
    assert "finished its epochs after 120 of 120 steps (2.2 min" in peer_lightly.lightly_notes(result, 120)
    result["train_seconds"] = 40
    assert "finished its epochs early" in peer_lightly.lightly_notes(result, 120)
    result["steps_done"] = 97
    notes = peer_lightly.lightly_notes(result, 120)
    assert "stopped by max_time after 97 of 120 steps" in notes and "00:00:02:00" in notes


def test_embeddings_are_clustered_on_train_and_scored_on_test(tmp_path: Path):
    rng = np.random.default_rng(0)
    centres = np.eye(4, dtype=np.float32)[:3] * 5

    def blobs(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = np.repeat(np.arange(3), n)
        return (centres[labels] + 0.1 * rng.standard_normal((3 * n, 4))).astype(np.float32), labels

    (train, train_labels), (test, test_labels) = blobs(20), blobs(10)
    np.savez(tmp_path / "e.npz", train=train, train_labels=train_labels, test=test,
             test_labels=(test_labels + 1) % 3)  # cluster ids need not match class ids
    scores = peer_lightly.cluster_embeddings(tmp_path / "e.npz", 3, 0)
    assert scores["acc"] == pytest.approx(1.0) and scores["nmi"] == pytest.approx(1.0)


def test_a_staged_run_is_described_stage_by_stage(tmp_path):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "trainer: {max_epochs: 80}\nstages: {pretext: {epochs: 3}, scan: {epochs: 2}}\n")
    for name, rows in (("pretext", 3), ("scan", 1)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "epochs.jsonl").write_text("{}\n" * rows)
    metrics = {"pretext/test/kmeans_acc": 0.4, "scan/test/acc": 0.45, "scan/test/kmeans_acc": 0.3}
    assert peers.epochs_run(tmp_path, metrics) == ("pretext 3 of 3 epochs, ACC 0.400; "
                                                   "scan 1 of 2 epochs, ACC 0.450")
    # a stage sized by images: the epochs it was given for the training set, not its cap
    (tmp_path / ".hydra" / "config.yaml").write_text(
        "trainer: {max_epochs: 80}\nstages: {pretext: {epochs: 500, images: 250}, scan: {epochs: 2}}\n")
    assert peers.epochs_run(tmp_path, metrics, num_train=100).startswith("pretext 3 of 3 epochs")


def test_a_skipped_method_keeps_its_row_measured_with_the_same_budget(split_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    split = peer_runs.find_split(split_dir)
    when = datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)
    earlier = [("lightly", peer_runs.Row("lightly-train SimCLR", 0.5, 0.4, 90.0, "n", ["lightly cmd"])),
               ("ours", peer_runs.Row("ours", 0.6, 0.5, 60.0, "m", ["ours cmd"]))]
    (tmp_path / "bench").mkdir()
    settings = {"minutes": 2, "seed": 0, "threads": 1, "k": 3, "image_size": 16, "ours": peers.DEFAULT_OURS}
    peers.write_rows(peers.rows_file(tmp_path / "bench", split), earlier, settings, "abc1234", when)
    peers.main(["--data", str(split_dir), "--minutes", "2", "--skip", "lightly,ours", "--threads", "1",
                "--out", "bench"])
    text = (tmp_path / "bench" / "shapes-split.md").read_text()
    lightly = next(line for line in text.splitlines() if line.startswith("| lightly-train SimCLR |"))
    assert "| 0.500 | 0.400 | 90.0 |" in lightly
    assert "kept from the run of 2026-01-02 03:04 UTC at commit abc1234" in lightly
    assert "    ours cmd" in text and "| k-means on pixels |" in text
    rows = json.loads((tmp_path / "bench" / "shapes-split.json").read_text())["rows"]
    assert [r["source"] for r in rows] == ["lightly", "umap", "umap", "ours"]
    assert rows[0]["measured"] == "2026-01-02 03:04 UTC at commit abc1234"  # still the first measurement
    # another budget keeps nothing: the rows would not be comparable
    peers.main(["--data", str(split_dir), "--minutes", "3", "--skip", "lightly,ours,umap", "--threads", "1",
                "--out", "bench"])
    text = (tmp_path / "bench" / "shapes-split.md").read_text()
    assert text.count("skipped (--skip)") == 3


def test_our_rows_made_with_other_overrides_stay_in_the_table(split_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    split = peer_runs.find_split(split_dir)
    when = datetime(2026, 1, 2, 3, 4, tzinfo=timezone.utc)
    settings = {"minutes": 2, "seed": 0, "threads": 1, "k": 3, "image_size": 16, "ours": "experiment=a"}
    earlier = [("ours", peer_runs.Row("ours", 0.6, 0.5, 60.0, "m", ["ours a"]))]
    (tmp_path / "bench").mkdir()
    peers.write_rows(peers.rows_file(tmp_path / "bench", split), earlier, settings, "abc1234", when)
    argv = ["--data", str(split_dir), "--minutes", "2", "--skip", "lightly,umap,ours", "--threads", "1",
            "--out", "bench", "--ours", "protocol=folder"]
    for _ in range(2):  # kept again by the next run, under its own overrides
        peers.main(argv)
        rows = json.loads((tmp_path / "bench" / "shapes-split.json").read_text())["rows"]
        assert [r["source"] for r in rows] == ["lightly", "umap", "ours", "ours:experiment=a"]
        assert rows[-1]["method"] == "ours, `experiment=a`" and rows[-1]["acc"] == 0.6
    text = (tmp_path / "bench" / "shapes-split.md").read_text()
    assert "| ours, `experiment=a` | 0.600 | 0.500 | 60.0 |" in text and "    ours a" in text
    # another budget keeps none of them
    peers.main([*argv[:3], "3", *argv[4:]])
    assert "experiment=a" not in (tmp_path / "bench" / "shapes-split.md").read_text()
