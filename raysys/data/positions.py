"""``raysys positions``: the positions sidecar of a rover image folder, from NASA raw-image metadata.

Writes ``positions.csv`` with the header ``name,x,y,heading,traverse,frame``, the columns
:func:`raysys.data.formats.read_folder` reads (``name``, ``x``, ``y`` required; the rest optional).

Input: the JSON records of the public raw-image feeds, saved to disk by the user (nothing is downloaded
here): a JSON file holding a list of records or an object with an ``items`` (MSL,
``mars.nasa.gov/api/v1/raw_image_items``) or ``images`` (Mars 2020, ``mars.nasa.gov/rss/api/?feed=raw_images``)
list, or JSON lines (one record per line). Several files may be given (one per feed page).

Fields relied on (top level first, then ``extended``; the alternative spellings of the two feeds):

* ``site`` and ``drive``: the rover motion counter (integers, or integer strings as Mars 2020 sends
  ``drive``); required.
* ``xyz``: ``"(x,y,z)"`` or a list of three numbers, taken to be the rover position in metres in the
  frame of the current *site* (SITE_FRAME: x north, y east, z down); required. This is an assumption
  about the feed, not documented by NASA; check a few against the PDS labels (see the positions README).
* ``mastAz`` / ``mast_az``: mast azimuth in degrees -> ``heading`` (modulo 360); optional (NaN
  when absent or not a number). It is the pointing of the mast, not the rover's heading, and is
  meaningless for body-fixed cameras (hazcams).
* ``sclk`` / ``spacecraft_clock`` and ``sol``: ordering only; optional.
* The image file: the basename of ``url`` / ``https_url`` / ``image_files.full_res``; with
  ``--images DIR``, the file in DIR with that name, or named ``imageid`` (or the URL's stem) with any
  image extension.

Positions across sites: each site frame has its own origin, and site frames are *not* aligned with one
another without the localization products (SPICE kernels, the PLACES database), which this command does
not read. So positions are only comparable within a site, and each site frame is moved to its own cell
of a grid (:func:`site_origin`: ``SITE_GRID`` cells per row, ``site_spacing`` apart, default 5 km), so no
pair from two sites is ever "near". A grid rather than a line keeps the coordinates small: the training
batch carries x, y as float32, whose steps are under 2 cm below 262 km but 1 m at 10,000 km. Records
more than half a cell from their site's origin would overlap the next site and are skipped, reported.
This is an approximation that gives up every cross-site pair, including real revisits of one place.
``traverse`` is the site (or the sol, ``--traverse-by sol``); ``frame`` numbers the images of one
traverse in the order of (site, drive, sclk, sol, name): the motion counter never decreases in time.

Malformed records (missing or non-numeric fields, unparseable ``xyz``, no matching image file) are
skipped and reported with their line (JSON lines) or list index; only a file with no usable record is an
error. The CSV is written to a temporary file and renamed into place.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from raysys import storage
from raysys.data.formats import IMAGE_EXTENSIONS, POSITIONS_FILE
from raysys.errors import PositionsError

SITE_SPACING = 5_000.0  # metres between the origins of neighbouring site frames (see module doc)
SITE_GRID = 32  # sites per grid row: 1,024 sites stay within 160 km of the origin (float32 step 1.6 cm)
TRAVERSE_BY = ("site", "sol")
HEADER = ("name", "x", "y", "heading", "traverse", "frame")
LIST_KEYS = ("items", "images")  # MSL raw_image_items, Mars 2020 rss feed
URL_KEYS = ("url", "https_url")
IMAGE_FILE_KEYS = ("full_res", "large", "medium", "small")
SHOWN_PROBLEMS = 20


@dataclass(frozen=True)
class Problem:
    """A record that was skipped: where it is (``file:line N`` or ``file:items[i]``) and why."""

    where: str
    reason: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}"


@dataclass(frozen=True)
class PositionRow:
    """One sidecar row (``frame`` is assigned after all records are read)."""

    name: str
    x: float
    y: float
    heading: float
    traverse: int
    frame: int
    order: tuple  # sort key within the traverse


class _Skip(Exception):
    """A record cannot be used; the message is the reason."""


# ----------------------------------------------------------------------------- reading records


def load_records(path) -> tuple[list[tuple[str, object]], list[Problem]]:
    """``(where, record)`` for every record of one metadata file (JSON or JSON lines), and a
    :class:`Problem` for each JSON-lines line that is not valid JSON. A missing, empty or wholly
    unparseable file raises :class:`PositionsError`."""
    path = Path(path)
    if not path.is_file():
        raise PositionsError(f"metadata file {path} does not exist; pass saved raw-image JSON or JSON lines")
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        raise PositionsError(f"metadata file {path} is empty; save the raw-image feed's JSON into it")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        return _json_lines(path, text)
    if isinstance(whole, dict):
        key = next((k for k in LIST_KEYS if isinstance(whole.get(k), list)), None)
        if key is None:  # a one-line JSON-lines file
            return [(f"{path}:line 1", whole)], []
        return [(f"{path}:{key}[{i}]", r) for i, r in enumerate(whole[key])], []
    if isinstance(whole, list):
        return [(f"{path}:[{i}]", r) for i, r in enumerate(whole)], []
    raise PositionsError(f"{path} holds a JSON {type(whole).__name__}; expected a list of records, "
                         f"an object with {' or '.join(LIST_KEYS)}, or JSON lines")


def _json_lines(path: Path, text: str) -> tuple[list[tuple[str, object]], list[Problem]]:
    records, problems = [], []
    for lineno, line in enumerate(io.StringIO(text), 1):
        if line.strip():
            try:
                records.append((f"{path}:line {lineno}", json.loads(line)))
            except json.JSONDecodeError as exc:
                problems.append(Problem(f"{path}:line {lineno}", f"not valid JSON ({exc.msg})"))
    if not records:
        raise PositionsError(f"{path} is neither JSON nor JSON lines (first error: {problems[0]}); "
                             f"save the feed's response unchanged")
    return records, problems


def _field(record: dict, *keys: str):
    """First present, non-empty value of ``keys`` at the top level, then in ``extended``."""
    extended = record.get("extended") if isinstance(record.get("extended"), dict) else {}
    for scope in (record, extended):
        for key in keys:
            value = scope.get(key)
            if value not in (None, ""):
                return value
    return None


def _integer(record: dict, key: str, required: bool = True) -> int | None:
    value = _field(record, key)
    if value is None:
        if required:
            raise _Skip(f"no {key!r}")
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _Skip(f"{key} {value!r} is not a number") from None
    if not number.is_integer():
        raise _Skip(f"{key} {value!r} is not an integer")
    return int(number)


def _number(record: dict, *keys: str) -> float:
    """An optional number; NaN when absent or not a finite number."""
    try:
        value = float(_field(record, *keys))
    except (TypeError, ValueError):
        return math.nan
    return value if math.isfinite(value) else math.nan


def parse_xyz(value) -> tuple[float, float, float]:
    """``"(35.1,-2.3,0.5)"`` (brackets and spaces optional) or ``[35.1, -2.3, 0.5]`` -> three finite floats;
    raises ``ValueError`` otherwise."""
    parts = value if isinstance(value, (list, tuple)) else str(value).strip().strip("()[]").split(",")
    if len(parts) != 3:
        raise ValueError(f"xyz {value!r} is not three numbers")
    try:
        xyz = tuple(float(p) for p in parts)
    except (TypeError, ValueError):
        raise ValueError(f"xyz {value!r} is not three numbers") from None
    if not all(math.isfinite(c) for c in xyz):
        raise ValueError(f"xyz {value!r} is not finite")
    return xyz


def _url_name(record: dict) -> str | None:
    """Basename of the record's image URL, if it has one."""
    files = record.get("image_files") if isinstance(record.get("image_files"), dict) else {}
    url = _field(record, *URL_KEYS) or next((files[k] for k in IMAGE_FILE_KEYS if files.get(k)), None)
    if not isinstance(url, str):
        return None
    return url.split("?")[0].rstrip("/").rsplit("/", 1)[-1] or None


