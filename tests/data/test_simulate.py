"""Tests of the built-in data generator: formats read back from disk, counts, sols, determinism,
augmented copies, traverse geometry and the skip-if-complete stamp."""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raysys.data import simulate as sim

MSL_LINE = re.compile(r"^(\d{4})M[LRH]\d{16}[A-Z]\d{2}_DRCL(-(fh|fv|r90|r180|r270))?\.jpg (\d+)$")
HIRISE_LINE = re.compile(r"^ESP_\d{6}_\d{4}_RED-\d{4}(-(r90|r180|r270|fh|fv|brt))?\.jpg (\d)$")
HIRISE_SPLIT_LINE = re.compile(r"^(ESP_\d{6}_\d{4}_RED-\d{4}(?:-(?:r90|r180|r270|fh|fv|brt))?\.jpg) (\d) "
                               r"(train|val|test)$")
SUFFIX = re.compile(r"-(fh|fv|r90|r180|r270|brt)$")


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    paths = sim.simulate(root, preset="smoke", seed=0, progress=False)
    assert paths == {"msl": str(root / sim.MSL_DIR), "hirise": str(root / sim.HIRISE_DIR),
                     "rover": str(root / sim.ROVER_DIR), "diverse": str(root / sim.DIVERSE_DIR)}
    return root


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _msl_split(out: Path, split: str) -> list[tuple[str, int, int]]:
    """(file name, class id, sol) of every line of an MSL split file, checked against the real format."""
    rows = []
    for line in _lines(out / sim.MSL_DIR / f"{split}-set-v2.1.txt"):
        m = MSL_LINE.match(line)
        assert m, f"bad MSL line {line!r}"
        rows.append((line.split()[0], int(m.group(4)), int(m.group(1))))
    return rows


def _open(path: Path) -> Image.Image:
    img = Image.open(path)
    img.load()
    return img


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------- layout

def test_msl_layout(out):
    root = out / sim.MSL_DIR
    assert _lines(root / "class_map.csv") == [f"{i},{n}" for i, n in enumerate(sim.MSL_CLASSES)]
    listed = []
    for split in ("train", "val", "test"):
        rows = _msl_split(out, split)
        assert {c for _, c, _ in rows} == set(range(19)), f"{split} misses a class"
        if split != "train":
            assert not any(SUFFIX.search(n[:-4]) for n, _, _ in rows), "val/test must hold no copies"
        listed += [n for n, _, _ in rows]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(p.name for p in (root / "images").iterdir())
    for name in listed[::7]:
        img = _open(root / "images" / name)
        assert (img.mode, img.size) == ("RGB", (32, 32))


def test_hirise_layout(out):
    root = out / sim.HIRISE_DIR
    assert _lines(root / "landmarks_map-proj-v3_2_classmap.csv") == [
        f"{i},{n}" for i, n in enumerate(sim.HIRISE_CLASSES)]
    labels = {}
    for line in _lines(root / "labels-map-proj_v3_2.txt"):
        assert HIRISE_LINE.match(line), f"bad HiRISE label line {line!r}"
        name, c = line.split()
        labels[name] = int(c)
    split_rows = [HIRISE_SPLIT_LINE.match(line) for line in _lines(root / "labels-map-proj_v3_2_train_val_test.txt")]
    assert all(split_rows)
    split_of = {}
    for m in split_rows:
        assert labels[m.group(1)] == int(m.group(2))
        split_of[m.group(1)] = m.group(3)
    assert set(split_of) == set(labels) == {p.name for p in (root / "map-proj-v3_2").iterdir()}
    # Repeated rows exist and are minority-class rows.
    repeats = [n for n, k in Counter(m.group(1) for m in split_rows).items() if k > 1]
    assert repeats and all(labels[n] != 0 for n in repeats)
    # Train/val originals have all six copies, test originals none.
    originals = [n for n in labels if not SUFFIX.search(n[:-4])]
    for n in originals:
        copies = {f"{n[:-4]}-{k}.jpg" for k in sim.HIRISE_AUGS}
        if split_of[n] == "test":
            assert not copies & set(labels)
        else:
            assert copies <= set(labels) and all(split_of[c] == split_of[n] for c in copies)
    for split in ("train", "val", "test"):
        assert {labels[n] for n in originals if split_of[n] == split} == set(range(8))
    for name in list(labels)[::11]:
        img = _open(root / "map-proj-v3_2" / name)
        assert (img.mode, img.size) == ("L", (32, 32))


