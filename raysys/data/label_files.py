"""The labeled archives' text files: the class map (``id,name`` rows) and the label files
(``<filename> <class_id>[ <split>]`` lines). Every problem raises :class:`DataError` naming the line and the fix."""

from __future__ import annotations

import csv
from pathlib import Path

from raysys.errors import DataError

LABELED_SPLITS = ("train", "val", "test")


def read_class_map(path: Path) -> list[str]:
    """``id,name`` rows (header row optional) -> names in id order; ids must be 0..n-1."""
    if not path.is_file():
        raise DataError(f"class map {path} does not exist; unzip the complete archive, which ships it")
    by_id: dict[int, str] = {}
    with open(path, newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not row or not "".join(row).strip():
                continue
            head = row[0].strip()
            if lineno == 1 and not head.lstrip("-").isdigit():
                continue  # header row such as "id,name" or "class_id,class_name"
            if len(row) < 2 or not head.lstrip("-").isdigit():
                raise DataError(f"{path}:{lineno}: malformed class map row {','.join(row)!r}; "
                                f"expected 'id,name', e.g. '2,Artifact'")
            class_id = int(head)
            if class_id in by_id:
                raise DataError(f"{path}:{lineno}: class id {class_id} appears twice; keep one row per id")
            by_id[class_id] = ",".join(row[1:]).strip()
    if not by_id:
        raise DataError(f"class map {path} holds no classes; expected 'id,name' rows")
    if sorted(by_id) != list(range(len(by_id))):
        raise DataError(f"class map {path} has ids {sorted(by_id)}; expected consecutive ids 0..{len(by_id) - 1}")
    return [by_id[i] for i in range(len(by_id))]


def parse_label_file(path: Path, with_split: bool, n_classes: int, class_map: Path):
    """Lines ``<filename> <class_id>[ <split>]`` -> (names, labels, splits or None)."""
    expected = "'<filename> <class_id> <split>' (split in train/val/test)" if with_split else "'<filename> <class_id>'"
    width = 3 if with_split else 2
    names, labels, splits = [], [], []
    bad = []
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                if len(fields) != width or (with_split and fields[2] not in LABELED_SPLITS):
                    raise ValueError
                label = int(fields[1])
            except ValueError:
                bad.append((lineno, line.strip()))
                continue
            if not 0 <= label < n_classes:
                raise DataError(f"{path}:{lineno}: class id {label} is not in {class_map} (ids 0..{n_classes - 1}); "
                                f"use the class map that came with this label file")
            names.append(fields[0])
            labels.append(label)
            if with_split:
                splits.append(fields[2])
    if bad:
        lineno, text = bad[0]
        raise DataError(f"{path}:{lineno}: malformed label line {text!r} ({len(bad)} malformed lines in all); "
                        f"expected {expected} per line; fix or remove them")
    return names, labels, (splits if with_split else None)
