"""``raysys positions``: a hand-written Mars 2020 raw-image metadata sample -> a sidecar that the folder
reader accepts, with hand-computed positions, frame order and the malformed records reported by line."""

from __future__ import annotations

import argparse
import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import FIXTURES
from PIL import Image

from raysys.config import ConfigError
from raysys.data import formats
from raysys.data import positions as pos
from raysys.errors import run_command

SAMPLE = FIXTURES / "raw-image-metadata-sample.jsonl"
CELL = pos.SITE_SPACING  # 5 km; sites 4 and 5 sit in grid cells (4, 0) and (5, 0)

# Hand-computed from the sample: x = xyz.x + site * 5 km (sites < 32: first grid row), y = xyz.y; frames ordered by (site, drive, sclk);
# mastAz -30 -> 330; "UNK" and an absent mastAz -> no heading. Lines 4 (bad xyz) and 8 (no site) skipped.
EXPECTED = [  # (image id, x, y, heading, traverse, frame)
    ("NLF_0099_0675740000_114ECM_N0040000NCAM00200_01_295J", 4 * CELL + 0.0, 0.0, 330.0, 4, 0),
    ("NLF_0100_0675828717_276ECM_N0040218NCAM00503_01_295J", 4 * CELL + 10.5, -3.25, 78.7995, 4, 1),
    ("NRF_0100_0675828800_276ECM_N0040218NCAM00503_01_295J", 4 * CELL + 10.5, -3.25, 120.5, 4, 2),
    ("NLF_0101_0675917000_190ECM_N0040300NCAM00101_01_295J", 4 * CELL + 25.75, -8.5, math.nan, 4, 3),
    ("NLF_0102_0676005000_700ECM_N0050000NCAM00200_01_295J", 5 * CELL + 0.0, 0.0, 200.0, 5, 0),
    ("NRF_0102_0676005900_700ECM_N0050042NCAM00300_01_295J", 5 * CELL + 4.5, 1.5, 350.25, 5, 1),
    ("NLF_0102_0676006000_700ECM_N0050042NCAM00300_01_295J", 5 * CELL + 4.5, 1.5, 10.0, 5, 2),
    ("FLF_0103_0676095000_110ECM_N0050120FHAZ00200_01_295J", 5 * CELL + 9.0, 6.0, math.nan, 5, 3),
]
BAD_LINES = {4: "xyz '(12.0,abc,0.1)' is not three numbers", 8: "no 'site'"}


def read_csv(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def sample_records() -> list[dict]:
    return [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]


def write_images(folder: Path, names) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.new("RGB", (4, 4), (120, 90, 60)).save(folder / name)


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, abs=1e-4)


# ----------------------------------------------------------------------------- rows and problems


def test_sample_gives_hand_computed_rows_and_reports_bad_lines(tmp_path):
    result = pos.build_positions(SAMPLE, tmp_path / "positions.csv")
    rows = read_csv(result["out"])
    assert list(rows[0]) == ["name", "x", "y", "heading", "traverse", "frame"]
    assert [r["name"] for r in rows] == [e[0] + ".png" for e in EXPECTED]
    for row, (_, x, y, heading, traverse, frame) in zip(rows, EXPECTED):
        assert float(row["x"]) == pytest.approx(x, abs=1e-4) and float(row["y"]) == pytest.approx(y, abs=1e-4)
        assert same(float(row["heading"]) if row["heading"] else math.nan, heading)
        assert (int(row["traverse"]), int(row["frame"])) == (traverse, frame)
    problems = {str(p.where): p.reason for p in result["problems"]}
    assert problems == {f"{SAMPLE}:line {n}": reason for n, reason in BAD_LINES.items()}


def test_sidecar_is_accepted_by_the_folder_reader(tmp_path):
    folder = tmp_path / "rover"
    write_images(folder / "images", [e[0] + ".png" for e in EXPECTED])
    out = pos.build_positions(SAMPLE, folder / "positions.csv")["out"]
    table = formats.read_folder(folder, positions=out)
    meta = table.schema.metadata
    assert meta[formats.META_MISSING_POSITIONS] == b"0"
    by_id = {r["image_id"]: r for r in table.to_pylist()}
    assert len(by_id) == len(EXPECTED)
    for image_id, x, y, heading, traverse, frame in EXPECTED:
        r = by_id[image_id]
        assert r["x"] == pytest.approx(x, abs=1e-4) and r["y"] == pytest.approx(y, abs=1e-4)
        assert same(r["heading"], heading)
        assert (r["traverse"], r["frame"]) == (traverse, frame)


