"""Readers of the real on-disk image formats; each returns one manifest (see :mod:`raysys.data.schema`).

Supported layouts (a researcher can point raysys at the unzipped public archives unchanged):

* ``msl``: MSL labeled data set v2.1 (Zenodo 4033453), ``msl-labeled-data-set-v2.1/`` holding ``images/``,
  ``{train,val,test}-set-v2.1.txt`` (``<filename> <class_id>``) and a headerless ``class_map.csv``.
* ``hirise``: HiRISE map-projected landmarks v3.2 (Zenodo 4002935), ``hirise-map-proj-v3_2/`` holding
  ``map-proj-v3_2/``, ``labels-map-proj_v3_2_train_val_test.txt`` (``<name> <class_id> <split>``),
  ``labels-map-proj_v3_2.txt`` and ``landmarks_map-proj-v3_2_classmap.csv``.
* ``imagefolder``: ``root/<class>/<image>``, class ids in alphabetical order of the folder names.
* ``folder``: a plain folder of unlabeled images, optionally with a ``positions.csv`` sidecar.

Readers store extra facts in the schema metadata: ``raysys.classes`` (JSON list of class names in id
order), ``raysys.format``, ``raysys.duplicates`` (repeated label rows found) and, for folders,
``raysys.missing_positions``. Every problem with the input raises :class:`DataError` with a one-line
message naming the problem and the fix, before any image is decoded.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import pyarrow as pa

from raysys.data.label_files import LABELED_SPLITS, parse_label_file, read_class_map
from raysys.data.schema import UNLABELED, make_manifest
from raysys.data.sidecars import NameMatcher, read_sidecar, sidecar_path
from raysys.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp"})
AUGMENT_SUFFIXES = ("-fh", "-fv", "-r90", "-r180", "-r270", "-brt")
FORMATS = ("msl", "hirise", "imagefolder", "folder")

IMAGES_SUBDIR = "images"  # MSL's image folder; also accepted inside a plain folder

MSL_DIR = "msl-labeled-data-set-v2.1"
MSL_IMAGES = IMAGES_SUBDIR
MSL_CLASS_MAP = "class_map.csv"
MSL_SPLIT_FILES = {split: f"{split}-set-v2.1.txt" for split in LABELED_SPLITS}

HIRISE_DIR = "hirise-map-proj-v3_2"
HIRISE_IMAGES = "map-proj-v3_2"
HIRISE_SPLIT_LABELS = "labels-map-proj_v3_2_train_val_test.txt"
HIRISE_LABELS = "labels-map-proj_v3_2.txt"
HIRISE_CLASS_MAP = "landmarks_map-proj-v3_2_classmap.csv"

ROVER_DIR = "rover-unlabeled"
DIVERSE_DIR = "diverse"
POSITIONS_FILE = "positions.csv"
HIDDEN_LABELS_FILE = "hidden-labels.csv"

META_CLASSES = b"raysys.classes"
META_FORMAT = b"raysys.format"
META_MISSING_POSITIONS = b"raysys.missing_positions"

# Folders that archive tools add and that never hold data (macOS zips carry a __MACOSX/ twin tree).
_SKIPPED_DIRS = frozenset({"__MACOSX"})


# ----------------------------------------------------------------------------------------------------
# small helpers


def augmentation_group(image_id: str) -> str:
    """Id of the original an augmented copy was made from: ``X-fv`` -> ``X``; other ids unchanged."""
    for suffix in AUGMENT_SUFFIXES:
        if image_id.endswith(suffix):
            return image_id[: -len(suffix)]
    return image_id


def class_names(table: pa.Table) -> list[str]:
    """Class names in id order stored by the reader (empty for unlabeled folders)."""
    meta = table.schema.metadata or {}
    return json.loads(meta[META_CLASSES]) if META_CLASSES in meta else []


def _existing_dir(root, what: str) -> Path:
    path = Path(root).expanduser().resolve()
    if not path.exists():
        raise DataError(f"{path} does not exist; pass --data pointing at {what}")
    if not path.is_dir():
        raise DataError(f"{path} is a file, not a folder; pass --data pointing at {what}")
    return path


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in _SKIPPED_DIRS


def _is_image(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS and _visible(name)


def _scan_images(top: Path) -> list[str]:
    """Absolute paths of all image files below ``top`` (recursive, hidden entries skipped), sorted."""
    found, stack = [], [str(top)]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir() and _visible(entry.name):
                    stack.append(entry.path)
                elif _is_image(entry.name) and entry.is_file():
                    found.append(entry.path)
    return sorted(found)


def _has_image_below(top: str) -> bool:
    """Whether any image file lies below ``top``; stops at the first one (layout detection)."""
    stack = [top]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir() and _visible(entry.name):
                    stack.append(entry.path)
                elif _is_image(entry.name):
                    return True
    return False


def _stem_id(path: str, base: str) -> str:
    """Image id of a file: its path relative to ``base``, posix separators, extension dropped."""
    return os.path.splitext(os.path.relpath(path, base))[0].replace(os.sep, "/")


def _with_metadata(table: pa.Table, fmt: str, classes: list[str], **extra) -> pa.Table:
    meta = {META_FORMAT: fmt.encode(), META_CLASSES: json.dumps(classes).encode()}
    meta.update({f"raysys.{k}".encode(): str(v).encode() for k, v in extra.items()})
    return table.replace_schema_metadata(meta)


def _first_names(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n])


class _Listing:
    """One directory listing per folder, so resolving 67K label names costs no per-file stat."""

    def __init__(self):
        self._names: dict[str, set[str]] = {}
        self._lower: dict[str, dict[str, str]] = {}

    def _list(self, folder: str) -> set[str]:
        if folder not in self._names:
            try:
                self._names[folder] = set(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):
                self._names[folder] = set()
        return self._names[folder]

    def find(self, folder: str, name: str) -> str | None:
        """Actual file name in ``folder`` matching ``name`` exactly, else case-insensitively (v1 ``.JPG``)."""
        names = self._list(folder)
        if name in names:
            return name
        if folder not in self._lower:
            self._lower[folder] = {n.lower(): n for n in names}
        return self._lower[folder].get(name.lower())


def _resolve_images(names: list[str], root: Path, image_dir: Path, label_files: str) -> list[str]:
    """Absolute paths of the label names; a leading folder is tried relative to ``root``, then
    ``image_dir/<basename>``. Raises one DataError listing how many are missing."""
    listing, paths, missing = _Listing(), [], []
    root_s, image_s = str(root), str(image_dir)
    image_prefix = image_s + os.sep
    for name in names:
        base = name
        if "/" in name or "\\" in name:  # older lists: "calibrated/NAME.JPG"
            folder, base = os.path.split(os.path.join(root_s, name.replace("\\", "/")))
            hit = listing.find(folder, base)
            if hit is not None:
                paths.append(os.path.join(folder, hit))
                continue
        hit = listing.find(image_s, base)
        if hit is None:
            missing.append(name)
        else:
            paths.append(image_prefix + hit)  # plain concatenation: os.path.join costs ~2 us x 67K rows
    if missing:
        raise DataError(f"{len(missing)} images named in {label_files} do not exist in {image_dir} "
                        f"(first: {_first_names(missing)}); unzip the complete archive or remove those lines")
    return paths


def _count_repeats(names: list[str], label_files: str, level: int) -> tuple[int, list[bool]]:
    """Number of rows whose name appeared before, and a keep-first mask; repeats are logged at ``level``."""
    seen: set[str] = set()
    first = []
    for name in names:
        first.append(name not in seen)
        seen.add(name)
    repeats = len(names) - len(seen)
    if repeats:
        log.log(level, "%s repeat %d rows (same image name twice); kept as listed", label_files, repeats)
    return repeats, first


def _labeled_manifest(paths, labels, splits, domain: str) -> pa.Table:
    image_ids = [os.path.splitext(p.rpartition(os.sep)[2])[0] for p in paths]
    return make_manifest({
        "path": paths,
        "image_id": image_ids,
        "group_id": [augmentation_group(i) for i in image_ids],
        "split": splits,
        "label": labels,
        "domain": [domain] * len(paths),
    })


def _dataset_dir(root: Path, canonical: str, markers: tuple[str, ...]) -> Path:
    """``root`` if it holds any marker file, else ``root/<canonical>`` if that does (archive unzipped
    one level up); otherwise ``root`` so the caller reports what is missing there."""
    if any((root / m).is_file() for m in markers):
        return root
    child = root / canonical
    if child.is_dir() and any((child / m).is_file() for m in markers):
        return child
    return root


# ----------------------------------------------------------------------------------------------------
# readers


def read_msl(root) -> pa.Table:
    """Read MSL labeled data set v2.1 (``msl-labeled-data-set-v2.1/`` or the folder holding it).

    Rows follow the split files in order train, val, test; absent split files are skipped with a
    warning. A leading folder in a name (``calibrated/NAME.JPG``) is resolved relative to the root,
    falling back to ``images/<basename>``. Repeated names are counted (``raysys.duplicates``), kept,
    and logged. ``group_id`` strips the augmentation suffix so copies of one original stay together.
    """
    what = f"the unzipped {MSL_DIR} folder"
    root = _dataset_dir(_existing_dir(root, what), MSL_DIR, tuple(MSL_SPLIT_FILES.values()))
    present = {s: root / f for s, f in MSL_SPLIT_FILES.items() if (root / f).is_file()}
    if not present:
        raise DataError(f"{root} holds none of {', '.join(MSL_SPLIT_FILES.values())}; pass --data pointing at {what}")
    absent = sorted(set(MSL_SPLIT_FILES) - set(present))
    if absent:
        log.warning("%s: no split file for %s; reading only %s", root, absent, sorted(present))
    classes = read_class_map(root / MSL_CLASS_MAP)
    names, labels, splits = [], [], []
    for split, path in present.items():
        n, lab, _ = parse_label_file(path, False, len(classes), root / MSL_CLASS_MAP)
        names += n
        labels += lab
        splits += [split] * len(n)
    label_files = " / ".join(p.name for p in present.values())
    paths = _resolve_images(names, root, root / MSL_IMAGES, label_files)
    repeats, _ = _count_repeats(names, label_files, logging.WARNING)
    table = _labeled_manifest(paths, labels, splits, "msl")
    return _with_metadata(table, "msl", classes, duplicates=repeats)


def read_hirise(root, dedupe: bool = False) -> pa.Table:
    """Read HiRISE map-projected landmarks v3.2 (the unzipped folder or the one holding it).

    Uses ``labels-map-proj_v3_2_train_val_test.txt``. Its repeated rows (upsampled minority classes)
    are kept by default and counted in ``raysys.duplicates``; ``dedupe=True`` keeps the first row
    per image name. If only ``labels-map-proj_v3_2.txt`` (no split column) exists, the labels are
    kept but every row gets split ``unlabeled``: inventing a train/test split would make benchmark
    numbers incomparable, so evaluation must refuse it while pretraining can still use the images.
    """
    what = f"the unzipped {HIRISE_DIR} folder"
    root = _dataset_dir(_existing_dir(root, what), HIRISE_DIR, (HIRISE_SPLIT_LABELS, HIRISE_LABELS))
    with_split = (root / HIRISE_SPLIT_LABELS).is_file()
    label_path = root / (HIRISE_SPLIT_LABELS if with_split else HIRISE_LABELS)
    if not label_path.is_file():
        raise DataError(f"{root} holds neither {HIRISE_SPLIT_LABELS} nor {HIRISE_LABELS}; "
                        f"pass --data pointing at {what}")
    if not with_split:
        log.warning("%s missing; read %s without splits: every row gets split 'unlabeled'",
                    HIRISE_SPLIT_LABELS, HIRISE_LABELS)
    classes = read_class_map(root / HIRISE_CLASS_MAP)
    names, labels, splits = parse_label_file(label_path, with_split, len(classes), root / HIRISE_CLASS_MAP)
    if not with_split:
        splits = ["unlabeled"] * len(names)
    # HiRISE's repeats are deliberate upsampling (2,863 in v3.2): the benchmark's source line notes them.
    repeats, first = _count_repeats(names, label_path.name, logging.DEBUG)
    if dedupe and repeats:
        names, labels, splits = ([v for v, keep in zip(col, first) if keep] for col in (names, labels, splits))
    paths = _resolve_images(names, root, root / HIRISE_IMAGES, label_path.name)
    table = _labeled_manifest(paths, labels, splits, "hirise")
    return _with_metadata(table, "hirise", classes, duplicates=repeats)


def read_imagefolder(root, domain: str = "diverse") -> pa.Table:
    """Read ``root/<class>/<image>`` (images may be nested below the class folder), split ``train``.

    Class ids follow the alphabetical order of the folder names (as torchvision's ImageFolder);
    ``image_id`` is ``<class>/<name>`` without extension so equal file names in two classes stay distinct.
    """
    what = "a folder holding one subfolder of images per class"
    root = _existing_dir(root, what)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and _visible(e.name))
    if not classes:
        raise DataError(f"{root} holds no class folders; expected {root}/<class>/<image> "
                        f"(or use format 'folder' for unlabeled images)")
    paths, labels = [], []
    for class_id, name in enumerate(classes):
        found = _scan_images(root / name)
        if not found:
            raise DataError(f"class folder {root / name} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                            f"add images or remove the folder")
        paths += found
        labels += [class_id] * len(found)
    image_ids = [_stem_id(p, str(root)) for p in paths]
    table = make_manifest({
        "path": paths,
        "image_id": image_ids,
        "split": ["train"] * len(paths),
        "label": labels,
        "domain": [domain] * len(paths),
    })
    return _with_metadata(table, "imagefolder", classes, duplicates=0)


def read_folder(root, positions="auto", hidden_labels: bool = False, domain: str = "rover") -> pa.Table:
    """Read a plain folder of unlabeled images (recursive; an ``images/`` subfolder is used if present).

    ``positions``: ``"auto"`` reads ``positions.csv`` beside the images when present, a path reads that
    file, ``None`` reads none. The CSV needs a header ``name,x,y[,heading][,traverse][,frame]``; ``name``
    is the file name with extension, relative to the CSV's folder, or just the basename. Images absent
    from it get NaN positions (counted in ``raysys.missing_positions``, one warning).
    ``hidden_labels=True`` fills ``label`` from ``hidden-labels.csv`` (``name,label``, written by the
    simulator) for diagnostics only; the split stays ``unlabeled``. ``image_id`` is the path relative
    to the image folder without extension.
    """
    root = _existing_dir(root, "a folder of images")
    image_dir = root / IMAGES_SUBDIR if (root / IMAGES_SUBDIR).is_dir() else root
    pos_path = sidecar_path(positions, root, image_dir, POSITIONS_FILE, "positions")
    hid_path = sidecar_path("auto" if hidden_labels else None, root, image_dir, HIDDEN_LABELS_FILE, "hidden labels")
    if hidden_labels and hid_path is None:
        raise DataError(f"hidden_labels=True but {root} has no {HIDDEN_LABELS_FILE}; only simulator output has one, "
                        f"so read real data with hidden_labels=False")
    pos_rows = read_sidecar(pos_path, {"name": str, "x": float, "y": float, "heading": float,
                                        "traverse": int, "frame": int}, ("name", "x", "y")) if pos_path else None
    hid_rows = read_sidecar(hid_path, {"name": str, "label": int}, ("name", "label")) if hid_path else None

    paths = _scan_images(image_dir)
    if not paths:
        raise DataError(f"{image_dir} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                        f"put images there or pass --data pointing at a folder of images")
    n = len(paths)
    rows = {
        "path": paths,
        "image_id": [_stem_id(p, str(image_dir)) for p in paths],
        "domain": [domain] * n,
    }
    matcher = NameMatcher(paths, image_dir)
    missing = 0
    if pos_rows is not None:
        cols = {c: [] for c in ("x", "y", "heading", "traverse", "frame")}
        unknown = {"x": math.nan, "y": math.nan, "heading": math.nan, "traverse": -1, "frame": -1}
        for p in paths:
            row = matcher.lookup(pos_rows, p, pos_path)
            missing += row is None
            for c, values in cols.items():
                values.append(unknown[c] if row is None else row.get(c, unknown[c]))
        rows.update(cols)
        if missing:
            log.warning("%d of %d images have no row in %s; their positions are NaN", missing, n, pos_path)
    if hid_rows is not None:
        found = (matcher.lookup(hid_rows, p, hid_path) for p in paths)
        rows["label"] = [UNLABELED if r is None else r["label"] for r in found]
    table = make_manifest(rows)
    return _with_metadata(table, "folder", [], duplicates=0, missing_positions=missing)


# ----------------------------------------------------------------------------------------------------
# detection and dispatch


def _detect_labeled(folder: Path) -> str | None:
    """``msl`` or ``hirise`` when ``folder`` holds that benchmark's label files, else None."""
    if any((folder / f).is_file() for f in MSL_SPLIT_FILES.values()):
        return "msl"
    if (folder / HIRISE_SPLIT_LABELS).is_file() or (folder / HIRISE_LABELS).is_file():
        return "hirise"
    return None


def detect_format(root) -> str:
    """Layout of ``root``: ``msl`` / ``hirise`` (by their label files, also one level down under the
    archive's own folder name), ``folder`` (images directly inside, an ``images/`` subfolder, or a
    positions / hidden-labels sidecar), else ``imagefolder`` (subfolders holding images).
    A rover folder organised in per-traverse subfolders looks like ``imagefolder``: pass ``format="folder"``."""
    root = _existing_dir(root, "a dataset folder")
    fmt = _detect_labeled(root)
    if fmt:
        return fmt
    nested = {}
    for name in (MSL_DIR, HIRISE_DIR):
        fmt = _detect_labeled(root / name)
        if fmt:
            nested[fmt] = name
    if len(nested) > 1:
        raise DataError(f"{root} holds several datasets ({', '.join(nested.values())}); "
                        f"pass --data pointing at one of them")
    if nested:
        return next(iter(nested))
    entries = [e for e in os.scandir(root) if _visible(e.name)]
    files = sorted(e.name for e in entries if e.is_file())
    dirs = sorted(e.name for e in entries if e.is_dir())
    if (any(_is_image(f) for f in files) or IMAGES_SUBDIR in dirs
            or POSITIONS_FILE in files or HIDDEN_LABELS_FILE in files):
        return "folder"
    if any(_has_image_below(str(root / d)) for d in dirs):
        return "imagefolder"
    if not entries:
        raise DataError(f"{root} is empty; pass --data pointing at a folder holding images or an unzipped dataset")
    seen = _first_names(files + [d + "/" for d in dirs], 5)
    raise DataError(f"{root}: no supported layout (found {len(files)} files, {len(dirs)} folders, no images: {seen}); "
                    f"supported: MSL v2.1 ({MSL_SPLIT_FILES['train']}, {MSL_IMAGES}/), HiRISE v3.2 "
                    f"({HIRISE_SPLIT_LABELS}, {HIRISE_IMAGES}/), imagefolder (<class>/<image>), folder (images)")


_READERS = {"msl": read_msl, "hirise": read_hirise, "imagefolder": read_imagefolder, "folder": read_folder}


def read_manifest(root, format: str | None = None, **kw) -> pa.Table:
    """Read ``root`` with the reader of its detected layout, or of ``format`` when given; ``kw`` go to
    that reader (``dedupe`` for hirise, ``domain`` / ``positions`` / ``hidden_labels`` for folders)."""
    if format is None:
        format = detect_format(root)
    if format not in _READERS:
        raise DataError(f"unknown format {format!r}; use one of {', '.join(FORMATS)} or leave it unset to auto-detect")
    return _READERS[format](root, **kw)


def discover(root) -> dict[str, Path]:
    """Datasets held side by side under ``root`` -> ``{"msl", "hirise", "rover", "diverse"}: folder``.

    MSL and HiRISE are found by their label files: in ``root`` itself (the HiRISE zip may unpack its
    files straight there) or in a subfolder, also one level down under the archive's folder name;
    the archive folder names win over other subfolders. ``diverse`` is the out-of-domain folder of mixed-domain
    pretraining, found by its name. ``rover``, the pretraining pool, is the one other subfolder holding images,
    whatever its name (:func:`pool_folders`), where ``root`` holds a benchmark, ``diverse/`` or ``rover-unlabeled/``;
    with several candidates, none is (the caller asks which).
    """
    root = _existing_dir(root, "a folder holding datasets side by side")
    found: dict[str, Path] = {}
    here = _detect_labeled(root)
    if here:
        found[here] = root
    archive_first = sorted(os.scandir(root), key=lambda e: (e.name not in (MSL_DIR, HIRISE_DIR), e.name))
    for entry in archive_first:
        if not (entry.is_dir() and _visible(entry.name)):
            continue
        child = Path(entry.path)
        for folder in (child, child / MSL_DIR, child / HIRISE_DIR):
            key = _detect_labeled(folder)
            if key and key not in found:
                found[key] = folder
    if (root / DIVERSE_DIR).is_dir():
        found["diverse"] = root / DIVERSE_DIR
    pools = pool_folders(root, found)
    if len(pools) == 1:
        found["rover"] = pools[0]
    return found


def pool_folders(root, found: dict[str, Path]) -> list[Path]:
    """Subfolders of ``root`` that could be the pretraining pool: every one holding an image that is neither a
    benchmark found there (nor holds one) nor the out-of-domain ``diverse/``, in name order. Only a root of
    datasets side by side (``found`` is not empty, or it has ``rover-unlabeled/``) has any: another root is one
    dataset, and an ImageFolder's class folders are no pools."""
    root = Path(root).expanduser().resolve()
    if not found and not (root / ROVER_DIR).is_dir():
        return []
    taken = set(found.values())
    # a benchmark unpacked straight into the root has its image folder there
    taken |= {root / d for key, folder in found.items() if folder == root for d in _IMAGE_DIRS.get(key, ())}
    return [Path(e.path) for e in sorted(os.scandir(root), key=lambda e: e.name)
            if e.is_dir() and _visible(e.name) and Path(e.path) not in taken
            and not any(Path(e.path) in t.parents for t in taken) and _has_image_below(e.path)]


# A benchmark's own image folders (MSL's older label lists name calibrated/NAME.JPG): never a pool.
_IMAGE_DIRS = {"msl": (MSL_IMAGES, "calibrated"), "hirise": (HIRISE_IMAGES,)}
