"""Open a trace's HTML page (`m2cache.trace.html`) in a real browser, headless, and read what it says.

Uses the system's Chromium (Debian: `apt-get install -y chromium`; `M2CACHE_CHROMIUM` names another
binary): `--dump-dom` gives the page after its script ran, whose status element says whether it
loaded (`ok`) or what went wrong; `--screenshot` takes a picture of it. `make trace-check` runs it on a
real engine run.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from m2cache.errors import M2CacheError

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class BrowserError(M2CacheError, RuntimeError):
    """No headless browser to run, or it failed to render the page."""


@dataclass(frozen=True)
class PageState:
    """What the page reported: `state` "ok", "error" or "loading" (its script never finished)."""

    state: str
    text: str
    title: str


def find_chromium() -> str | None:
    """The Chromium binary to use, or None if there is none."""
    named = os.environ.get("M2CACHE_CHROMIUM")
    if named:
        return shutil.which(named) or (named if Path(named).is_file() else None)
    return next((path for path in map(shutil.which, _NAMES) if path), None)


class _StatusParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.state, self.text, self.title = "missing", "", ""
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if named.get("id") == "status":
            self.state, self._in = named.get("data-state") or "missing", "status"
        elif tag == "title":
            self._in = "title"

    def handle_endtag(self, tag: str) -> None:
        self._in = None

    def handle_data(self, data: str) -> None:
        if self._in == "status":
            self.text += data
        elif self._in == "title":
            self.title += data


def _command(chromium: str, profile: str, size: tuple[int, int]) -> list[str]:
    args = [chromium, "--headless", "--disable-gpu", "--no-first-run", "--no-default-browser-check",
            "--disable-dev-shm-usage", "--hide-scrollbars", f"--user-data-dir={profile}",
            f"--window-size={size[0]},{size[1]}", "--virtual-time-budget=5000"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.append("--no-sandbox")  # Chromium refuses to run as root inside its sandbox
    return args


def _run(args: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as error:
        raise BrowserError(f"{args[0]} did not finish in {timeout_s:.0f} s") from error
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-3:]
        raise BrowserError(f"{args[0]} exited with {done.returncode}: {' / '.join(tail)}")
    return done


def check_page(page: str | os.PathLike[str], fragment: str = "", *,
               screenshot: str | os.PathLike[str] | None = None, size: tuple[int, int] = (1600, 800),
               timeout_s: float = 120.0) -> PageState:
    """Render `page` (opened at `#fragment`, e.g. "step=3") headless; return what its status element
    says, and write a PNG of the page to `screenshot` if given.

    Raises BrowserError when there is no Chromium or it fails; a page that loads but reports an error
    is a PageState with state "error", not an exception.
    """
    chromium = find_chromium()
    if chromium is None:
        raise BrowserError("no Chromium found: apt-get install -y chromium (or set M2CACHE_CHROMIUM)")
    url = Path(page).resolve().as_uri() + (f"#{fragment}" if fragment else "")
    with tempfile.TemporaryDirectory(prefix="m2cache-chromium-") as profile:
        done = _run(_command(chromium, profile, size) + ["--dump-dom", url], timeout_s)
        parser = _StatusParser()
        parser.feed(done.stdout)
        if screenshot is not None:
            target = Path(screenshot).resolve()
            _run(_command(chromium, profile, size) + [f"--screenshot={target}", url], timeout_s)
            if not target.is_file():
                raise BrowserError(f"{chromium} wrote no screenshot to {target}")
    return PageState(parser.state, parser.text.strip(), parser.title.strip())