def test_rover_layout(out):
    root = out / sim.ROVER_DIR
    with open(root / "positions.csv", newline="") as f:
        assert f.readline().strip() == "name,x,y,heading,traverse,frame"
    with open(root / "hidden-labels.csv", newline="") as f:
        assert f.readline().strip() == "name,label"
    pos = list(csv.DictReader(open(root / "positions.csv", newline="")))
    hidden = {r["name"]: int(r["label"]) for r in csv.DictReader(open(root / "hidden-labels.csv", newline=""))}
    files = {p.name for p in (root / "images").iterdir()}
    assert len(pos) == 600 and {r["name"] for r in pos} == files == set(hidden)
    assert set(hidden.values()) <= set(range(19))
    assert all(0 <= float(r["heading"]) < 360 for r in pos)
    traverses = {int(r["traverse"]) for r in pos}
    holdout = [int(t) for t in _lines(root / "holdout-traverses.txt")]
    drives = len(traverses) - len(holdout) // 2  # each held-out drive comes back as a traverse of its own
    assert holdout and set(holdout) <= traverses and len(holdout) == 2 * max(1, round(0.1 * drives))
    for r in pos[::37]:
        img = _open(root / "images" / r["name"])
        assert (img.mode, img.size) == ("RGB", (32, 32))


def test_diverse_layout(out):
    root = out / sim.DIVERSE_DIR
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    assert len(classes) == 100
    assert [len(list(c.iterdir())) for c in classes] == [4] * 100
    for c in classes[::9]:
        img = _open(next(c.iterdir()))
        assert (img.mode, img.size) == ("RGB", (32, 32))


# ---------------------------------------------------------------------------------------------- counts

def test_msl_counts_real_at_paper_scale():
    counts = sim.plan_msl_counts(sim.MSL_TOTAL)
    assert counts["train"].tolist() == sim.MSL_TRAIN_COUNTS
    assert counts["val"].tolist() == sim.MSL_VAL_COUNTS
    assert counts["test"].tolist() == sim.MSL_TEST_COUNTS
    assert counts["train_originals"].sum() == 2000 and counts["train"].sum() - 2000 == 3920


def test_msl_proportions_at_demo_scale():
    plan = sim.plan_msl(sim.PRESETS["demo"]["msl"], seed=0)
    # Count train files from the plan (originals and their copies), independently of plan_msl_counts.
    train = Counter()
    for lab, split, copies in zip(plan.labels, plan.splits, plan.copies):
        if split == "train":
            train[int(lab)] += 1 + len(copies)
    p = np.array([train[c] for c in range(19)], float)
    p /= p.sum()
    assert abs((p ** 2).sum() - 0.1533) < 0.01
    for split in ("train", "val", "test"):
        assert {int(c) for c, s in zip(plan.labels, plan.splits) if s == split} == set(range(19))
    assert all(len(c) <= 5 and len(set(c)) == len(c) for c in plan.copies)


@pytest.mark.parametrize("preset", list(sim.PRESETS))
def test_every_class_in_every_split(preset):
    m = sim.plan_msl_counts(sim.PRESETS[preset]["msl"])
    h = sim.plan_hirise_counts(sim.PRESETS[preset]["hirise"])
    for split in ("train", "val", "test"):
        assert (m[split] >= 1).all() and (h[split] >= 1).all()
    assert (m["train_originals"] >= 1).all() and (m["train_originals"] * 6 >= m["train"]).all()


def test_hirise_other_share():
    h = sim.plan_hirise_counts(sim.PRESETS["demo"]["hirise"])
    total = sum(v.sum() for v in h.values())
    assert 0.75 < sum(v[0] for v in h.values()) / total < 0.85
    assert {k: v.tolist() for k, v in sim.plan_hirise_counts(sim.HIRISE_TOTAL).items()} == sim.HIRISE_ORIGINALS


def test_apportion_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.integers(1, 50, rng.integers(2, 10))
        total = int(rng.integers(0, 300))
        got = sim.apportion(total, w)
        assert got.min() >= 1 and got.sum() == max(total, len(w))
        if total >= len(w) * 50:  # no minimum binds: within one of the exact quota
            assert np.all(np.abs(got - total * w / w.sum()) < 1)


