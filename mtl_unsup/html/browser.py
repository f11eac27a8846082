"""Open a report in a headless Chromium, as a person's browser would (``file://``, no server):
for the tests, the README's screenshot and the 50,000-image measurement."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
         "--disable-extensions", "--mute-audio"]


def find_browser() -> str | None:
    return next((path for path in map(shutil.which, NAMES) if path), None)


def run_browser(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    browser = find_browser()
    if browser is None:
        raise FileNotFoundError(f"no headless browser found (looked for {', '.join(NAMES)}); on Debian: "
                                "apt-get install chromium")
    return subprocess.run([browser, *FLAGS, *args], capture_output=True, text=True, timeout=timeout)


def rendered_state(page: Path, budget_ms: int = 10000, timeout: float = 120) -> dict[str, str]:
    """The attributes the page's script leaves on ``<body>`` once it has drawn everything
    (``data-rendered``, ``data-errors``, ``data-clusters``, ...); empty if it never ran."""
    done = run_browser([f"--virtual-time-budget={budget_ms}", "--dump-dom", page.resolve().as_uri()], timeout)
    body = re.search(r"<body([^>]*)>", done.stdout)
    return dict(re.findall(r'(data-[\w-]+)="([^"]*)"', body.group(1))) if body else {}


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2000, timeout: float = 120) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    run_browser([f"--window-size={width},{height}", "--virtual-time-budget=5000",
                 f"--screenshot={out.resolve()}", page.resolve().as_uri()], timeout)
    if not out.is_file():
        raise RuntimeError(f"the browser wrote no screenshot of {page}")
    return out
