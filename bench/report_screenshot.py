"""Check: what a person sees when they open an experiment's report.html, as a headless-browser screenshot.

Writes the folder's report (``raysys report``), has headless Chromium render it at a laptop's width, and
prints where each section starts on the page (from the browser's own layout, not from the HTML text), the
page height, how much of the first screen is figures, and whether anything is wider than the window (a table
must scroll inside its own box, never cut the page's columns off). The screenshot goes to ``--out`` (not into
the folder, whose next report would embed it as a figure), whole and cut into window-high screens
(``<out>-01.png``, ...), to be looked at. Needs a Chromium binary (Debian: ``apt-get install chromium``);
without one it says so and stops. Exit status 1: a blank page, or a page wider than the window.

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
SCREEN = 1000  # CSS pixels: the height of one screen of a laptop window
# Headless, offline and quiet: no sandbox (containers), no GPU, no network of its own, a fresh profile per call.
# Scroll bars stay: a table box that scrolls must show that it does, as it does to a reader.
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio")
# Run inside the page after layout: each section's heading and its top in CSS pixels, the figures' tops, the page's
# size, and per table box whether its table is wider than the box (it then scrolls inside it) or than the window.
LAYOUT_JS = """
<script>window.addEventListener('load', () => {
  const rows = [...document.querySelectorAll('h2')].map(h => [h.textContent, Math.round(h.getBoundingClientRect().top)]);
  const imgs = [...document.querySelectorAll('img')].map(i => Math.round(i.getBoundingClientRect().top));
  const boxes = [...document.querySelectorAll('.wide')].map(b => [b.scrollWidth > b.clientWidth,
      Math.round(b.getBoundingClientRect().right), getComputedStyle(b).overflowX]);
  document.title = JSON.stringify({sections: rows, images: imgs, boxes: boxes,
      height: document.documentElement.scrollHeight, width: document.documentElement.scrollWidth});
});</script>
"""


def chromium(args: list[str], browser: str, timeout: int = 120) -> str:
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True, text=True,
                              timeout=timeout, check=True).stdout


def layout(report: Path, browser: str, width: int) -> dict:
    """The page's layout as the browser lays it out (a copy of the page with a script): see LAYOUT_JS."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.html"
        probe.write_text(report.read_text().replace("</body>", LAYOUT_JS + "</body>"))
        dom = chromium([f"--window-size={width},{SCREEN}", "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
                       browser)
    title = dom.split("<title>", 1)[1].split("</title>", 1)[0]
    return json.loads(title.replace("&quot;", '"').replace("&amp;", "&"))


def screens(shot: Path, height: int) -> list[Path]:
    """The screenshot cut into window-high screens, ``<shot>-01.png`` on, each to be looked at at full size."""
    paths = []
    with Image.open(shot) as image:
        for i, top in enumerate(range(0, image.height, height), 1):
            paths.append(shot.with_name(f"{shot.stem}-{i:02d}.png"))
            image.crop((0, top, image.width, min(top + height, image.height))).save(paths[-1])
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", help="a sweep or run folder (what raysys report takes)")
    p.add_argument("--width", type=int, default=1280, help="browser window width in CSS pixels")
    p.add_argument("--browser", help=f"Chromium binary (default: the first of {', '.join(BROWSERS)} on PATH)")
    p.add_argument("--out", default=str(Path(tempfile.gettempdir()) / "report-screenshot.png"), help="the PNG (default: %(default)s)")
    args = p.parse_args(argv)
    browser = args.browser or next((b for b in map(shutil.which, BROWSERS) if b), None)
    if browser is None:
        print("skipped: no Chromium found; install one (Debian: apt-get install chromium) or pass --browser")
        return 0
    report = write_report(args.folder)
    found = layout(report, browser, args.width)
    shot = Path(args.out).resolve()
    for old in shot.parent.glob(f"{shot.stem}-[0-9][0-9].png"):  # a shorter page leaves no stale screens behind
        old.unlink()
    chromium([f"--window-size={args.width},{found['height']}", f"--screenshot={shot}", report.as_uri()], browser)
    pixels = np.asarray(Image.open(shot).convert("L"))
    print(f"{report}: {found['height']} px tall at {args.width} px wide; screenshot {shot} "
          f"({pixels.shape[1]}x{pixels.shape[0]}, {100 * np.mean(pixels < 250):.1f} % non-white)")
    for title, top in found["sections"]:
        print(f"  {top:>6} px  {title}")
    first_screen = [top for top in found["images"] if top < SCREEN]
    print(f"figures: {len(found['images'])}, {len(first_screen)} of them start on the first screen ({SCREEN:,} px)")
    scrolled = sum(wider and overflow in ("auto", "scroll") for wider, _, overflow in found["boxes"])
    cut = sum(wider and overflow not in ("auto", "scroll") or right > args.width
              for wider, right, overflow in found["boxes"])
    fits = found["width"] <= args.width and not cut
    print(f"tables: {len(found['boxes'])}, {scrolled} wider than their box (they scroll inside it), {cut} cut off; "
          f"page {found['width']} px wide: {'fits the window' if fits else 'WIDER THAN THE WINDOW'}")
    print("screens:", *screens(shot, pixels.shape[0] * SCREEN // found["height"]), sep="\n  ")
    return 0 if np.mean(pixels < 250) > 0.01 and fits else 1  # a blank page, or one cut off, is a failure


if __name__ == "__main__":
    sys.exit(main())