# ---------------------------------------------------------------------------------------------- sols

def test_sols_ordered_by_split(out):
    sols = {s: [sol for _, _, sol in _msl_split(out, s)] for s in ("train", "val", "test")}
    assert 3 <= min(sols["train"]) and max(sols["train"]) <= 948
    assert max(sols["train"]) < min(sols["val"]) and max(sols["val"]) < min(sols["test"]) <= 2224


# ---------------------------------------------------------------------------------------------- determinism

def test_same_seed_same_bytes(out, tmp_path):
    again = sim.simulate(tmp_path, preset="smoke", seed=0, progress=False)
    files = [f"{sim.MSL_DIR}/train-set-v2.1.txt", f"{sim.HIRISE_DIR}/labels-map-proj_v3_2_train_val_test.txt",
             f"{sim.ROVER_DIR}/positions.csv", f"{sim.ROVER_DIR}/hidden-labels.csv"]
    for key, sub in (("msl", "images"), ("hirise", "map-proj-v3_2"), ("rover", "images")):
        files += [str(p.relative_to(tmp_path)) for p in sorted((Path(again[key]) / sub).iterdir())[:5]]
    files += [str(p.relative_to(out)) for p in sorted((out / sim.DIVERSE_DIR).rglob("*.jpg"))[:5]]
    for f in files:
        assert _sha(out / f) == _sha(tmp_path / f), f


def test_different_seed_differs(tmp_path):
    for seed in (0, 1):
        sim.write_rover(tmp_path / str(seed), 40, 32, seed)
    a, b = tmp_path / "0", tmp_path / "1"
    assert (a / "positions.csv").read_text() != (b / "positions.csv").read_text()
    img = lambda d: np.asarray(_open(sorted((d / "images").iterdir())[0]), float)  # noqa: E731
    assert np.abs(img(a) - img(b)).mean() > 5


# ---------------------------------------------------------------------------------------------- copies

def test_msl_copies_are_flips_and_rotations(out):
    images = out / sim.MSL_DIR / "images"
    names = {n for n, _, _ in _msl_split(out, "train")}
    checked = Counter()
    for n in sorted(names):
        m = SUFFIX.search(n[:-4])
        if not m:
            continue
        kind = m.group(1)
        orig = np.asarray(_open(images / (n[:-4][: m.start()] + ".jpg")), float)
        copy = np.asarray(_open(images / n), float)
        right = np.abs(sim.augment_array(orig, kind) - copy).mean()
        wrong = np.abs(orig - copy).mean()  # an untransformed copy fails
        assert right < 6.0 and right < 0.3 * wrong, (n, right, wrong)  # JPEG is lossy
        checked[kind] += 1
    assert set(checked) == set(sim.MSL_AUGS)


def test_augment_array_matches_numpy():
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert (sim.augment_array(a, "fh") == a[:, ::-1]).all()
    assert (sim.augment_array(a, "fv") == a[::-1]).all()
    assert (sim.augment_array(a, "r90") == np.array([[3, 7, 11], [2, 6, 10], [1, 5, 9], [0, 4, 8]])).all()
    assert (sim.augment_array(a, "r180") == a[::-1, ::-1]).all()
    assert (sim.augment_array(sim.augment_array(a, "r270"), "r90") == a).all()
    assert sim.augment_array(a, "brt").sum() > a.sum()
    with pytest.raises(ValueError, match="unknown augmentation"):
        sim.augment_array(a, "r45")


def test_hirise_brt_copy_is_brighter(out):
    root = out / sim.HIRISE_DIR / "map-proj-v3_2"
    brt = sorted(root.glob("*-brt.jpg"))[:20]
    for p in brt:
        orig = np.asarray(_open(root / p.name.replace("-brt", "")), float)
        assert np.asarray(_open(p), float).mean() > orig.mean()


# ---------------------------------------------------------------------------------------------- traverses

