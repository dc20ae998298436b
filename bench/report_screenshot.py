"""Check: what a person sees when they open an experiment's report.html, as a headless-browser screenshot.

Writes the folder's report (``raysys report``), has headless Chromium render it at a laptop's width, and
prints where each section starts on the page (from the browser's own layout, not from the HTML text), the
page height, and how much of the first screen is figures. The screenshot goes to ``--out`` (not into the
folder, whose next report would embed it as a figure), to be looked at. Needs a Chromium binary (Debian: ``apt-get install chromium``); without one it says so and stops.

    python bench/report_screenshot.py runs/sweep_k            # a sweep folder, or a pretraining run folder
    python bench/report_screenshot.py runs/pretrain --width 1000 --browser /usr/bin/chromium
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from raysys.reporting.html import write_report

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
# Run inside the page after layout: each section's heading, its top in CSS pixels, and the page height.
LAYOUT_JS = """
<script>window.addEventListener('load', () => {
  const rows = [...document.querySelectorAll('h2')].map(h => [h.textContent, Math.round(h.getBoundingClientRect().top)]);
  const imgs = [...document.querySelectorAll('img')].map(i => Math.round(i.getBoundingClientRect().top));
  document.title = JSON.stringify({sections: rows, images: imgs, height: document.documentElement.scrollHeight});
});</script>
"""


def chromium(args: list[str], browser: str, timeout: int = 120) -> str:
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio"]
    return subprocess.run(base + args, capture_output=True, text=True, timeout=timeout, check=True).stdout


def layout(report: Path, browser: str, width: int) -> dict:
    """Section tops and page height as the browser lays the page out (a copy of the page with a script)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(report.read_text().replace("</body>", LAYOUT_JS + "</body>"))
        dom = chromium([f"--window-size={width},1000", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                       browser)
    title = dom.split("<title>", 1)[1].split("</title>", 1)[0]
    return json.loads(title.replace("&quot;", '"').replace("&amp;", "&"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a sweep or run folder (what raysys report takes)")
    p.add_argument("--width", type=int, default=1280, help="browser window width in CSS pixels")
    p.add_argument("--browser", help=f"Chromium binary (default: the first of {', '.join(BROWSERS)} on PATH)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "report-screenshot.png"), help="the PNG (default: %(default)s)")
    args = p.parse_args()
    browser = args.browser or next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        print("skipped: no Chromium found; install one (Debian: apt-get install chromium) or pass --browser")
        return 0
    report = write_report(args.folder)
    found = layout(report, browser, args.width)
    shot = Path(args.out).resolve()
    chromium([f"--window-size={args.width},{found['height']}", f"--screenshot={shot}", report.as_uri()], browser)
    pixels = np.asarray(Image.open(shot).convert("L"))
    print(f"{report}: {found['height']} px tall at {args.width} px wide; screenshot {shot} "
          f"({pixels.shape[1]}x{pixels.shape[0]}, {100 * np.mean(pixels < 250):.1f} % non-white)")
    for title, top in found["sections"]:
        print(f"  {top:>6} px  {title}")
    first_screen = [top for top in found["images"] if top < 1000]
    print(f"figures: {len(found['images'])}, {len(first_screen)} of them start on the first screen (1,000 px)")
    return 0 if np.mean(pixels < 250) > 0.01 else 1  # a blank page is a failure


if __name__ == "__main__":
    sys.exit(main())
