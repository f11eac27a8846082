"""Write ``report.html``: the page, its style and script inlined, its data embedded as JSON, and
its thumbnails in ``report_files/`` beside it. It opens from the file, with no server and no
network."""

from __future__ import annotations

import html
import json
import math
from importlib.resources import files
from pathlib import Path
from typing import Any

from mtl_unsup.atomic import write_text
from mtl_unsup.html.content import ReportInputs, display_order, report_content
from mtl_unsup.html.thumbs import write_sprites

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>
{css}
:root {{ --thumb: {thumb}px; }}
</style>
</head>
<body>
<header><h1>{title}</h1>
<nav><a href="#summary">summary</a><a href="#clusters">clusters</a><a href="#confusion">confusion</a>
<a href="#embedding">embedding</a><a href="#curves">curves</a><a href="#k-selection">k</a></nav></header>
<main id="report"><noscript>This report draws its clusters with JavaScript: allow scripts for this
file.</noscript></main>
<script type="application/json" id="report-data">{data}</script>
<script>
{js}
</script>
</body>
</html>
"""


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite number replaced by None (JSON's null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    return value


def asset(name: str) -> str:
    return (files("mtl_unsup.html") / "assets" / name).read_text(encoding="utf-8")


def write_report(out_dir: Path, inputs: ReportInputs, thumb: int = 48) -> Path:
    """``out_dir/report.html`` (and its thumbnails); returns its path. Written to a temporary
    file and renamed into place, so a reader never sees half a page."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sprites = None
    if inputs.paths is not None and len(inputs.paths):
        order = display_order(inputs.clusters, inputs.confidence)
        sprites = write_sprites(inputs.paths, order, out_dir, size=thumb).as_json()
    content = report_content(inputs, sprites)
    # no NaN (JSON.parse would refuse the whole page) and no "<" (the page's HTML parser would
    # read a file name such as "<!--<script" as markup)
    data = json.dumps(finite(content), separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    page = PAGE.format(title=html.escape(inputs.title), css=asset("report.css"), js=asset("report.js"),
                       data=data, thumb=thumb)
    return write_text(out_dir / "report.html", page)
