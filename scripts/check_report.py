"""Open a run's report.html in headless Chromium and save a screenshot of it.

    python scripts/check_report.py outputs/seg/20261125-101500 [--out shot.png]

Prints what the browser saw: the page title, the number of images that
finished loading (naturalWidth > 0) out of all images, and the tables. Exit
code 1 if any embedded image failed to load. Needs Debian's `chromium`
(apt-get install chromium).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from browser import render  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--out", help="screenshot path (default: RUN_DIR/report_screenshot.png)")
    args = ap.parse_args()
    page = Path(args.run_dir) / "report.html"
    shot = Path(args.out) if args.out else Path(args.run_dir) / "report_screenshot.png"
    seen = render(page, shot)
    print(f"title: {seen['title']}\nimages loaded: {seen['loaded']}/{seen['images']}\n"
          f"tables: {seen['tables']}\nscreenshot: {shot}\n"
          f"command: python scripts/check_report.py {args.run_dir}")
    return 0 if seen["images"] == seen["loaded"] else 1


if __name__ == "__main__":
    sys.exit(main())
