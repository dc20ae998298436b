"""What a run pretrains on: the pool folder whatever its name, never a benchmark's val or test images unless
asked, and one line per source. The references are the label files and folders the tests write."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from test_formats import MSL_TEST, MSL_VAL, _image, _one_line, make_hirise, make_imagefolder, make_msl

from raysys.config import make_config
from raysys.data import formats
from raysys.data.sources import cluster_pool, data_sources
from raysys.errors import ConfigError


def _pool(folder: Path, n: int) -> Path:
    for i in range(n):
        _image(folder / f"crop_{i:03d}.png")
    return folder


def _cfg(data: Path, **kw):
    return make_config("smoke", data=str(data), batch_size=2, max_images=None, **kw)


def _eval_names() -> set[str]:
    """The MSL fixture's val and test image names, read from its own label lines."""
    return {os.path.basename(line.split()[0]) for line in MSL_VAL + MSL_TEST}


def test_an_arbitrarily_named_folder_is_the_pool_and_each_source_has_its_line(tmp_path):
    make_msl(tmp_path)
    make_hirise(tmp_path / formats.HIRISE_DIR)
    pool = _pool(tmp_path / "real-unlabeled", 5)
    (tmp_path / "notes").mkdir()  # a folder without images is no candidate
    sources = data_sources(_cfg(tmp_path))
    assert sorted(Path(p).parent for p in sources.manifest.column("path").to_pylist()) == [pool.resolve()] * 5
    pool_line, msl_line, hirise_line = sources.lines
    assert f"folder {pool.resolve()}" in pool_line and "5 images" in pool_line
    assert "MSL v2.1" in msl_line and "train 8 · val 2 · test 3 images" in msl_line
    assert "repeated" not in msl_line and "2 repeated label rows kept as listed" in hirise_line  # the fixture's 2
    assert set(sources.benchmarks) == {"msl", "hirise"}


def test_two_candidate_pools_are_refused_until_pool_picks_one(tmp_path):
    make_msl(tmp_path)
    _pool(tmp_path / "crops-a", 3)
    other = _pool(tmp_path / "crops-b", 4)
    with pytest.raises(ConfigError) as err:
        data_sources(_cfg(tmp_path))
    assert "crops-a/, crops-b/" in _one_line(err) and "--pool DIR" in _one_line(err)
    picked = data_sources(_cfg(tmp_path, pool="crops-b")).manifest  # relative to --data
    assert {Path(p).parent for p in picked.column("path").to_pylist()} == {other.resolve()}
    assert cluster_pool(_cfg(tmp_path, pool=str(other))).num_rows == 4  # `raysys cluster` takes the same pool


def test_no_val_or_test_image_is_pretrained_on_without_the_flag(tmp_path):
    msl = make_msl(tmp_path)
    # A benchmark with no pool beside it: its train split only.
    alone = data_sources(_cfg(msl))
    names = {os.path.basename(p) for p in alone.manifest.column("path").to_pylist()}
    assert not names & _eval_names() and set(alone.manifest.column("split").to_pylist()) == {"train"}
    assert "(train)" in alone.lines[0] and "5 of its 13 are benchmark val/test images and left out" in alone.lines[0]
    # A pool that is the benchmark's own image folder: its val/test files are left out by path.
    images = data_sources(_cfg(tmp_path, pool=str(msl / "images"))).manifest
    assert not {os.path.basename(p) for p in images.column("path").to_pylist()} & _eval_names()
    # Only the flag, named for what it does, lets them in -- and the line says what that costs.
    asked = data_sources(_cfg(msl, pretrain_on_eval_splits=True))
    assert {os.path.basename(p) for p in asked.manifest.column("path").to_pylist()} >= _eval_names()
    assert "overstate" in asked.lines[0]


def test_a_root_that_is_one_dataset_is_read_whole(tmp_path):
    """An ImageFolder's class folders are no candidate pools: the root is one dataset, as before."""
    root = make_imagefolder(tmp_path / "imagenet-like")
    manifest = data_sources(_cfg(root)).manifest
    assert manifest.num_rows == len(formats.read_imagefolder(root).column("path"))
    shutil.rmtree(root / sorted(os.listdir(root))[0])  # one class folder fewer: still the whole root
    assert data_sources(_cfg(root)).manifest.num_rows == formats.read_imagefolder(root).num_rows
