"""Results table of a sweep: ``python -m mtl_unsup.report <sweep dir>`` (or ``mtl-report``).

Reads every job's ``metrics.json`` and ``.hydra/overrides.yaml`` below the sweep directory,
groups the jobs by the swept keys other than the seed, and writes mean, standard deviation and
number of runs of each metric as ``results.md`` and ``results.csv`` in the sweep directory.
Jobs without ``metrics.json`` (failed or unfinished) are listed, never silently dropped. It also
writes ``report.html``: each metric against each swept key as plots, the table, and a link to each
job's own report (see :mod:`mtl_unsup.html.sweep`).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mtl_unsup.cli import exit_2_on_user_errors
from mtl_unsup.errors import UserError

DEFAULT_METRICS = ("val/silhouette", "test/acc", "test/nmi", "test/ari", "test/kmeans_acc", "train/acc")
IGNORED_KEYS = ("seed", "hydra.", "trainer.enable_progress_bar", "print_config")


@dataclass
class Job:
    path: Path
    overrides: dict[str, str]
    metrics: dict[str, float] | None


@dataclass
class Group:
    key: tuple[tuple[str, str], ...]
    jobs: list[Job] = field(default_factory=list)


def parse_override(text: str) -> tuple[str, str]:
    key, _, value = text.partition("=")
    return key.lstrip("+~"), value


def find_jobs(sweep_dir: Path) -> list[Job]:
    """Every job directory (one holding ``.hydra/overrides.yaml``) below ``sweep_dir``."""
    jobs = []
    for overrides_file in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        job_dir = overrides_file.parent.parent
        overrides = dict(parse_override(o) for o in yaml.safe_load(overrides_file.read_text()) or [])
        metrics_file = job_dir / "metrics.json"
        metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else None
        jobs.append(Job(job_dir, overrides, metrics))
    return jobs


def swept_keys(jobs: list[Job]) -> list[str]:
    """Override keys whose value differs between jobs, the seed and Hydra's own excluded."""
    keys = sorted({k for job in jobs for k in job.overrides})
    varying = [k for k in keys if len({job.overrides.get(k) for job in jobs}) > 1]
    return [k for k in varying if not k.startswith(IGNORED_KEYS)]


def group_jobs(jobs: list[Job], keys: list[str]) -> list[Group]:
    groups: dict[tuple, Group] = {}
    for job in jobs:
        key = tuple((k, job.overrides.get(k, "")) for k in keys)
        groups.setdefault(key, Group(key)).jobs.append(job)
    return list(groups.values())


def summarise(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return mean, std


def build_rows(groups: list[Group], keys: list[str], metrics: list[str]) -> list[dict[str, str]]:
    rows = []
    for group in groups:
        done = [j for j in group.jobs if j.metrics is not None]
        row = {k: v for k, v in group.key}
        row["runs"] = f"{len(done)}/{len(group.jobs)}"
        for metric in metrics:
            values = [j.metrics[metric] for j in done if metric in j.metrics
                      and not math.isnan(j.metrics[metric])]
            row[metric] = "-" if not values else "{:.4f} ± {:.4f}".format(*summarise(values))
        rows.append(row)
    return rows


def to_markdown(rows: list[dict[str, str]], columns: list[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report(sweep_dir: str | Path, metrics: list[str] | None = None) -> str:
    """Write ``results.md`` and ``results.csv`` into ``sweep_dir``; returns the Markdown."""
    sweep_dir = Path(sweep_dir)
    jobs = find_jobs(sweep_dir)
    if not jobs:
        raise UserError(f"No Hydra job directories (with .hydra/overrides.yaml) below {sweep_dir}. "
                        "Name a multirun directory, e.g. outputs/multirun/<time>.")
    if metrics is None:
        present = {m for j in jobs if j.metrics for m in j.metrics}
        metrics = [m for m in DEFAULT_METRICS if m in present]
    keys = swept_keys(jobs)
    groups = group_jobs(jobs, keys)
    rows = build_rows(groups, keys, metrics)
    columns = [*keys, "runs", *metrics]
    text = to_markdown(rows, columns)
    missing = [j for j in jobs if j.metrics is None]
    if missing:
        text += "\n\nJobs without metrics.json (failed or unfinished):\n"
        text += "\n".join(f"- {j.path} ({' '.join(f'{k}={v}' for k, v in j.overrides.items())})"
                          for j in missing)
    (sweep_dir / "results.md").write_text(text + "\n")
    with open(sweep_dir / "results.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*keys, "runs_done", "runs", *[f"{m}_{s}" for m in metrics
                                                         for s in ("mean", "std")]])
        for group in groups:
            done = [j for j in group.jobs if j.metrics is not None]
            stats = []
            for m in metrics:
                values = [j.metrics[m] for j in done if m in j.metrics]
                stats += list(summarise(values)) if values else ["", ""]
            writer.writerow([v for _, v in group.key] + [len(done), len(group.jobs), *stats])
    from mtl_unsup.html.sweep import write_sweep_report

    write_sweep_report(sweep_dir, jobs, keys, metrics, rows, columns)
    return text


@exit_2_on_user_errors
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", help="a multirun directory, e.g. outputs/multirun/<time>")
    parser.add_argument("--metrics", nargs="+", help=f"metric keys (default: {DEFAULT_METRICS})")
    args = parser.parse_args(argv)
    print(report(args.sweep_dir, args.metrics))
    names = ("results.md", "results.csv", "report.html")
    written = ", ".join(str(Path(args.sweep_dir) / name) for name in names)
    print(f"\nwritten: {written}")


if __name__ == "__main__":
    main()
