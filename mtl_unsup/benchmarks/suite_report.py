"""``experiments/suite/README.md`` and its picture, from the suite's rows (:mod:`mtl_unsup.benchmarks.suite`).

Ours is a mean ± sd over seeds, the peer one run; the criteria of the answer are compared on the
candidates every one of our runs recorded, each criterion's pick looked up as the run would have
made it (labels read only to score the picks here).
"""

from __future__ import annotations

import shlex
import statistics
from collections import defaultdict
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

from mtl_unsup.atomic import write_text
from mtl_unsup.config import CHOOSE_CRITERIA

PEER = "peer"
PEER_NAME = "lightly-train SimCLR + k-means"


def mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def cells(rows: list[dict]) -> dict[tuple[str, float], dict[str, list[dict]]]:
    """(folder, minutes) -> method -> its rows that have a score."""
    out: dict[tuple[str, float], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r.get("acc") is not None:
            out[(r["folder"], float(r["budget"]))][r["method"]].append(r)
    return out


def results_table(rows: list[dict]) -> tuple[list[str], dict[str, list[float]]]:
    """The per-cell table, and each of our settings' lead over the peer per cell."""
    lines = ["| folder | budget | method | seeds | held-out ACC | NMI | minutes | lead over the peer (ACC) |",
             "|---|---|---|---|---|---|---|---|"]
    leads: dict[str, list[float]] = defaultdict(list)
    for (folder, minutes), methods in sorted(cells(rows).items()):
        peer = methods.get(PEER, [])
        peer_acc = peer[0]["acc"] if peer else None
        for method, runs in sorted(methods.items(), key=lambda kv: kv[0] != PEER):
            accs = [r["acc"] for r in runs]
            nmis = [r["nmi"] for r in runs if r.get("nmi") is not None]
            lead = "-"
            if method != PEER and peer_acc is not None:
                lead_value = statistics.mean(accs) - peer_acc
                leads[method].append(lead_value)
                lead = f"{lead_value:+.3f}"
            name = PEER_NAME if method == PEER else f"ours, `{method}`"
            seeds = len(runs) if method != PEER else "-"
            spent = statistics.mean(r["minutes"] for r in runs)
            lines.append(f"| {folder} | {minutes:g} min | {name} | {seeds} | {mean_sd(accs)} "
                         f"| {mean_sd(nmis)} | {spent:.1f} | {lead} |")
    return lines, leads


def criterion_pick(candidates: list[dict], criterion: str) -> dict:
    if criterion == "last":
        last = candidates[-1]["stage"]
        return next(c for c in candidates if c["stage"] == last and c["stage_answer"])
    stages = list(dict.fromkeys(c["stage"] for c in candidates))
    return max(candidates, key=lambda c: (c["criteria"][criterion], stages.index(c["stage"]),
                                          c["name"] != "kmeans"))


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    if len(x) < 3:
        return None
    from scipy.stats import spearmanr

    value = spearmanr(x, y).statistic
    return None if value != value else float(value)  # NaN: a constant column


def criteria_table(rows: list[dict]) -> list[str]:
    """Per criterion: the picked candidate's ACC against the best and worst of each run, and
    the rank correlation of criterion and ACC, averaged over our runs."""
    runs = [r for r in rows if r["method"] != PEER and (r.get("candidates") or {}).get("candidates")]
    lines = ["| criterion | runs | ACC of its pick (mean) | below the best (mean / worst case) | "
             "above the worst (mean) | rank correlation with ACC (mean) |", "|---|---|---|---|---|---|"]
    for criterion in CHOOSE_CRITERIA:
        picks, gaps, ups, rhos = [], [], [], []
        for r in runs:
            cands = [c for c in r["candidates"]["candidates"] if "test/acc" in c["scores_read_with_labels"]]
            if not cands:
                continue
            accs = [c["scores_read_with_labels"]["test/acc"] for c in cands]
            pick = criterion_pick(cands, criterion)["scores_read_with_labels"]["test/acc"]
            picks.append(pick)
            gaps.append(max(accs) - pick)
            ups.append(pick - min(accs))
            if criterion != "last":
                rho = spearman([c["criteria"][criterion] for c in cands], accs)
                if rho is not None:
                    rhos.append(rho)
        if picks:
            lines.append(f"| {criterion} | {len(picks)} | {statistics.mean(picks):.3f} | "
                         f"{statistics.mean(gaps):.3f} / {max(gaps):.3f} | {statistics.mean(ups):.3f} | "
                         + (f"{statistics.mean(rhos):+.2f} |" if rhos else "- |"))
    return lines


def draw(rows: list[dict], path: Path) -> None:
    """Held-out ACC against minutes, a panel per folder: ours (mean, sd bars) and the peer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = cells(rows)
    folders = sorted({f for f, _ in table})
    if not folders:
        return
    methods = sorted({m for cell in table.values() for m in cell}, key=lambda m: (m != PEER, m))
    colours = {m: f"C{i}" for i, m in enumerate(methods)}  # one colour per method in every panel
    fig, axes = plt.subplots(1, len(folders), figsize=(4.2 * len(folders), 3.4), squeeze=False)
    for ax, folder in zip(axes[0], folders, strict=True):
        series: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
        for (f, _), methods in sorted(table.items()):
            if f != folder:
                continue
            for method, runs in methods.items():
                accs = [r["acc"] for r in runs]
                minutes = statistics.mean(r["minutes"] for r in runs)
                sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
                series[method].append((minutes, statistics.mean(accs), sd))
        for method, points in sorted(series.items()):
            xs, ys, sds = zip(*sorted(points), strict=True)
            label = PEER_NAME if method == PEER else f"ours: {method}"
            ax.errorbar(xs, ys, yerr=sds, marker="o" if method != PEER else "s", capsize=3, label=label,
                        linestyle="--" if method == PEER else "-", color=colours[method])
        ax.set_title(folder)
        ax.set_xlabel("minutes (wall, 2 cores)")
        ax.set_ylabel("held-out ACC")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(rows: list[dict], out: Path, argv: Sequence[str]) -> Path:
    """``README.md`` and ``acc_vs_minutes.png`` in ``out``; returns the README's path."""
    table, leads = results_table(rows)
    lines = ["# The suite: ours against the peer, folders x budgets x seeds", "",
             "Written by `python -m mtl_unsup.benchmarks.suite` from `rows.json` (every run's row, its "
             "plan, its candidates); the command that wrote it last:", "",
             f"    python -m mtl_unsup.benchmarks.suite {shlex.join(argv)}", "",
             f"Written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC. Each run alone on the machine, "
             "one after the other, `trainer.max_time` its budget (ours) or the peer's own budget.", "",
             "## Held-out ACC per folder and budget", "", *table, "",
             "## Each of our settings over the suite", "",
             "| setting | cells | mean lead over the peer | smallest lead |", "|---|---|---|---|"]
    for method, values in sorted(leads.items(), key=lambda kv: -statistics.mean(kv[1])):
        lines.append(f"| `{method}` | {len(values)} | {statistics.mean(values):+.3f} | {min(values):+.3f} |")
    lines += ["", "## How the answer's criterion would have chosen", "",
              "Over every candidate our runs recorded (each stage's heads and k-means, `candidates.json`): "
              "the ACC of the candidate each criterion picks, how far below the best candidate and above "
              "the worst it is, and the rank correlation between the criterion and ACC.", "",
              *criteria_table(rows), "", "![held-out ACC against minutes](acc_vs_minutes.png)", ""]
    draw(rows, out / "acc_vs_minutes.png")
    path = out / "README.md"
    write_text(path, "\n".join(lines))
    return path
