"""``report.html`` of a sweep (``mtl-report <sweep dir>``): each metric against each swept key (the
mean over the seeds, with their standard deviation as error bars; one line per setting of the other
keys), the results table, and a link to each job and its own report. The plots are inline SVG: the
page is one file that opens with no server and no network."""

from __future__ import annotations

import html
import io
import math
import os
import re
import statistics
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mtl_unsup.atomic import write_text

STYLE = """body { font: 14px/1.45 system-ui, sans-serif; margin: 24px; color: #222; }
table { border-collapse: collapse; margin: 8px 0 24px; } th, td { border: 1px solid #ddd; padding: 2px 8px; }
th { background: #f0f0f0; font-weight: 500; } .plots { display: flex; flex-wrap: wrap; gap: 16px; }
.plots svg { width: 460px; height: auto; border: 1px solid #e0e0e0; } .failed { color: #b00020; }"""


def as_number(value: str) -> float | None:
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def metric_plot(jobs: Sequence[Any], key: str, others: Sequence[str], metric: str) -> str:
    """An SVG of ``metric`` against ``key``: mean and standard deviation over the jobs that share a
    value of ``key`` and of every other swept key (one line per setting of the others)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = sorted({j.overrides.get(key, "") for j in jobs},
                    key=lambda v: (as_number(v) is None, as_number(v) or 0.0, v))
    numeric = all(as_number(v) is not None for v in values)
    position = {v: (as_number(v) if numeric else i) for i, v in enumerate(values)}
    lines: dict[tuple, dict[str, list[float]]] = {}
    for job in jobs:
        if job.metrics is None or metric not in job.metrics or math.isnan(job.metrics[metric]):
            continue
        setting = tuple((k, job.overrides.get(k, "")) for k in others)
        lines.setdefault(setting, {}).setdefault(job.overrides.get(key, ""), []).append(job.metrics[metric])
    fig, ax = plt.subplots(figsize=(5.2, 3.4), dpi=80)
    for setting, points in sorted(lines.items()):
        xs = sorted(points, key=position.get)
        means = [statistics.fmean(points[x]) for x in xs]
        spread = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
        label = ", ".join(f"{k}={v}" for k, v in setting) or metric
        ax.errorbar([position[x] for x in xs], means, yerr=spread, marker="o", capsize=3, label=label)
    if not numeric:
        ax.set_xticks(range(len(values)), values, rotation=30 if len(values) > 4 else 0)
    ax.set_xlabel(key)
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} against {key} (mean ± sd over seeds)", fontsize=10)
    if len(lines) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg")
    plt.close(fig)
    svg = buffer.getvalue()
    return re.sub(r"<metadata>.*?</metadata>", "", svg[svg.index("<svg"):], flags=re.S)


def table_html(rows: Sequence[dict[str, str]], columns: Sequence[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r[c]))}</td>" for c in columns) + "</tr>"
                   for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def job_list(sweep_dir: Path, jobs: Sequence[Any]) -> str:
    items = []
    for job in jobs:
        relative = os.path.relpath(job.path, sweep_dir)
        name, href = html.escape(relative), html.escape(urllib.parse.quote(f"{relative}/report.html"))
        settings = html.escape(" ".join(f"{k}={v}" for k, v in job.overrides.items()))
        link = f'<a href="{href}">{name}</a>' if (job.path / "report.html").is_file() else name
        failed = ' <span class="failed">no metrics.json (failed or unfinished)</span>'
        status = "" if job.metrics is not None else failed
        items.append(f"<li>{link}: {settings}{status}</li>")
    return "<ul>" + "".join(items) + "</ul>"


def write_sweep_report(sweep_dir: Path, jobs: Sequence[Any], keys: Sequence[str], metrics: Sequence[str],
                       rows: Sequence[dict[str, str]], columns: Sequence[str]) -> Path:
    """``sweep_dir/report.html``; returns its path."""
    sections = []
    for key in keys:
        others = [k for k in keys if k != key]
        plots = "".join(metric_plot(jobs, key, others, m) for m in metrics)
        sections.append(f"<h2>Against {html.escape(key)}</h2><div class=\"plots\">{plots}</div>")
    if not keys:
        sections.append("<p>No key differs between the jobs (other than the seed): nothing to plot.</p>")
    page = (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>sweep "
            f"{html.escape(sweep_dir.name)}</title><style>{STYLE}</style></head><body>"
            f"<h1>Sweep {html.escape(str(sweep_dir))}</h1><p>{len(jobs)} jobs; swept: "
            f"{html.escape(', '.join(keys) or 'nothing')}.</p>{''.join(sections)}<h2>Results</h2>"
            f"{table_html(rows, columns)}<h2>Jobs</h2>{job_list(sweep_dir, jobs)}</body></html>\n")
    return write_text(sweep_dir / "report.html", page)