def test_traverse_frames_close_and_similar(out):
    root = out / sim.ROVER_DIR
    rows = list(csv.DictReader(open(root / "positions.csv", newline="")))
    xy = np.array([[float(r["x"]), float(r["y"])] for r in rows])
    trav = np.array([int(r["traverse"]) for r in rows])
    frame = np.array([int(r["frame"]) for r in rows])
    span = np.ptp(xy, axis=0).max()
    pairs = [(i, i + 1) for i in range(len(rows) - 1) if trav[i] == trav[i + 1]]
    assert all(frame[j] == frame[i] + 1 for i, j in pairs)
    steps = np.array([np.hypot(*(xy[j] - xy[i])) for i, j in pairs])
    drives = len(set(trav)) - len(_lines(root / "holdout-traverses.txt")) // 2
    returns = np.array([trav[i] >= drives for i, _ in pairs])  # the held-out drives' returns: the last ids
    assert steps[~returns].max() <= 6.01 and steps.max() < 0.05 * span
    assert steps[returns].max() <= 6.01 + 1.2  # a return re-drives the outbound steps, with 0.2 m of jitter
    imgs = np.stack([np.asarray(_open(root / "images" / r["name"]), np.float32) for r in rows])
    near = np.mean([np.abs(imgs[i] - imgs[j]).mean() for i, j in pairs])
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, len(rows), (2, 2000))
    far = np.abs(imgs[a] - imgs[b]).mean()
    assert near < 0.6 * far, (near, far)


def test_pool_proportions_roughly_msl():
    plan = sim.plan_rover(sim.PRESETS["demo"]["count"], seed=0)
    share = np.bincount(plan.labels, minlength=19) / len(plan.labels)
    real = np.array(sim.MSL_TRAIN_COUNTS) / sum(sim.MSL_TRAIN_COUNTS)
    assert abs(share[sim.ROVER_EVENTS].sum() - real[sim.ROVER_EVENTS].sum()) < 0.06
    assert np.abs(share - real).max() < 0.1
    # Region classes are the same for every frame of a region: stepping a frame rarely changes class.
    same = (plan.labels[1:] == plan.labels[:-1])[plan.traverse[1:] == plan.traverse[:-1]]
    assert same.mean() > 0.7


# ---------------------------------------------------------------------------------------------- stamp

def test_second_call_is_a_no_op_and_stale_dataset_is_rewritten(out):
    stamps = {k: out / d / sim.STAMP for k, d in (("msl", sim.MSL_DIR), ("hirise", sim.HIRISE_DIR),
                                                  ("rover", sim.ROVER_DIR), ("diverse", sim.DIVERSE_DIR))}
    before = {k: p.stat().st_mtime_ns for k, p in stamps.items()}
    sample = sorted((out / sim.MSL_DIR / "images").iterdir())[0]
    sample_mtime = sample.stat().st_mtime_ns
    args = sim.configure_parser(argparse.ArgumentParser()).parse_args(
        ["--out", str(out), "--preset", "smoke", "--seed", "0"])
    assert sim.run(args) == 0
    assert {k: p.stat().st_mtime_ns for k, p in stamps.items()} == before
    assert sample.stat().st_mtime_ns == sample_mtime
    # A stamp with other parameters makes only that dataset be rewritten, with the same bytes.
    positions = _sha(out / sim.ROVER_DIR / "positions.csv")
    stamp = json.loads(stamps["rover"].read_text())
    stamps["rover"].write_text(json.dumps({**stamp, "count": 1}))
    sim.simulate(out, preset="smoke", seed=0, progress=False)
    assert json.loads(stamps["rover"].read_text()) == stamp
    assert _sha(out / sim.ROVER_DIR / "positions.csv") == positions
    assert stamps["msl"].stat().st_mtime_ns == before["msl"]
    assert not list(out.glob(".*.partial"))


def test_refuses_foreign_folder_and_bad_arguments(tmp_path):
    (tmp_path / sim.MSL_DIR).mkdir()
    (tmp_path / sim.MSL_DIR / "mine.txt").write_text("user data")
    with pytest.raises(sim.SimulateError, match="not written by raysys simulate"):
        sim.simulate(tmp_path, preset="smoke", progress=False)
    assert (tmp_path / sim.MSL_DIR / "mine.txt").exists()
    with pytest.raises(ValueError, match="unknown preset"):
        sim.simulate(tmp_path, preset="huge", progress=False)
    with pytest.raises(ValueError, match="--size"):
        sim.simulate(tmp_path, preset="smoke", size=4, progress=False)
    with pytest.raises(ValueError, match="--count"):
        sim.simulate(tmp_path, preset="smoke", count=3, progress=False)
