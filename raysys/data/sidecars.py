"""CSV sidecars beside a plain folder of images (``positions.csv``, ``hidden-labels.csv``): where the file is,
its rows by image name, and matching an image's path to its row."""

from __future__ import annotations

import csv
import math
import os
from collections import Counter
from pathlib import Path

from raysys.errors import DataError


def sidecar_path(option, root: Path, image_dir: Path, filename: str, what: str) -> Path | None:
    """``"auto"``: ``filename`` beside the images (root, then images/) if present; a path: must exist."""
    if option is None:
        return None
    if isinstance(option, str) and option == "auto":
        return next((d / filename for d in (root, image_dir) if (d / filename).is_file()), None)
    path = Path(option).expanduser().resolve()
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist; pass an existing CSV or leave the option unset")
    return path


def read_sidecar(path: Path, columns: dict[str, type], required: tuple[str, ...]) -> dict[str, dict]:
    """CSV with a header row -> {name: {column: value}}; empty cells become the column's unknown value."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        header = [h.strip().lower() for h in next(reader, [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise DataError(f"{path}: header row lacks {missing} (found {header}); the first row must name the "
                            f"columns, e.g. '{','.join(columns)}'")
        used = [(i, c) for i, c in enumerate(header) if c in columns and c != "name"]
        name_at = header.index("name")
        rows: dict[str, dict] = {}
        for lineno, row in enumerate(reader, 2):
            if not row or not "".join(row).strip():
                continue
            try:
                rows[row[name_at].strip()] = {c: _cell(row[i], columns[c]) for i, c in used}
            except (ValueError, IndexError):
                raise DataError(f"{path}:{lineno}: malformed row {','.join(row)!r}; expected columns "
                                f"{header} with numbers in {[c for _, c in used]}") from None
    return rows


def _cell(text: str, kind: type):
    text = text.strip()
    if not text:
        return math.nan if kind is float else -1
    return kind(text)


class NameMatcher:
    """Finds an image's sidecar row: path relative to the sidecar folder, relative to the image folder,
    or the bare file name (refused when that name is shared by several images)."""

    def __init__(self, paths: list[str], image_dir: Path):
        self._image_dir = str(image_dir)
        self._basenames = Counter(os.path.basename(p) for p in paths)

    def lookup(self, rows: dict, path: str, sidecar: Path):
        for key in (os.path.relpath(path, sidecar.parent), os.path.relpath(path, self._image_dir)):
            key = key.replace(os.sep, "/")
            if key in rows:
                return rows[key]
        base = os.path.basename(path)
        if base in rows and self._basenames[base] > 1:
            raise DataError(f"{sidecar}: name {base!r} matches {self._basenames[base]} images in subfolders; "
                            f"write names relative to {sidecar.parent}")
        return rows.get(base)
