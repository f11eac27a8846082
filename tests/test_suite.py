"""The suite: which runs it asks for, rows kept between sittings, and the report it writes (each run
replaced by a made-up row: the real ones take hours on real folders)."""

import json

import pytest

from mtl_unsup.benchmarks import suite
from mtl_unsup.benchmarks.peer_runs import InputError
from mtl_unsup.benchmarks.suite_report import criterion_pick

from .conftest import write_shapes


def candidates(accs: dict[str, float], silhouettes: dict[str, float]) -> dict:
    rows = []
    for key, acc in accs.items():
        stage, name = key.split("/")
        rows.append({"stage": stage, "name": name, "stage_answer": name != "kmeans",
                     "criteria": {"silhouette": silhouettes[key], "silhouette_last": silhouettes[key],
                                  "consensus": acc / 2},
                     "scores_read_with_labels": {"test/acc": acc}})
    return {"criterion": "silhouette", "candidates": rows}


@pytest.fixture
def data(tmp_path):
    for folder in ("a", "b"):
        for split in ("train", "test"):
            write_shapes(tmp_path / "data" / folder / split, per_class=3)
    return tmp_path / "data"


def test_the_suite_measures_what_is_missing_and_reports_means_leads_and_criteria(data, tmp_path, monkeypatch):
    measured = []

    def fake(folder, minutes, method, seed, args, run_root):
        measured.append((folder, minutes, method, seed))
        if method == suite.PEER:
            return {"folder": folder, "budget": minutes, "method": method, "seed": seed, "acc": 0.40,
                    "nmi": 0.3, "minutes": minutes + 0.5}
        acc = 0.50 + 0.02 * seed
        return {"folder": folder, "budget": minutes, "method": method, "seed": seed, "acc": acc, "nmi": 0.4,
                "minutes": minutes,
                "candidates": candidates({"pretext/kmeans": 0.55, "scan/scan": acc},
                                         {"pretext/kmeans": 0.08, "scan/scan": 0.05})}

    monkeypatch.setattr(suite, "measure", fake)
    out = tmp_path / "suite"
    argv = ["--root", str(data), "--folders", "a", "b", "--budgets", "10", "30", "--out", str(out)]
    suite.main(argv)
    # per folder: the peer and 2 seeds at 10 minutes, the peer and 1 seed at 30
    assert len(measured) == 2 * (1 + 2 + 1 + 1)
    assert ("a", 10.0, suite.PEER, 0) in measured and ("b", 30.0, "protocol=folder", 0) in measured
    rows = json.loads((out / "rows.json").read_text())
    assert len(rows) == 10
    measured.clear()
    suite.main(argv)  # a second sitting measures nothing already there
    assert measured == []
    text = (out / "README.md").read_text()
    assert "| a | 10 min | ours, `protocol=folder` | 2 | 0.510 ± 0.014 |" in text
    assert "+0.110" in text  # the mean of 0.50 and 0.52 against the peer's 0.40
    # silhouette picks the pretext's k-means (0.55) in every run; last picks the SCAN head
    assert "| silhouette | 6 | 0.550 | 0.000 / 0.000 |" in text
    assert (out / "acc_vs_minutes.png").stat().st_size > 0


def test_criterion_picks_break_ties_toward_the_later_stage_and_last_is_the_last_answer():
    cands = candidates({"pretext/kmeans": 0.5, "scan/scan": 0.6, "scan/kmeans": 0.4},
                       {"pretext/kmeans": 0.1, "scan/scan": 0.1, "scan/kmeans": 0.1})["candidates"]
    assert criterion_pick(cands, "silhouette")["name"] == "scan"
    assert criterion_pick(cands, "last")["name"] == "scan"


def test_a_missing_folder_is_named_before_anything_runs(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        suite.main(["--root", str(tmp_path), "--folders", "nowhere", "--out", str(tmp_path / "o")])
    assert stop.value.code == 2
    assert "nowhere: no such folder" in capsys.readouterr().err
    with pytest.raises(InputError, match="--seeds at least 1"):
        suite.parse_args(["--root", str(tmp_path), "--seeds", "0"])


def test_a_measured_row_keeps_the_setting_apart_from_the_rows_own_name(data, tmp_path, monkeypatch):
    from mtl_unsup.benchmarks.peer_runs import Row

    monkeypatch.setattr(suite, "lightly_row", lambda *a, **k: Row("lightly-train SimCLR", 0.4, 0.3, 10.2))
    monkeypatch.setattr(suite, "ours_row", lambda *a, **k: Row("ours, `protocol=single`", 0.5, 0.4, 9.8))
    args = suite.parse_args(["--root", str(data), "--out", str(tmp_path / "o"), "--folders", "a"])
    args.commit = "abc"
    peer = suite.measure("a", 10.0, suite.PEER, 0, args, tmp_path / "runs")
    ours = suite.measure("a", 10.0, "protocol=single", 1, args, tmp_path / "runs")
    assert (peer["method"], peer["name"], peer["budget"], peer["minutes"]) == ("peer", "lightly-train SimCLR",
                                                                               10.0, 10.2)
    assert (ours["method"], ours["seed"], ours["minutes"]) == ("protocol=single", 1, 9.8)
    assert (tmp_path / "runs" / "a" / "10min").is_dir()
    suite.measure("a", 10.0, "protocol=single", 1, args, tmp_path / "runs")  # again: a folder of its own
    assert sorted(p.name for p in (tmp_path / "runs" / "a" / "10min").iterdir() if p.name != "peer") == [
        "ours-" + __import__("hashlib").sha1(b"protocol=single").hexdigest()[:8] + "-seed1",
        "ours-" + __import__("hashlib").sha1(b"protocol=single").hexdigest()[:8] + "-seed1-2"]
