"""Readers of the real on-disk formats, checked on hand-built fixtures written in the exact real line formats."""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image

from raysys.data import formats
from raysys.data.formats import (
    DataError,
    class_names,
    detect_format,
    discover,
    read_folder,
    read_hirise,
    read_imagefolder,
    read_manifest,
    read_msl,
)
from raysys.data.schema import MANIFEST_SCHEMA

MSL_CLASSES = ["Arm cover", "Other rover part", "Artifact", "Nearby surface", "Close-up rock", "DRT", "DRT spot",
               "Distant landscape", "Drill hole", "Night sky", "Float", "Layers", "Light-toned veins",
               "Mastcam cal target", "Sand", "Sun", "Wheel", "Wheel joint", "Wheel tracks"]
HIRISE_CLASSES = ["other", "crater", "dark dune", "slope streak", "bright dune", "impact ejecta", "swiss cheese",
                  "spider"]


def _image(path: Path, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, (4, 4), 128).save(path)


def _write(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def _rows(table):
    return table.to_pylist()


# ---------------------------------------------------------------------------------------------- MSL

MSL_TRAIN = [
    "0042MR0001830110101823Q01_DRCL.jpg 2",
    "0042MR0001830110101823Q01_DRCL-fh.jpg 2",
    "0042MR0001830110101823Q01_DRCL-r90.jpg 2",
    "0003ML0000000110100031E01_DRCL.jpg 3",
    "0003ML0000000110100031E01_DRCL-r270.jpg 3",
    "0041ML0001800030101349I01_DRCL.jpg 2",
    "calibrated/0071MR0005220000103855E01_DRCL.JPG 15",  # v1 form, file lives in calibrated/
    "calibrated/0165MH0001880200102035P01_DRCL.JPG 0",  # v1 form, falls back to images/<name>.jpg
]
MSL_VAL = ["1000MR0044410000402393E01_DRCL.jpg 3", "1001ML0044500010404022I01_DRCL.jpg 18"]
MSL_TEST = ["2000MR0106580000900410E01_DRCL.jpg 3", "2001MH0001910000801001C00_DRCL.jpg 3",
            "2002ML0105640000900139I01_DRCL.jpg 16"]


def make_msl(root: Path) -> Path:
    """An MSL v2.1 tree: headerless class map, whitespace label lines, images/ flat, one older v1 line."""
    ds = root / formats.MSL_DIR
    _write(ds / "class_map.csv", [f"{i},{name}" for i, name in enumerate(MSL_CLASSES)])
    _write(ds / "train-set-v2.1.txt", MSL_TRAIN)
    _write(ds / "val-set-v2.1.txt", MSL_VAL)
    (ds / "test-set-v2.1.txt").write_text("\r\n".join(MSL_TEST) + "\r\n\r\n")  # CRLF and a blank line
    for line in MSL_TRAIN + MSL_VAL + MSL_TEST:
        name = line.split()[0]
        if name.startswith("calibrated/0071"):
            _image(ds / name)
        elif name.startswith("calibrated/"):  # v2.1 ships lower-case .jpg where v1 lists say .JPG
            _image(ds / "images" / os.path.basename(name).replace(".JPG", ".jpg"))
        else:
            _image(ds / "images" / os.path.basename(name))
    return ds


def test_msl_counts_classes_and_groups(tmp_path):
    ds = make_msl(tmp_path)
    table = read_msl(ds)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert class_names(table) == MSL_CLASSES
    rows = _rows(table)
    assert Counter(r["split"] for r in rows) == {"train": 8, "val": 2, "test": 3}
    expected = Counter()
    for split, lines in (("train", MSL_TRAIN), ("val", MSL_VAL), ("test", MSL_TEST)):
        expected.update((split, int(line.split()[1])) for line in lines)
    assert Counter((r["split"], r["label"]) for r in rows) == expected
    by_id = {r["image_id"]: r for r in rows}
    assert by_id["0042MR0001830110101823Q01_DRCL-r90"]["group_id"] == "0042MR0001830110101823Q01_DRCL"
    assert by_id["0003ML0000000110100031E01_DRCL-r270"]["group_id"] == "0003ML0000000110100031E01_DRCL"
    assert by_id["0041ML0001800030101349I01_DRCL"]["group_id"] == "0041ML0001800030101349I01_DRCL"
    assert by_id["0071MR0005220000103855E01_DRCL"]["path"] == str(ds / "calibrated/0071MR0005220000103855E01_DRCL.JPG")
    assert by_id["0165MH0001880200102035P01_DRCL"]["path"] == str(ds / "images/0165MH0001880200102035P01_DRCL.jpg")
    assert all(os.path.isabs(r["path"]) and os.path.isfile(r["path"]) for r in rows)
    assert {r["domain"] for r in rows} == {"msl"}
    assert all(math.isnan(r["x"]) and r["traverse"] == -1 for r in rows)
    assert table.schema.metadata[b"raysys.duplicates"] == b"0"


def test_msl_parent_folder_and_repeats_are_kept(tmp_path, caplog):
    ds = make_msl(tmp_path)
    _write(ds / "val-set-v2.1.txt", MSL_VAL + [MSL_VAL[0]])
    with caplog.at_level(logging.WARNING, logger="raysys.data.formats"):
        table = read_msl(tmp_path)  # the folder the zip was unpacked into
    assert table.num_rows == len(MSL_TRAIN) + len(MSL_VAL) + 1 + len(MSL_TEST)
    assert table.schema.metadata[b"raysys.duplicates"] == b"1"
    assert "repeat 1 rows" in caplog.text


def test_msl_missing_images_names_count_and_first_three(tmp_path):
    ds = make_msl(tmp_path)
    ghosts = [f"09{i}0MR0000000000000000E01_DRCL.jpg" for i in range(5)]
    _write(ds / "test-set-v2.1.txt", MSL_TEST + [f"{g} 4" for g in ghosts])
    with pytest.raises(DataError) as err:
        read_msl(ds)
    msg = _one_line(err)
    assert "5 images" in msg and "do not exist" in msg
    assert all(g in msg for g in ghosts[:3]) and ghosts[3] not in msg


def test_msl_malformed_line_gives_file_and_line(tmp_path):
    ds = make_msl(tmp_path)
    _write(ds / "val-set-v2.1.txt", [MSL_VAL[0], "1001ML0044500010404022I01_DRCL.jpg", MSL_VAL[1]])
    with pytest.raises(DataError) as err:
        read_msl(ds)
    msg = _one_line(err)
    assert "val-set-v2.1.txt:2" in msg and "<filename> <class_id>" in msg


def test_msl_class_id_outside_class_map(tmp_path):
    ds = make_msl(tmp_path)
    _write(ds / "val-set-v2.1.txt", [MSL_VAL[0], "1001ML0044500010404022I01_DRCL.jpg 19"])
    with pytest.raises(DataError) as err:
        read_msl(ds)
    msg = _one_line(err)
    assert "val-set-v2.1.txt:2" in msg and "class id 19" in msg and "class_map.csv" in msg


def test_missing_path_error(tmp_path):
    with pytest.raises(DataError) as err:
        read_msl(tmp_path / "nowhere")
    msg = _one_line(err)
    assert "does not exist" in msg and "--data" in msg
    with pytest.raises(DataError):
        read_manifest(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------- HiRISE

HIRISE_SPLIT = [
    "ESP_013049_0950_RED-0067.jpg 7 train",
    "ESP_013049_0950_RED-0067-fv.jpg 7 train",
    "ESP_013049_0950_RED-0067-brt.jpg 7 train",
    "ESP_013049_0950_RED-0067-fv.jpg 7 train",  # repeat (upsampled minority class)
    "ESP_013049_0950_RED-0067.jpg 7 train",  # repeat
    "PSP_001414_1780_RED-0001.jpg 0 train",
    "PSP_001414_1780_RED-0001-r180.jpg 0 train",
    "ESP_011623_2100_RED-0069.jpg 1 val",
    "ESP_011623_2100_RED-0069-r90.jpg 1 val",
    "ESP_018707_2205_RED-0041.jpg 4 test",
    "ESP_012345_1234_RED-0002.jpg 0 test",
]


def make_hirise(root: Path, header: bool = False) -> Path:
    """A HiRISE v3.2 tree: map-proj-v3_2/ grayscale JPEGs, split file with repeats, both label files."""
    root.mkdir(parents=True, exist_ok=True)
    _write(root / formats.HIRISE_CLASS_MAP,
           (["class_id,class_name"] if header else []) + [f"{i},{n}" for i, n in enumerate(HIRISE_CLASSES)])
    _write(root / formats.HIRISE_SPLIT_LABELS, HIRISE_SPLIT)
    unique = list(dict.fromkeys(line.rsplit(" ", 1)[0] for line in HIRISE_SPLIT))
    _write(root / formats.HIRISE_LABELS, unique)
    for line in unique:
        _image(root / formats.HIRISE_IMAGES / line.split()[0], mode="L")
    return root


@pytest.mark.parametrize("header", [False, True])
def test_hirise_repeats_kept_and_counted(tmp_path, header):
    ds = make_hirise(tmp_path / formats.HIRISE_DIR, header=header)
    table = read_hirise(ds)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert class_names(table) == HIRISE_CLASSES
    assert table.num_rows == len(HIRISE_SPLIT)
    assert table.schema.metadata[b"raysys.duplicates"] == b"2"
    rows = _rows(table)
    assert Counter(r["split"] for r in rows) == {"train": 7, "val": 2, "test": 2}
    assert Counter((r["split"], r["label"]) for r in rows) == Counter(
        (line.split()[2], int(line.split()[1])) for line in HIRISE_SPLIT)
    groups = {r["image_id"]: r["group_id"] for r in rows}
    assert groups["ESP_013049_0950_RED-0067-fv"] == "ESP_013049_0950_RED-0067"
    assert groups["ESP_013049_0950_RED-0067-brt"] == "ESP_013049_0950_RED-0067"
    assert groups["PSP_001414_1780_RED-0001-r180"] == "PSP_001414_1780_RED-0001"
    assert groups["ESP_011623_2100_RED-0069-r90"] == "ESP_011623_2100_RED-0069"
    assert groups["ESP_018707_2205_RED-0041"] == "ESP_018707_2205_RED-0041"
    assert {r["domain"] for r in rows} == {"hirise"}


def test_hirise_dedupe_keeps_first_of_each_name(tmp_path):
    ds = make_hirise(tmp_path / "somewhere")
    table = read_hirise(ds, dedupe=True)
    names = [line.split()[0] for line in HIRISE_SPLIT]
    assert table.num_rows == len(set(names)) == len(HIRISE_SPLIT) - 2
    assert [os.path.basename(p) for p in table.column("path").to_pylist()] == list(dict.fromkeys(names))
    assert table.schema.metadata[b"raysys.duplicates"] == b"2"
    assert Counter(table.column("split").to_pylist()) == {"train": 5, "val": 2, "test": 2}


def test_hirise_without_split_file_is_unlabeled_split_with_labels(tmp_path):
    ds = make_hirise(tmp_path / "h")
    (ds / formats.HIRISE_SPLIT_LABELS).unlink()
    table = read_manifest(ds)
    rows = _rows(table)
    assert len(rows) == len(set(line.split()[0] for line in HIRISE_SPLIT))
    assert {r["split"] for r in rows} == {"unlabeled"}
    assert {r["image_id"]: r["label"] for r in rows}["ESP_018707_2205_RED-0041"] == 4


def test_hirise_bad_split_value(tmp_path):
    ds = make_hirise(tmp_path / "h")
    _write(ds / formats.HIRISE_SPLIT_LABELS, HIRISE_SPLIT[:3] + ["ESP_011623_2100_RED-0069.jpg 1 validation"])
    with pytest.raises(DataError) as err:
        read_hirise(ds)
    msg = _one_line(err)
    assert f"{formats.HIRISE_SPLIT_LABELS}:4" in msg and "<split>" in msg


def test_hirise_class_map_gap_is_rejected(tmp_path):
    ds = make_hirise(tmp_path / "h")
    _write(ds / formats.HIRISE_CLASS_MAP, ["0,other", "2,dark dune"])
    with pytest.raises(DataError) as err:
        read_hirise(ds)
    assert "consecutive ids" in _one_line(err)


# ---------------------------------------------------------------------------------------------- ImageFolder


def make_imagefolder(root: Path) -> Path:
    for rel in ("sand/a.png", "sand/b.JPG", "craters/c.jpg", "craters/deep/d.png", "rocks/a.png"):
        _image(root / rel)
    (root / "rocks" / "notes.txt").write_text("not an image")
    _image(root / "__MACOSX" / "sand" / "._a.png")  # archive junk, never a class
    return root


def test_imagefolder_alphabetical_class_ids(tmp_path):
    root = make_imagefolder(tmp_path / formats.DIVERSE_DIR)
    table = read_imagefolder(root)
    assert table.schema.equals(MANIFEST_SCHEMA)
    assert class_names(table) == ["craters", "rocks", "sand"]
    got = {r["image_id"]: r["label"] for r in _rows(table)}
    assert got == {"craters/c": 0, "craters/deep/d": 0, "rocks/a": 1, "sand/a": 2, "sand/b": 2}
    assert set(table.column("split").to_pylist()) == {"train"}
    assert set(table.column("domain").to_pylist()) == {"diverse"}


def test_imagefolder_empty_class_folder(tmp_path):
    root = make_imagefolder(tmp_path / "d")
    (root / "dust").mkdir()
    with pytest.raises(DataError) as err:
        read_imagefolder(root)
    assert "dust" in _one_line(err) and "holds no images" in str(err.value)


# ---------------------------------------------------------------------------------------------- folder

ROVER_NAMES = ["t00_f000.png", "t00_f001.png", "t01_f000.jpg", "t01_f001.JPEG"]


def make_rover(root: Path) -> Path:
    for name in ROVER_NAMES:
        _image(root / "images" / name)
    (root / "images" / "readme.txt").write_text("x")
    _write(root / "positions.csv", [
        "name,x,y,heading,traverse,frame",
        "t00_f000.png,1.5,-2.0,90,0,0",
        "images/t00_f001.png,3.0,4.0,,0,1",  # relative to the CSV's folder, heading unknown
        "t01_f000.jpg,10,20,180,1,0",
        "not_there.png,0,0,0,9,9",
    ])  # t01_f001.JPEG has no row
    _write(root / "hidden-labels.csv", ["name,label", "t00_f000.png,3", "t00_f001.png,3", "t01_f000.jpg,14"])
    return root


def test_folder_positions_joined_by_name(tmp_path, caplog):
    root = make_rover(tmp_path / formats.ROVER_DIR)
    with caplog.at_level(logging.WARNING, logger="raysys.data.formats"):
        table = read_folder(root)
    assert table.schema.equals(MANIFEST_SCHEMA)
    rows = {r["image_id"]: r for r in _rows(table)}
    assert sorted(rows) == sorted(os.path.splitext(n)[0] for n in ROVER_NAMES)
    assert (rows["t00_f000"]["x"], rows["t00_f000"]["y"], rows["t00_f000"]["heading"]) == (1.5, -2.0, 90.0)
    assert (rows["t00_f001"]["x"], rows["t00_f001"]["y"], rows["t00_f001"]["frame"]) == (3.0, 4.0, 1)
    assert math.isnan(rows["t00_f001"]["heading"])
    assert (rows["t01_f000"]["traverse"], rows["t01_f000"]["frame"]) == (1, 0)
    lost = rows["t01_f001"]
    assert math.isnan(lost["x"]) and math.isnan(lost["y"]) and lost["traverse"] == -1
    assert table.schema.metadata[b"raysys.missing_positions"] == b"1"
    assert sum("no row in" in rec.message for rec in caplog.records) == 1
    assert {r["split"] for r in rows.values()} == {"unlabeled"}
    assert {r["label"] for r in rows.values()} == {-1}
    assert class_names(table) == []


def test_folder_hidden_labels_and_no_positions(tmp_path):
    root = make_rover(tmp_path / "r")
    table = read_folder(root, positions=None, hidden_labels=True, domain="curiosity")
    rows = {r["image_id"]: r for r in _rows(table)}
    assert {k: r["label"] for k, r in rows.items()} == {"t00_f000": 3, "t00_f001": 3, "t01_f000": 14, "t01_f001": -1}
    assert all(math.isnan(r["x"]) for r in rows.values())
    assert {r["domain"] for r in rows.values()} == {"curiosity"}
    assert {r["split"] for r in rows.values()} == {"unlabeled"}


def test_folder_explicit_positions_and_flat_recursive(tmp_path):
    root = tmp_path / "flat"
    _image(root / "a.png")
    _image(root / "sub" / "b.tif")
    csv_path = _write(tmp_path / "pos.csv", ["name,y,x", "sub/b.tif,7,8"])
    table = read_folder(root, positions=csv_path)
    rows = {r["image_id"]: r for r in _rows(table)}
    assert sorted(rows) == ["a", "sub/b"]
    assert (rows["sub/b"]["x"], rows["sub/b"]["y"]) == (8.0, 7.0)
    assert math.isnan(rows["a"]["x"])


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        read_folder(tmp_path / "empty")
    assert "no image files" in _one_line(err)
    with pytest.raises(DataError) as err:
        detect_format(tmp_path / "empty")
    assert "is empty" in _one_line(err)
    root = make_rover(tmp_path / "r")
    with pytest.raises(DataError) as err:
        read_folder(root, positions=tmp_path / "nope.csv")
    assert "does not exist" in _one_line(err)
    _write(root / "positions.csv", ["t00_f000.png,1,2"])
    with pytest.raises(DataError) as err:
        read_folder(root)
    assert "header" in _one_line(err)
    _write(root / "positions.csv", ["name,x,y", "t00_f000.png,1,two"])
    with pytest.raises(DataError) as err:
        read_folder(root)
    assert "positions.csv:2" in _one_line(err)
    twins = tmp_path / "twins"
    _image(twins / "day1" / "a.png")
    _image(twins / "day2" / "a.png")
    _write(twins / "positions.csv", ["name,x,y", "a.png,1,2"])
    with pytest.raises(DataError) as err:
        read_folder(twins)
    assert "matches 2 images" in _one_line(err)
    (root / "hidden-labels.csv").unlink()
    with pytest.raises(DataError) as err:
        read_folder(root, positions=None, hidden_labels=True)
    assert "hidden-labels.csv" in _one_line(err)


# ---------------------------------------------------------------------------------------------- detection


def test_detect_format_each_layout(tmp_path):
    msl = make_msl(tmp_path / "m")
    hirise = make_hirise(tmp_path / "h" / formats.HIRISE_DIR)
    diverse = make_imagefolder(tmp_path / "d")
    rover = make_rover(tmp_path / "r")
    flat = tmp_path / "flat"
    _image(flat / "x.bmp")
    assert detect_format(msl) == "msl"
    assert detect_format(tmp_path / "m") == "msl"  # parent of msl-labeled-data-set-v2.1/
    assert detect_format(hirise) == "hirise"
    assert detect_format(tmp_path / "h") == "hirise"
    assert detect_format(diverse) == "imagefolder"
    assert detect_format(rover) == "folder"
    assert detect_format(flat) == "folder"
    assert read_manifest(tmp_path / "h").num_rows == len(HIRISE_SPLIT)
    assert read_manifest(tmp_path / "h", dedupe=True).num_rows == len(HIRISE_SPLIT) - 2
    assert class_names(read_manifest(diverse)) == ["craters", "rocks", "sand"]
    # an ImageFolder read as a plain folder: override wins, labels unknown
    as_folder = read_manifest(diverse, format="folder")
    assert as_folder.num_rows == 5 and set(as_folder.column("label").to_pylist()) == {-1}


def test_detect_format_errors(tmp_path):
    _write(tmp_path / "odd" / "notes.txt", ["hello"])
    with pytest.raises(DataError) as err:
        detect_format(tmp_path / "odd")
    msg = _one_line(err)
    assert "no supported layout" in msg and "notes.txt" in msg and "MSL" in msg and "HiRISE" in msg
    make_msl(tmp_path / "both")
    make_hirise(tmp_path / "both" / formats.HIRISE_DIR)
    with pytest.raises(DataError) as err:
        detect_format(tmp_path / "both")
    assert "several datasets" in _one_line(err)
    with pytest.raises(DataError) as err:
        read_manifest(tmp_path / "odd", format="coco")
    assert "unknown format" in _one_line(err)


def test_discover_all_four(tmp_path):
    make_msl(tmp_path)
    make_hirise(tmp_path / formats.HIRISE_DIR)
    make_imagefolder(tmp_path / formats.DIVERSE_DIR)
    make_rover(tmp_path / formats.ROVER_DIR)
    (tmp_path / "runs").mkdir()
    found = discover(tmp_path)
    assert found == {
        "msl": tmp_path / formats.MSL_DIR,
        "hirise": tmp_path / formats.HIRISE_DIR,
        "rover": tmp_path / formats.ROVER_DIR,
        "diverse": tmp_path / formats.DIVERSE_DIR,
    }


def test_discover_by_content(tmp_path):
    make_hirise(tmp_path)  # the HiRISE zip unpacked straight into the root
    make_msl(tmp_path / "downloads")  # MSL under another name, one level down
    found = discover(tmp_path)
    assert found == {"hirise": tmp_path, "msl": tmp_path / "downloads" / formats.MSL_DIR}


# ---------------------------------------------------------------------------------------------- simulator


def _count_lines(path: Path) -> Counter:
    counts = Counter()
    for line in path.read_text().splitlines():
        fields = line.split()
        if fields:
            counts[fields[2] if len(fields) == 3 else path.name] += 1
    return counts


def test_reads_simulator_smoke_output(tmp_path):
    simulate = pytest.importorskip(
        "raysys.data.simulate", reason="raysys/data/simulate.py (the built-in simulator) is not written yet")
    simulate.simulate(tmp_path, preset="smoke", seed=0, progress=False)
    found = discover(tmp_path)
    assert set(found) == {"msl", "hirise", "rover", "diverse"}

    msl = read_manifest(found["msl"])
    assert detect_format(found["msl"]) == "msl"
    splits = Counter(msl.column("split").to_pylist())
    for split, name in formats.MSL_SPLIT_FILES.items():
        assert splits[split] == sum(1 for line in (found["msl"] / name).read_text().splitlines() if line.strip())
    class_rows = [line for line in (found["msl"] / "class_map.csv").read_text().splitlines() if line.strip()]
    assert class_names(msl) == [line.split(",", 1)[1] for line in class_rows]

    hirise = read_manifest(found["hirise"])
    assert Counter(hirise.column("split").to_pylist()) == _count_lines(found["hirise"] / formats.HIRISE_SPLIT_LABELS)

    rover = read_manifest(found["rover"], format="folder")
    on_disk = [n for _, _, files in os.walk(found["rover"]) for n in files
               if os.path.splitext(n)[1].lower() in formats.IMAGE_EXTENSIONS]
    assert rover.num_rows == len(on_disk)

    diverse = read_manifest(found["diverse"], format="imagefolder")
    per_class = Counter(Path(p).relative_to(found["diverse"]).parts[0] for p in diverse.column("path").to_pylist())
    for name in class_names(diverse):
        assert per_class[name] == sum(1 for _, _, files in os.walk(found["diverse"] / name) for f in files
                                      if os.path.splitext(f)[1].lower() in formats.IMAGE_EXTENSIONS)
    assert json.loads(diverse.schema.metadata[b"raysys.classes"]) == sorted(per_class)
