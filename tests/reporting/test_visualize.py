"""raysys visualize: stratified sampling and group de-duplication against hand counts, and a full run on a
tiny MSL benchmark and a tiny pool with hidden labels, whose PNG, CSV and TensorBoard projector files are
read back and compared with features computed independently from the saved model."""

from __future__ import annotations

import argparse
import csv
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from raysys import models
from raysys.config import ConfigError
from raysys.data import formats
from raysys.data.decode import load_images
from raysys.errors import run_command
from raysys.eval.features import extract_features
from raysys.models.io import load_model
from raysys.reporting import visualize as vis

torch.set_num_threads(1)

CLASSES = ["Arm cover", "Other rover part", "Artifact"]
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]
# Originals per split and class: 16 / 12 / 12 per class, 40 in all.
SPLITS = {"train": [8, 6, 6], "val": [2, 2, 2], "test": [6, 4, 4]}
IMAGE_SIZE = 16


def _save_image(path, label, rng):
    pixels = np.clip(np.array(COLOURS[label]) + rng.normal(0, 25, (20, 20, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels).save(path)


def write_msl(root):
    """A tiny MSL v2.1 benchmark; every train original also has a ``-fh`` copy (as in the real set)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    (root / "class_map.csv").write_text("".join(f"{i},{name}\n" for i, name in enumerate(CLASSES)))
    labels = {}
    for split, counts in SPLITS.items():
        lines = []
        for label, count in enumerate(counts):
            for k in range(count):
                stem = f"{split}{label}{k:02d}_DRCL"
                _save_image(root / "images" / f"{stem}.png", label, rng)
                lines.append(f"{stem}.png {label}")
                labels[stem] = label
                if split == "train":
                    _save_image(root / "images" / f"{stem}-fh.png", label, rng)
                    lines.append(f"{stem}-fh.png {label}")
        (root / f"{split}-set-v2.1.txt").write_text("\n".join(lines) + "\n")
    return labels


def save_run(run, config):
    """A tiny model in the trainer's ``model.pt`` format."""
    torch.manual_seed(0)
    model = models.ContrastiveModel("resnet18", width=0.125, small_stem=True)
    run.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "model_spec": model.spec, "config": config}, run / "model.pt")
    return run


@pytest.fixture(scope="module")
def msl_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("vis")
    msl = root / "msl-labeled-data-set-v2.1"
    labels = write_msl(msl)
    run = save_run(root / "run", {"image_size": IMAGE_SIZE})
    # The run's linear evaluation names its MSL benchmark: visualize's default dataset.
    (run / "eval-msl.json").write_text(json.dumps({"benchmark": str(msl)}))
    return run, msl, labels


@pytest.fixture(scope="module")
def msl_result(msl_run):
    run, _, _ = msl_run
    return vis.visualize(run, n=30, seed=3, thumb_size=IMAGE_SIZE, progress=False)


def read_tsv(path):
    return [line.split("\t") for line in path.read_text().splitlines()]


def projector_files(projector):
    """The files named by projector_config.pbtxt, resolved under the projector folder."""
    text = (projector / "projector_config.pbtxt").read_text()
    paths = dict(re.findall(r'(tensor_path|metadata_path|image_path): "([^"]+)"', text))
    dims = [int(d) for d in re.findall(r"single_image_dim: (\d+)", text)]
    return {k: projector / v for k, v in paths.items()}, dims


# ----------------------------------------------------------------------------- sampling


def test_stratified_sample_is_proportional_and_seeded():
    labels = np.array([0] * 20 + [1] * 10 + [2] * 10)
    rows = vis.stratified_sample(labels, 8, seed=1)
    assert len(set(rows.tolist())) == 8
    assert np.bincount(labels[rows]).tolist() == [4, 2, 2]  # 8 x 20/40, 8 x 10/40, 8 x 10/40
    assert np.array_equal(rows, vis.stratified_sample(labels, 8, seed=1))
    assert not np.array_equal(rows, vis.stratified_sample(labels, 8, seed=2))
    # A rare class keeps one image; the big one gives way (quotas 5.7, 0.3 -> 5, 1).
    rare = np.array([0] * 19 + [1])
    assert np.bincount(rare[vis.stratified_sample(rare, 6, seed=0)]).tolist() == [5, 1]
    assert vis.stratified_sample(labels, 100, seed=0).tolist() == list(range(40))