class _ImageIndex:
    """Image files below a folder, found by file name or by name without extension (case-insensitive)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.by_name: dict[str, list[str]] = {}
        self.by_stem: dict[str, list[str]] = {}
        for top, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for f in sorted(files):
                stem, ext = os.path.splitext(f)
                if ext.lower() in IMAGE_EXTENSIONS and not f.startswith("."):
                    rel = Path(top, f).relative_to(folder).as_posix()
                    self.by_name.setdefault(f.lower(), []).append(rel)
                    self.by_stem.setdefault(stem.lower(), []).append(rel)

    def find(self, url_name: str | None, image_id: str | None) -> str:
        """Path relative to the folder of the record's image; raises :class:`_Skip` when none or several."""
        keys = [(self.by_name, url_name), (self.by_stem, image_id),
                (self.by_stem, url_name and os.path.splitext(url_name)[0])]
        for index, key in keys:
            hits = index.get(key.lower(), []) if key else []
            if len(hits) > 1:
                raise _Skip(f"several files in {self.folder} match {key!r} ({', '.join(hits[:3])})")
            if hits:
                return hits[0]
        wanted = " or ".join(repr(k) for k in (url_name, image_id) if k)
        raise _Skip(f"no image file {wanted} in {self.folder}")


def site_origin(site: int, spacing: float = SITE_SPACING) -> tuple[float, float]:
    """Where site frame ``site`` is placed: cell ``(site % SITE_GRID, site // SITE_GRID)`` of a grid
    ``spacing`` metres apart (``(0, 0)`` for every site when ``spacing`` is 0)."""
    return (site % SITE_GRID) * spacing, (site // SITE_GRID) * spacing


def _row(record, traverse_by: str, spacing: float, images: _ImageIndex | None) -> PositionRow:
    if not isinstance(record, dict):
        raise _Skip(f"a JSON {type(record).__name__}, not a record object")
    site, drive = _integer(record, "site"), _integer(record, "drive")
    if site < 0:
        raise _Skip(f"site {site} is negative")
    xyz = _field(record, "xyz")
    if xyz is None:
        raise _Skip("no 'xyz' (rover position in the site frame)")
    try:
        x, y, _ = parse_xyz(xyz)
    except ValueError as exc:
        raise _Skip(str(exc)) from None
    if spacing and max(abs(x), abs(y)) >= spacing / 2:
        raise _Skip(f"xyz {xyz!r} lies {max(abs(x), abs(y)):g} m from its site's origin, beyond half the site "
                    f"spacing ({spacing:g} m); raise --site-spacing")
    sol = _integer(record, "sol", required=traverse_by == "sol")
    image_id = _field(record, "imageid")
    url_name = _url_name(record)
    if images is not None:
        name = images.find(url_name, str(image_id) if image_id is not None else None)
    elif url_name:
        name = url_name
    else:  # an imageid has no extension, so it names no file until matched against --images
        raise _Skip("no image URL; pass --images DIR to match files by imageid")
    heading = _number(record, "mastAz", "mast_az")
    sclk = _number(record, "sclk", "spacecraft_clock")
    order = (site, drive, -1.0 if math.isnan(sclk) else sclk, -1 if sol is None else sol, name)
    traverse = site if traverse_by == "site" else sol
    ox, oy = site_origin(site, spacing)
    return PositionRow(name, x + ox, y + oy, heading % 360.0, traverse, -1, order)


def parse_records(
    records: list[tuple[str, object]], images=None, traverse_by: str = "site", site_spacing: float = SITE_SPACING,
) -> tuple[list[PositionRow], list[Problem]]:
    """Sidecar rows of the usable records (sorted by traverse, then frame) and a :class:`Problem` for each
    skipped one. ``images``: a folder; names are then the matching files' paths relative to it. A repeated
    image name keeps its first record and reports the others."""
    if traverse_by not in TRAVERSE_BY:
        raise PositionsError(f"traverse_by {traverse_by!r} is unknown; use one of {', '.join(TRAVERSE_BY)}")
    if not math.isfinite(site_spacing) or site_spacing < 0:
        raise PositionsError(f"site spacing {site_spacing} must be a finite number >= 0 (metres)")
    index = None
    if images is not None:
        if not Path(images).is_dir():
            raise PositionsError(f"--images {images} is not a folder; pass the folder holding the downloaded images")
        index = _ImageIndex(Path(images))
    rows, problems, seen = [], [], {}
    for where, record in records:
        try:
            row = _row(record, traverse_by, site_spacing, index)
        except _Skip as exc:
            problems.append(Problem(where, str(exc)))
            continue
        if row.name in seen:
            problems.append(Problem(where, f"image {row.name!r} repeats the record at {seen[row.name]}; first kept"))
            continue
        seen[row.name] = where
        rows.append(row)
    return _number_frames(rows), problems


def _number_frames(rows: list[PositionRow]) -> list[PositionRow]:
    out, frame, previous = [], 0, None
    for row in sorted(rows, key=lambda r: (r.traverse, r.order)):
        frame = frame + 1 if row.traverse == previous else 0
        previous = row.traverse
        out.append(PositionRow(row.name, row.x, row.y, row.heading, row.traverse, frame, row.order))
    return out


# ----------------------------------------------------------------------------- writing


def write_positions(rows: list[PositionRow], out) -> Path:
    """Write the sidecar CSV atomically (temporary file renamed into place); NaN headings are left blank."""
    out = Path(out)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(HEADER)
    for r in rows:
        heading = "" if math.isnan(r.heading) else f"{r.heading:.4f}"
        writer.writerow([r.name, f"{r.x:.4f}", f"{r.y:.4f}", heading, r.traverse, r.frame])
    storage.write_text_atomic(str(out), buf.getvalue())
    return out


def build_positions(
    metadata, out=None, images=None, traverse_by: str = "site", site_spacing: float = SITE_SPACING,
) -> dict:
    """Read raw-image metadata file(s), write the positions sidecar, return ``{"out", "rows", "problems"}``.

    ``metadata``: one path or a list. ``out`` defaults to ``<images>/positions.csv`` (required without
    ``images``). Raises :class:`PositionsError` when no record is usable; the output is then untouched.
    """
    files = [metadata] if isinstance(metadata, (str, os.PathLike)) else list(metadata)
    if not files:
        raise PositionsError("no metadata file given; pass the saved raw-image JSON file(s)")
    if out is None:
        if images is None:
            raise PositionsError("no output file; pass --out FILE, or --images DIR to write DIR/positions.csv")
        out = Path(images) / POSITIONS_FILE
    records, problems = [], []
    for f in files:
        found, bad = load_records(f)
        records += found
        problems += bad
    rows, skipped = parse_records(records, images, traverse_by, site_spacing)
    problems += skipped
    if not rows:
        first = f"; first: {problems[0]}" if problems else ""
        raise PositionsError(f"no usable record in {', '.join(map(str, files))} ({len(problems)} skipped){first}; "
                             f"records need site, drive, xyz and an image url (or imageid with --images)")
    return {"out": write_positions(rows, out), "rows": rows, "problems": problems}


# ----------------------------------------------------------------------------- command line


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raysys positions``."""
    p.add_argument("metadata", nargs="+", help="saved raw-image metadata: JSON (list, {items: [...]} or "
                                               "{images: [...]}) or JSON lines; several files allowed")
    p.add_argument("--images", help="folder of the downloaded images: names are matched to its files "
                                    "(by URL file name or imageid) and the sidecar goes there by default")
    p.add_argument("--out", help=f"sidecar to write (default: <images>/{POSITIONS_FILE})")
    p.add_argument("--traverse-by", choices=TRAVERSE_BY, default="site",
                   help="what one traverse (sequence) is: a site frame (default) or a sol")
    p.add_argument("--site-spacing", type=float, default=SITE_SPACING,
                   help="metres between the grid cells that keep unaligned site frames apart "
                        "(0 only if xyz is already in one global frame)")
    return p


def run(args: argparse.Namespace) -> int:
    """``raysys positions``: write the sidecar; skipped records go to stderr (the first
    ``SHOWN_PROBLEMS``, then a count)."""
    result = build_positions(args.metadata, args.out, args.images, args.traverse_by, args.site_spacing)
    problems = result["problems"]
    for problem in problems[:SHOWN_PROBLEMS]:
        print(f"raysys positions: skipped {problem}", file=sys.stderr)
    if len(problems) > SHOWN_PROBLEMS:
        print(f"raysys positions: ... and {len(problems) - SHOWN_PROBLEMS} more skipped records", file=sys.stderr)
    rows = result["rows"]
    print(f"wrote {len(rows)} positions in {len({r.traverse for r in rows})} traverses to {result['out']} "
          f"({len(problems)} records skipped)")
    return 0
