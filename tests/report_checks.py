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
#: screenshots land here for a reviewer to look at (ignored by git)
SCREENSHOTS = REPO / "tests" / "output"


def inline_images(html: str) -> list[bytes]:
    """Decoded bytes of every <img> in ``html``; fails on an <img> that is not an inline PNG."""
    sources = re.findall(r'<img[^>]*\bsrc="([^"]*)"', html)
    out = []
    for src in sources:
        assert src.startswith("data:image/png;base64,"), f"image not inlined: {src[:60]}"
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        pixels = matplotlib.image.imread(io.BytesIO(png), format="png")
        assert pixels.shape[0] > 50 and pixels.shape[1] > 50
        out.append(png)
    return out


def chromium_check(html_path: Path, screenshot_name: str) -> Path | None:
    """Open the page in headless Chromium; assert no broken image; return the screenshot (None: no chromium)."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        return None
    url = html_path.resolve().as_uri()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    broken = re.search(r'data-broken-images="(\d+)"', dom.stdout)
    assert broken is not None, "the page's load check did not run"
    assert broken.group(1) == "0", f"{broken.group(1)} broken image(s) in {html_path}"
    assert "Uncaught" not in dom.stderr, dom.stderr[-2000:]
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    shot = SCREENSHOTS / screenshot_name
    run = subprocess.run([*common, "--window-size=1300,2600", f"--screenshot={shot}", url],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0 and shot.stat().st_size > 10_000, run.stderr[-2000:]
    return shot
