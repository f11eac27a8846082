import csv
import json
import re
import statistics
from pathlib import Path

import pytest
import yaml

from mtl_unsup.errors import UserError
from mtl_unsup.report import main, report


def fake_job(root: Path, num: int, overrides: list[str], metrics: dict | None) -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if metrics is not None:
        (job / "metrics.json").write_text(json.dumps(metrics))
    return job


def test_groups_by_swept_keys_other_than_seed_with_mean_std_and_count(tmp_path, capsys):
    accs = {("10", 0): 0.9, ("10", 1): 0.8, ("10", 2): 0.7, ("20", 0): 0.5, ("20", 1): 0.6}
    num = 0
    for (k, seed), acc in accs.items():
        fake_job(tmp_path, num, [f"cluster.k={k}", f"seed={seed}"], {"test/acc": acc, "test/nmi": 0.5})
        num += 1
    missing = fake_job(tmp_path, num, ["cluster.k=20", "seed=2"], None)
    main([str(tmp_path)])
    out = capsys.readouterr().out
    md = (tmp_path / "results.md").read_text()
    assert "| cluster.k | runs | test/acc | test/nmi |" in md and md.strip() in out
    assert f"| 10 | 3/3 | {0.8:.4f} ± {statistics.stdev([0.9, 0.8, 0.7]):.4f} |" in md
    assert f"| 20 | 2/3 | {0.55:.4f} ± {statistics.stdev([0.5, 0.6]):.4f} |" in md
    assert str(missing) in md and "failed or unfinished" in md
    rows = list(csv.DictReader((tmp_path / "results.csv").read_text().splitlines()))
    assert [r["cluster.k"] for r in rows] == ["10", "20"]
    assert float(rows[0]["test/acc_mean"]) == pytest.approx(0.8)
    assert rows[1]["runs_done"] == "2" and rows[1]["runs"] == "3"
    # the page: a plot of each metric against the swept key, the table, each job linked when it
    # has a report of its own, the failed job marked
    (tmp_path / "0" / "report.html").write_text("<html></html>")
    main([str(tmp_path)])
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") == 2 and "test/acc against cluster.k" in page and "test/nmi against" in page
    assert '<a href="0/report.html">0</a>' in page and '<a href="1/report.html">' not in page
    assert "failed or unfinished" in page and "0.8000 ± 0.1000" in page
    assert not re.search(r"(src|href)=.https?:", page)  # nothing fetched from a network


def test_an_empty_directory_is_an_error(tmp_path, capsys):
    with pytest.raises(UserError, match="No Hydra job"):
        report(tmp_path)
    with pytest.raises(SystemExit) as done:  # the command: the message alone, exit status 2
        main([str(tmp_path)])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: No Hydra job directories") and str(tmp_path) in err
