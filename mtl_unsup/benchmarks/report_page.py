"""Benchmark: how heavy ``report.html`` is for a big run, measured in a real headless Chromium; and
the README's screenshot of a run's report.

    python -m mtl_unsup.benchmarks.report_page --images /tmp/data/cifar10-jpg/train --k 10
    python -m mtl_unsup.benchmarks.report_page --screenshot outputs/<run> --out docs/report.png

The first form writes the report of every image below ``--images`` (50,000 for CIFAR-10's
``train/``) into ``--page-dir``. The clusters are synthetic (each image's class, 30% of them moved
to a random cluster, random confidences, a random 3,000-point embedding): the page's weight depends
on the number of images and clusters, not on how good they are. It prints, side by side: the
seconds to write the thumbnails and the page (and to write it again, reusing the thumbnails), the
page's and the thumbnails' sizes, and in Chromium the seconds to open a blank page and the report
(``--dump-dom`` after the script has drawn every cluster), how many thumbnail sheets the browser
read to show the top of the page and to show a 30,000-pixel stretch of it (a reader scrolling), out
of all the sheets. A sheet read is one whose access time moved (the sheets' access times are set
back before each opening).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from mtl_unsup.html import ReportInputs, write_report
from mtl_unsup.html.browser import rendered_state, run_browser, screenshot


def synthetic_inputs(images: Path, k: int, seed: int) -> ReportInputs:
    from mtl_unsup.data.images import scan_folder

    found = scan_folder(images)
    rng = np.random.default_rng(seed)
    labels = np.asarray(found.labels) if found.has_labels else rng.integers(0, k, len(found))
    clusters = labels % k
    moved = rng.random(len(clusters)) < 0.3
    clusters[moved] = rng.integers(0, k, int(moved.sum()))
    sample = rng.permutation(len(clusters))[:3000]
    embedding = (np.sort(sample), rng.standard_normal((len(sample), 2)))
    return ReportInputs(f"{len(found)} images of {images}", "benchmark", clusters, rng.random(len(clusters)),
                        found.paths, labels, found.classes, embedding, metrics={"test/acc": 0.7},
                        answer="Synthetic clusters, to measure the page.")


def set_back(sheets: list[Path]) -> None:
    """Access times before modification times: the next read moves them (relatime)."""
    for sheet in sheets:
        stat = sheet.stat()
        os.utime(sheet, ns=(stat.st_mtime_ns - 10**9, stat.st_mtime_ns))


def read_since(sheets: list[Path]) -> int:
    return sum(s.stat().st_atime_ns > s.stat().st_mtime_ns for s in sheets)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def measure(args: argparse.Namespace) -> None:
    inputs = synthetic_inputs(args.images, args.k, args.seed)
    page, first = timed(write_report, args.page_dir, inputs)
    _, again = timed(write_report, args.page_dir, inputs)
    sheets = sorted((args.page_dir / "report_files").glob("sheet-*.jpg"))
    blank = args.page_dir / "blank.html"
    blank.write_text("<!DOCTYPE html><html><body data-rendered=\"1\"></body></html>")
    _, blank_s = timed(rendered_state, blank)
    set_back(sheets)
    state, open_s = timed(rendered_state, page)
    at_top = read_since(sheets)
    set_back(sheets)
    tall = ["--window-size=1280,30000", "--virtual-time-budget=10000",
            f"--screenshot={args.page_dir / 'tall.png'}", page.resolve().as_uri()]
    _, scroll_s = timed(run_browser, tall, 600)
    scrolled = read_since(sheets)
    mib = 2**20
    rows = [
        ("images", f"{inputs.clusters.size}"), ("clusters", f"{args.k}"),
        ("write: thumbnails + page (s)", f"{first:.1f}"),
        ("write again, thumbnails reused (s)", f"{again:.1f}"),
        ("report.html (MiB)", f"{page.stat().st_size / mib:.1f}"),
        ("thumbnail sheets", f"{len(sheets)}, {sum(s.stat().st_size for s in sheets) / mib:.1f} MiB"),
        ("Chromium: open a blank page (s)", f"{blank_s:.1f}"),
        ("Chromium: open the report, every cluster drawn (s)", f"{open_s:.1f}"),
        ("script errors", state.get("data-errors", "page did not render")),
        ("sheets read to show the top of the page", f"{at_top} of {len(sheets)}"),
        ("Chromium: draw a 30,000-pixel stretch (s)", f"{scroll_s:.1f}"),
        ("sheets read for that stretch", f"{scrolled} of {len(sheets)}"),
    ]
    print("| measure | value |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, help="a folder of images (class subfolders optional)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--page-dir", type=Path, default=Path("outputs/report_page"))
    parser.add_argument("--screenshot", type=Path, help="a run directory: screenshot its report.html")
    parser.add_argument("--out", type=Path, default=Path("docs/report.png"))
    args = parser.parse_args(argv)
    if args.screenshot is not None:
        print(f"written: {screenshot(args.screenshot / 'report.html', args.out, height=1600)}")
    elif args.images is not None:
        measure(args)
    else:
        parser.error("give --images <folder> (measure) or --screenshot <run dir>")


if __name__ == "__main__":
    main()