def test_images_folder_matches_by_imageid_and_reports_missing_files(tmp_path):
    # Downloaded as JPEG under per-sol subfolders: the URL's .png name does not exist, the imageid does.
    images = tmp_path / "dl"
    present = EXPECTED[:-1]
    for e in present:
        write_images(images / f"sol{e[0][4:8]}", [e[0] + ".JPG"])
    result = pos.build_positions(SAMPLE, images=images)
    assert result["out"] == images / formats.POSITIONS_FILE
    names = [r["name"] for r in read_csv(result["out"])]
    assert names == [f"sol{e[0][4:8]}/{e[0]}.JPG" for e in present]
    reasons = [p.reason for p in result["problems"]]
    assert len(reasons) == 3 and reasons[-1].startswith(f"no image file '{EXPECTED[-1][0]}.png'")
    table = formats.read_folder(images, positions="auto")  # names relative to the image folder resolve
    assert table.schema.metadata[formats.META_MISSING_POSITIONS] == b"0"
    assert not np.isnan(table.column("x").to_numpy()).any()


def test_records_without_url_need_the_images_folder(tmp_path):
    records = sample_records()
    for r in records:
        del r["image_files"]
    (tmp_path / "nourl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    images = tmp_path / "images"
    write_images(images, [e[0] + ".png" for e in EXPECTED])
    result = pos.build_positions(tmp_path / "nourl.jsonl", images=images)
    assert [r["name"] for r in read_csv(result["out"])] == [e[0] + ".png" for e in EXPECTED]
    with pytest.raises(ConfigError, match="no image URL; pass --images"):
        pos.build_positions(tmp_path / "nourl.jsonl", tmp_path / "p.csv")


def test_json_list_and_items_object_give_the_same_rows_with_index_labels(tmp_path):
    records = sample_records()
    expected = read_csv(pos.build_positions(SAMPLE, tmp_path / "a.csv")["out"])
    shapes = (("list.json", records, "[{}]"), ("items.json", {"items": records, "more": False}, "items[{}]"),
              ("m2020.json", {"images": records, "per_page": 10}, "images[{}]"))
    for name, doc, label in shapes:
        (tmp_path / name).write_text(json.dumps(doc, indent=1))
        result = pos.build_positions(tmp_path / name, tmp_path / f"{name}.csv")
        assert read_csv(result["out"]) == expected
        # Lines 4 and 8 of the JSON-lines file are list entries 3 and 7.
        assert [p.where for p in result["problems"]] == [f"{tmp_path / name}:{label.format(i)}" for i in (3, 7)]


def test_msl_shape_top_level_fields_and_traverse_by_sol(tmp_path):
    base = "https://mars.nasa.gov/msl-raw-images/proj/msl/redops/ods/surface/sol/01800/opgs/edr/ncam/"
    items = [
        {"imageid": "NLB_2", "sol": 1801, "site": 72, "drive": 1250, "xyz": "(22.5, -45.75, -0.8)",
         "url": base + "NLB_2.JPG", "extended": {"mast_az": "370.5", "sclk": 20.0}},
        {"imageid": "NLB_1", "sol": 1800, "site": 72, "drive": 1244, "xyz": [20.0, -40.0, -0.8],
         "url": base + "NLB_1.JPG?x=1", "spacecraft_clock": 10.0},
        {"imageid": "NLB_3", "sol": 1800, "site": 72, "drive": 1244.5, "xyz": "(1,2,3)", "url": base + "NLB_3.JPG"},
        {"imageid": "NLB_4", "site": 72, "drive": 1260, "xyz": "(1,2,3)", "url": base + "NLB_4.JPG"},
        {"imageid": "NLB_5", "sol": 1802, "site": 73, "drive": 2, "xyz": "(1,-600,3)", "url": base + "NLB_5.JPG"},
    ]
    (tmp_path / "msl.json").write_text(json.dumps({"items": items}))
    result = pos.build_positions(tmp_path / "msl.json", tmp_path / "p.csv", traverse_by="sol", site_spacing=1000.0)
    rows = read_csv(result["out"])
    # Site 72 is grid cell (72 % 32, 72 // 32) = (8, 2): origin (8000, 2000) m at 1 km spacing.
    assert [(r["name"], r["x"], r["y"], r["heading"], r["traverse"], r["frame"]) for r in rows] == [
        ("NLB_1.JPG", "8020.0000", "1960.0000", "", "1800", "0"),
        ("NLB_2.JPG", "8022.5000", "1954.2500", "10.5000", "1801", "0"),
    ]
    reasons = [p.reason for p in result["problems"]]
    assert reasons[:2] == ["drive 1244.5 is not an integer", "no 'sol'"]
    assert reasons[2].startswith("xyz '(1,-600,3)' lies 600 m from its site's origin") and len(reasons) == 3
    assert pos.site_origin(72, 1000.0) == (8000.0, 2000.0) and pos.site_origin(72, 0.0) == (0.0, 0.0)


def test_repeated_image_keeps_the_first_record(tmp_path):
    lines = SAMPLE.read_text().splitlines()
    (tmp_path / "twice.jsonl").write_text("\n".join(lines + lines[:1]) + "\n")
    result = pos.build_positions(tmp_path / "twice.jsonl", tmp_path / "p.csv")
    assert len(result["rows"]) == len(EXPECTED)
    last = result["problems"][-1]
    assert last.where.endswith(":line 11") and "repeats the record at" in last.reason


# ----------------------------------------------------------------------------- errors and atomic output


@pytest.mark.parametrize("text", ["", "\n\n", "{not json\n[also not\n", '"a string"',
                                  '{"site": 1}\n{"drive": 2, "xyz": "(1,2,3)"}\n'])
def test_unusable_files_are_one_line_config_errors_and_leave_output_untouched(tmp_path, text):
    (tmp_path / "bad.jsonl").write_text(text)
    out = tmp_path / "positions.csv"
    out.write_text("old\n")
    with pytest.raises(ConfigError) as info:
        pos.build_positions(tmp_path / "bad.jsonl", out)
    assert "\n" not in str(info.value) and "bad.jsonl" in str(info.value)
    assert out.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "positions.csv"]


