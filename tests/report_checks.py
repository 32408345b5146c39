"""Checks shared by the report tests: every inline image decodes; headless Chromium shows no broken image."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
from pathlib import Path

import matplotlib.image

REPO = Path(__file__).resolve().parent.parent
#: screenshots are copied here for a reviewer to look at (tests/output/ is ignored by git)
SCREENSHOTS = REPO / "tests" / "output"


def inline_images(html: str) -> list[bytes]:
    """Decoded bytes of every <img> in ``html``; fails on an <img> that is not an inline, decodable PNG."""
    sources = re.findall(r"<img\b[^>]*>", html)
    out = []
    for tag in sources:
        src = re.search(r'\bsrc="([^"]*)"', tag)
        assert src is not None, f"<img> without src: {tag[:80]}"
        src = src.group(1)
        assert src.startswith("data:image/png;base64,"), f"image not inlined: {src[:60]}"
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == b"\x89PNG\r\n\x1a\n"
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 50 and pixels.shape[1] > 50
        out.append(png)
    return out


def assert_self_contained(html: str) -> None:
    """No resource the page would fetch from the network or another file."""
    for pattern in (r'\bsrc="(?!data:)', r"<link\b", r"@import", r"url\((?!data:)", r'href="https?:'):
        assert re.search(pattern, html) is None, f"external reference ({pattern}) in the page"


def chromium_check(html_path: Path, screenshot_name: str, height: int = 4000) -> Path | None:
    """Open the page in headless Chromium: no broken image, no script error; screenshot it.

    The screenshot is written next to the page and copied to ``tests/output/``.
    Returns its path there, or ``None`` when Chromium is not installed.
    """
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    url = html_path.resolve().as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    dom = subprocess.run(
        [*common, "--enable-logging=stderr", "--v=0", "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    broken = re.search(r'data-broken-images="(\d+)"', dom.stdout)
    assert broken is not None, "the page's load check did not run"
    assert broken.group(1) == "0", f"{broken.group(1)} broken image(s) in {html_path}"
    errors = [line for line in dom.stderr.splitlines() if "Uncaught" in line or "net::ERR_" in line]
    assert not errors, "\n".join(errors)
    shot = html_path.parent / screenshot_name
    run = subprocess.run(
        [*common, f"--window-size=1280,{height}", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(shot, SCREENSHOTS / screenshot_name))