def test_one_per_group_keeps_originals(msl_run):
    _, msl, labels = msl_run
    manifest = formats.read_manifest(msl)
    kept = manifest.take(vis.one_per_group(manifest)).column("image_id").to_pylist()
    assert sorted(kept) == sorted(labels)  # every original once, no -fh copy
    assert manifest.num_rows == len(labels) + sum(SPLITS["train"])


def test_default_dataset_is_the_runs_msl_benchmark(msl_run, tmp_path):
    _, msl, _ = msl_run
    root = msl.parent
    (tmp_path / "eval-msl.json").write_text(json.dumps({"benchmark": str(tmp_path / "moved-away")}))
    assert vis.default_dataset(tmp_path, {"data": str(root)}) == msl  # stale eval path: the run's --data
    (tmp_path / "supervised.json").write_text(json.dumps({"benchmark": str(msl)}))
    assert vis.default_dataset(tmp_path, {}) == msl
    with pytest.raises(ConfigError, match="pass --data"):
        vis.default_dataset(tmp_path / "elsewhere", {})


# ----------------------------------------------------------------------------- a full run


def test_png_and_csv(msl_run, msl_result):
    run, _, labels = msl_run
    out = run / "visualize"
    assert msl_result["png"] == out / "tsne.png" and msl_result["n"] == 30
    with Image.open(out / "tsne.png") as img:
        img.load()
        assert img.format == "PNG" and img.width > 0 and img.height > 0
    with open(out / "tsne.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 30 and len({r["image_id"] for r in rows}) == 30
    assert all(r["image_id"] in labels for r in rows)  # originals only
    for r in rows:
        assert int(r["label"]) == labels[r["image_id"]] and r["class"] == CLASSES[int(r["label"])]
        assert math.isfinite(float(r["x"])) and math.isfinite(float(r["y"]))
    # 30 of 40 originals, classes of 16/12/12: quotas 12, 9, 9.
    assert np.bincount([int(r["label"]) for r in rows]).tolist() == [12, 9, 9]


def test_perplexity_is_clamped_below_n(msl_result):
    assert msl_result["perplexity"] == pytest.approx(29 / 3)


def test_projector_files(msl_run, msl_result):
    run, msl, labels = msl_run
    projector = run / "visualize" / "projector"
    files, dims = projector_files(projector)
    assert set(files) == {"tensor_path", "metadata_path", "image_path"}
    assert {p.name for p in files.values()} == {"tensors.tsv", "metadata.tsv", "sprite.png"}
    assert dims == [IMAGE_SIZE, IMAGE_SIZE]

    metadata = read_tsv(files["metadata_path"])
    assert metadata[0] == vis.METADATA_HEADER and len(metadata) == 31
    ids = [row[0] for row in metadata[1:]]
    for image_id, label, name, cluster, domain in metadata[1:]:
        assert int(label) == labels[image_id] and name == CLASSES[int(label)]
        assert cluster == "-1" and domain == "msl"

    # The tensor rows are the saved model's features of those images, in metadata order.
    tensors = np.array(read_tsv(files["tensor_path"]), dtype=np.float32)
    paths = [str(msl / "images" / f"{i}.png") for i in ids]
    images, kept, _ = load_images(paths, IMAGE_SIZE)
    expected = extract_features(load_model(run), images, progress=False)
    assert tensors.shape == (30, msl_result["feature_dim"]) and len(kept) == 30
    np.testing.assert_allclose(tensors, expected, rtol=1e-4, atol=1e-4)

    # The sprite is a ceil(sqrt(30)) = 6 x 6 grid of the thumbnails, in the same order.
    with Image.open(files["image_path"]) as img:
        sprite = np.asarray(img.convert("RGB"))
    assert sprite.shape == (6 * IMAGE_SIZE, 6 * IMAGE_SIZE, 3)
    for i in (0, 7, 29):
        tile = sprite[(i // 6) * IMAGE_SIZE : (i // 6 + 1) * IMAGE_SIZE, (i % 6) * IMAGE_SIZE : (i % 6 + 1) * IMAGE_SIZE]
        assert np.abs(tile.astype(int) - images[i].astype(int)).max() <= 1


def test_pool_with_hidden_labels_coloured_by_cluster(tmp_path, capsys):
    """A plain folder (the pretraining pool) with hidden labels, framed by cluster ids from a CSV whose
    image ids have leading zeros; thumbnails at another size than the model's input, through the CLI."""
    rng = np.random.default_rng(1)
    pool = tmp_path / "pool"
    pool.mkdir()
    hidden = {f"{i:04d}": i % 3 for i in range(24)}
    for image_id, label in hidden.items():
        _save_image(pool / f"{image_id}.png", label, rng)
    (pool / formats.HIDDEN_LABELS_FILE).write_text("name,label\n" + "".join(f"{i}.png,{l}\n" for i, l in hidden.items()))
    clusters = {image_id: int(image_id) % 4 for image_id in list(hidden)[:20]}  # four images have none
    (tmp_path / "clusters.csv").write_text("image_id,cluster_id\n" + "".join(f"{i},{c}\n" for i, c in clusters.items()))
    run = save_run(tmp_path / "run", {"image_size": IMAGE_SIZE})

    parser = vis.configure_parser(argparse.ArgumentParser())
    args = parser.parse_args([str(run), "--data", str(pool), "--color", "cluster", "--clusters",
                              str(tmp_path / "clusters.csv"), "-n", "24", "--out", str(tmp_path / "vis")])
    assert vis.run(args) == 0
    assert "tensorboard --logdir" in capsys.readouterr().out
    files, dims = projector_files(tmp_path / "vis" / "projector")
    metadata = read_tsv(files["metadata_path"])[1:]
    assert len(metadata) == 24 and dims == [vis.DEFAULT_THUMB, vis.DEFAULT_THUMB]
    for image_id, label, _, cluster, domain in metadata:
        assert int(label) == hidden[image_id]
        assert int(cluster) == clusters.get(image_id, -1)
        assert domain == "rover"
    assert len(read_tsv(files["tensor_path"])) == 24
    with Image.open(tmp_path / "vis" / "tsne.png") as img:
        assert img.width > 0


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_config_error_before_work(msl_run, tmp_path):
    run, msl, _ = msl_run
    cases = [
        (dict(run=tmp_path), "model.pt"),  # a folder without a saved model
        (dict(run=run, n=4), "at least 5"),
        (dict(run=run, color="rainbow"), "--color 'rainbow' is unknown"),
        (dict(run=run, color="cluster"), "needs --clusters"),
        (dict(run=run, clusters=tmp_path / "none.parquet"), "is not a file"),
        (dict(run=run, perplexity=0), "--perplexity"),
        (dict(run=run, split="nope"), "--split"),
    ]
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "model.pt").write_bytes(b"not a torch file")
    cases.append((dict(run=garbage), "not a readable torch file"))
    bad_table = tmp_path / "bad.csv"
    bad_table.write_text("image,cluster\n0001,1\n")
    cases.append((dict(run=run, clusters=bad_table), "lacks columns"))
    foreign = tmp_path / "foreign.csv"
    foreign.write_text("image_id,cluster_id\nnot-in-msl,1\n")
    cases.append((dict(run=run, clusters=foreign, data=msl), "no image of"))
    unlabeled = tmp_path / "unlabeled"
    unlabeled.mkdir()
    for i in range(6):
        _save_image(unlabeled / f"{i}.png", 0, np.random.default_rng(i))
    cases.append((dict(run=run, data=unlabeled), "no labels to colour by"))
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)) as info:
            vis.visualize(out=tmp_path / "out", progress=False, **kwargs)
        assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # every check came before any output


def test_cli_bad_input_exits_2(tmp_path, capsys):
    args = vis.configure_parser(argparse.ArgumentParser()).parse_args([str(tmp_path), "-n", "3"])
    assert run_command("raysys visualize", vis.run, args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("raysys visualize: error:") and "\n" not in err