def test_invalid_json_line_is_reported_not_fatal(tmp_path):
    lines = SAMPLE.read_text().splitlines()
    lines.insert(1, '{"site": 4, "drive": ')
    (tmp_path / "m.jsonl").write_text("\n".join(lines) + "\n")
    result = pos.build_positions(tmp_path / "m.jsonl", tmp_path / "p.csv")
    assert len(result["rows"]) == len(EXPECTED)
    assert result["problems"][0].where.endswith(":line 2") and "not valid JSON" in result["problems"][0].reason


def test_output_replaced_atomically_without_temporary_files(tmp_path):
    out = tmp_path / "positions.csv"
    out.write_text("stale\n")
    pos.build_positions(SAMPLE, out)
    assert out.read_text().startswith("name,x,y,heading,traverse,frame\n")
    assert [p.name for p in tmp_path.iterdir()] == ["positions.csv"]


def test_parse_xyz():
    assert pos.parse_xyz("(35.1,-2.3,0.5)") == (35.1, -2.3, 0.5)
    assert pos.parse_xyz(" ( 1, 2 ,3 ) ") == (1.0, 2.0, 3.0)
    assert pos.parse_xyz([1, 2, 3]) == (1.0, 2.0, 3.0)
    for bad in ("(1,2)", "(1,2,3,4)", "(1,nan,3)", "(1,x,3)", None, [1, None, 2]):
        with pytest.raises(ValueError):
            pos.parse_xyz(bad)


# ----------------------------------------------------------------------------- command line


def cli_args(*argv) -> argparse.Namespace:
    return pos.configure_parser(argparse.ArgumentParser()).parse_args(list(argv))


def test_cli_writes_the_sidecar_and_lists_skipped_records(tmp_path, capsys):
    out = tmp_path / "positions.csv"
    assert pos.run(cli_args(str(SAMPLE), "--out", str(out))) == 0
    captured = capsys.readouterr()
    assert len(read_csv(out)) == len(EXPECTED)
    assert "wrote 8 positions in 2 traverses" in captured.out and "(2 records skipped)" in captured.out
    assert captured.err.count("skipped") == 2 and f"{SAMPLE}:line 4: xyz" in captured.err


def test_cli_errors_exit_2_with_one_line(tmp_path, capsys):
    assert run_command("raysys positions", pos.run, cli_args(str(SAMPLE))) == 2  # neither --out nor --images
    assert run_command("raysys positions", pos.run, cli_args(str(tmp_path / "nope.json"), "--out", str(tmp_path / "p.csv"))) == 2
    assert run_command("raysys positions", pos.run, cli_args(str(SAMPLE), "--images", str(tmp_path / "nodir"))) == 2
    assert run_command("raysys positions", pos.run, cli_args(str(SAMPLE), "--out", str(tmp_path / "p.csv"), "--site-spacing", "-1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("raysys positions: error: ") for line in err)
    assert not (tmp_path / "p.csv").exists()
