"""Headless Chromium for the report tests: what a reader's browser actually shows.

Chromium runs with the flags this sandbox needs (no sandbox as root, no
background networking on a closed network) and a fresh profile. A tiny script
appended to a copy of the page writes what it found into the DOM, which
``--dump-dom`` returns: the title, how many images decoded, how many tables.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--allow-file-access-from-files"]
PROBE = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const r = {title: document.title, images: imgs.length,
             loaded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
             tables: document.querySelectorAll('table').length};
  const pre = document.createElement('pre'); pre.id = 'busi-probe';
  pre.textContent = JSON.stringify(r); document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(args: list[str], timeout: int = 120) -> str:
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        out = subprocess.run([exe, *FLAGS, f"--user-data-dir={profile}", *args],
                             capture_output=True, text=True, timeout=timeout)
    return out.stdout


def render(page: Path, screenshot: Path | None = None, width: int = 1200,
           height: int = 2400) -> dict:
    """Load ``page`` in headless Chromium; return what it saw; optionally screenshot it."""
    page = Path(page).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                         encoding="utf-8")
        dom = _run(["--virtual-time-budget=5000", "--dump-dom", probe.as_uri()])
    m = re.search(r'<pre id="busi-probe">(.*?)</pre>', dom, re.S)
    if not m:
        raise RuntimeError("Chromium returned no probe result; the page did not load")
    seen = json.loads(m.group(1).replace("&quot;", '"'))
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        _run([f"--window-size={width},{height}", f"--screenshot={Path(screenshot).resolve()}",
              page.as_uri()])
    return seen
