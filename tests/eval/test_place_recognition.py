"""Place recognition on held-out traverses: the metric against a brute-force Python loop (the default
gallery of other traverses only, and the sequence window that keeps near-duplicates from answering),
position-perfect features, the held-out split, the simulator's revisits, and a full evaluation on a tiny
simulated rover pool."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from raysys import models
from raysys.data import formats, sources
from raysys.data.decode import load_images
from raysys.data.schema import make_manifest
from raysys.data.simulate import _revisit, plan_rover, write_rover
from raysys.eval import place_recognition as pr
from raysys.eval.features import extract_features
from raysys.models.io import model_digest

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- references and data


def brute_force(features, x, y, traverse, frame, radius, exclude, ks):
    """The protocol as a plain loop over queries and gallery frames (float64, sorted lists)."""
    unit = [np.asarray(f, np.float64) / np.linalg.norm(f) for f in features]
    n = len(unit)
    hits, chance, errors, answerable, cross = {k: [] for k in ks}, {k: [] for k in ks}, [], 0, 0
    for q in range(n):
        gallery = [g for g in range(n) if g != q and not (traverse[g] == traverse[q] and (
            exclude is None or abs(frame[g] - frame[q]) <= exclude))]  # None: other traverses only
        if not gallery:
            continue
        ranked = sorted(gallery, key=lambda g: -float(unit[q] @ unit[g]))
        dist = {g: math.hypot(x[g] - x[q], y[g] - y[q]) for g in gallery}
        errors.append(dist[ranked[0]])
        positives = sum(dist[g] <= radius for g in gallery)
        cross += any(dist[g] <= radius and traverse[g] != traverse[q] for g in gallery)
        if positives:
            answerable += 1
            for k in ks:
                hits[k].append(any(dist[g] <= radius for g in ranked[:k]))
                chance[k].append(1 - math.comb(len(gallery) - positives, k) / math.comb(len(gallery), k))
    return ({k: float(np.mean(hits[k])) for k in ks}, {k: float(np.mean(chance[k])) for k in ks},
            float(np.median(errors)), answerable, len(errors), cross)


def random_walks(rng, n_traverses=4, length=14, spread=15.0):
    """Crossing random walks: x, y, traverse, frame (frames numbered along each walk, rows shuffled)."""
    xs, ys, ts, fs = [], [], [], []
    for t in range(n_traverses):
        p = rng.uniform(0, spread, 2)
        for f in range(length):
            p = p + rng.normal(0, 2.0, 2)
            xs.append(p[0]), ys.append(p[1]), ts.append(t), fs.append(f)
    order = rng.permutation(len(xs))
    return tuple(np.asarray(a)[order] for a in (xs, ys, ts, fs))


def moving_steps(x, y, traverse, frame):
    """Distances between consecutive frames of each traverse, zero-length steps (stops) left out."""
    steps = []
    for t in np.unique(traverse):
        idx = np.flatnonzero(traverse == t)[np.argsort(frame[traverse == t])]
        steps += [d for d in np.hypot(np.diff(x[idx]), np.diff(y[idx])) if d > 0]
    return steps


def position_features(x, y, scale=0.02):
    """Features whose cosine similarity falls with |dx| and |dy| (scale * extent < pi)."""
    x, y = np.asarray(x) * scale, np.asarray(y) * scale
    return np.stack([np.cos(x), np.sin(x), np.cos(y), np.sin(y)], 1).astype(np.float32)


# ----------------------------------------------------------------------------- the metric


@pytest.mark.parametrize("seed,exclude", [(0, 0), (1, 2), (2, 5), (3, None), (4, None)])
def test_metric_equals_brute_force(seed, exclude):
    rng = np.random.default_rng(seed)
    x, y, traverse, frame = random_walks(rng)
    # Noisy position features: recall well inside (0, 1), so hits and misses both occur.
    features = np.concatenate([position_features(x, y, 0.1), rng.normal(0, 0.4, (len(x), 12))], 1)
    radius, ks = 3.0, (1, 5)
    result = pr.place_recognition(features, x, y, traverse, frame, radius=radius, exclude=exclude, ks=ks)
    recall, chance, median, answerable, queries, cross = brute_force(features, x, y, traverse, frame, radius, exclude, ks)
    assert 0 < recall[1] < 1
    for k in ks:
        assert result[f"recall@{k}"] == pytest.approx(recall[k], abs=1e-12)
        assert result[f"chance_recall@{k}"] == pytest.approx(chance[k], abs=1e-12)
    assert result["median_error"] == pytest.approx(median, abs=1e-9)
    assert (result["n_answerable"], result["n_queries"]) == (answerable, queries)
    assert result["n_unanswerable"] == queries - answerable and result["n_traverses"] == 4
    assert 0 < result["n_answerable_cross"] == cross <= answerable
    assert (cross == answerable) == (exclude is None)  # other traverses only: every positive is a revisit


def test_duplicate_inside_the_window_never_answers():
    # A0 and A1: a stop, same place, identical features. B0: another traverse 0.5 m away, weakly similar.
    # A3: far away but more similar to A0 than B0 is. Worked out by hand for radius 1 m, top-1:
    #   exclude=2: A0's gallery is {A3, B0, B1}, top-1 A3 (200 m) -> miss; A1 -> B0 hit; B0 -> A0/A1 hit;
    #              A2, A3, B1 have no gallery frame within 1 m -> recall 2/3.
    #   exclude=0: A0 <-> A1 answer each other -> recall 3/3.
    e = np.eye(6, dtype=np.float32)
    features = np.stack([e[1], e[1], e[2], 0.5 * e[1] + e[3], e[4] + 0.1 * e[1], -e[1]])
    x = np.array([0.0, 0.0, 100.0, 200.0, 0.5, 300.0])
    y = np.zeros(6)
    traverse, frame = np.array([0, 0, 0, 0, 1, 1]), np.array([0, 1, 2, 3, 0, 1])
    far = pr.place_recognition(features, x, y, traverse, frame, radius=1.0, exclude=2, ks=(1,))
    assert far["recall@1"] == pytest.approx(2 / 3) and far["n_answerable"] == far["n_answerable_cross"] == 3
    near = pr.place_recognition(features, x, y, traverse, frame, radius=1.0, exclude=0, ks=(1,))
    assert near["recall@1"] == 1.0
    top, n_gallery = pr.retrieve(features, traverse, frame, k=3, exclude=2)
    assert top[0].tolist() == [3, 4, 5] and n_gallery.tolist() == [3, 2, 2, 3, 4, 4]
    assert top[1].tolist() == [4, 5, -1]  # past the end of its 2-frame gallery


def test_window_frames_never_retrieved_even_as_exact_duplicates():
    rng = np.random.default_rng(3)
    x, y, traverse, frame = random_walks(rng, n_traverses=3, length=10)
    # Every frame's features equal its predecessor's in the same traverse: perfect near-duplicates.
    features = rng.normal(size=(len(x), 8)).astype(np.float32)
    for i in range(len(x)):
        prev = np.flatnonzero((traverse == traverse[i]) & (frame == frame[i] - 1))
        if len(prev):
            features[i] = features[prev[0]]
    for exclude in (1, 2, 4):
        top, _ = pr.retrieve(features, traverse, frame, k=6, exclude=exclude)
        for q in range(len(x)):
            got = top[q][top[q] >= 0]
            assert q not in got
            assert not ((traverse[got] == traverse[q]) & (np.abs(frame[got] - frame[q]) <= exclude)).any()


def test_position_perfect_features_give_recall_one():
    # Two passes over the same curvy path, the second 0.1 m to the side: every frame's twin is on the
    # other traverse; same-traverse neighbours are >= 4 m away.
    t = np.arange(20)
    px, py = 5.0 * t, 20.0 * np.sin(t / 4.0)
    x, y = np.concatenate([px, px + 0.06]), np.concatenate([py, py + 0.08])
    traverse, frame = np.repeat([0, 1], 20), np.concatenate([t, t])
    result = pr.place_recognition(position_features(x, y), x, y, traverse, frame, radius=1.0, exclude=2)
    assert result["recall@1"] == 1.0 and result["recall@5"] == 1.0 and result["n_answerable"] == 40
    assert result["median_error"] == pytest.approx(0.1, abs=1e-9)
    # One positive (the twin) per query; galleries: 39 frames minus the +-2 window (3, 4 or 5 frames).
    assert result["chance_recall@1"] == pytest.approx((2 / 37 + 2 / 36 + 16 / 35) / 20)


@pytest.mark.parametrize("kw,match", [(dict(radius=0.0), "radius"), (dict(radius=1.0, ks=(0,)), "ks"),
                                      (dict(radius=1.0, exclude=-1), "exclude")])
def test_bad_arguments(kw, match):
    x = np.arange(4.0)
    with pytest.raises(ValueError, match=match):
        pr.place_recognition(np.eye(4), x, x, np.zeros(4), np.arange(4), **kw)
    with pytest.raises(ValueError, match="finite"):
        pr.place_recognition(np.eye(4), [0, 1, np.nan, 3], x, np.zeros(4), np.arange(4), radius=1.0)


# ----------------------------------------------------------------------------- held-out traverses


@pytest.mark.parametrize("count", [600, 5000])  # the smoke and demo pools
def test_held_out_traverses_revisit_each_other(count):
    plan = plan_rover(count, seed=0)
    held = np.isin(plan.traverse, plan.holdout)
    x, y, traverse = plan.x[held], plan.y[held], plan.traverse[held]
    radius = 2 * float(np.median(moving_steps(x, y, traverse, plan.frame[held])))
    near = np.hypot(x[:, None] - x[None, :], y[:, None] - y[None, :]) <= radius
    revisited = (near & (traverse[:, None] != traverse[None, :])).any(1)
    assert len(plan.holdout) >= 2 and revisited.mean() >= 0.4, revisited.mean()
    again = plan_rover(count, seed=0)
    assert np.array_equal(again.x, plan.x) and again.holdout == plan.holdout


def test_returns_re_drive_the_outbound_half_and_leave_the_pool_alone():
    rows = np.array([[float(i), 0.0, 0.0, t, i, 3 if i == 1 else -1, 1 if i == 1 else 0]
                     for t in range(3) for i in range(6)])
    moved, held = _revisit(rows, [1], 3, np.random.default_rng(0))
    assert held == [1, 3] and np.array_equal(moved[rows[:, 3] != 1], rows[rows[:, 3] != 1])  # pool untouched
    back = moved[moved[:, 3] == 3]
    assert back[:, 4].tolist() == [0, 1, 2] and (back[:, 5] == -1).all()  # its own frames, terrain only
    assert np.allclose(back[:, 0] - rows[[2, 1, 0], 0], back[0, 0] - rows[2, 0], atol=1.5)  # outbound, reversed
    assert np.array_equal(moved[moved[:, 3] == 1], rows[(rows[:, 3] == 1) & (rows[:, 4] < 3)])


def pool_manifest(count=400, seed=5):
    plan = plan_rover(count, seed)
    manifest = make_manifest({
        "path": [f"/pool/{n}.jpg" for n in plan.names], "image_id": list(plan.names),
        "domain": ["rover"] * len(plan.names),
        "x": plan.x.tolist(), "y": plan.y.tolist(), "traverse": plan.traverse.tolist(), "frame": plan.frame.tolist(),
    })
    return plan, manifest


def test_holdout_split_never_leaks_a_held_out_traverse():
    plan, manifest = pool_manifest()
    # Rows of another dataset (traverse -1) always stay in pretraining.
    other = make_manifest({"path": ["/msl/a.jpg", "/msl/b.jpg"], "image_id": ["a", "b"], "domain": ["msl"] * 2})
    manifest = pa.concat_tables([manifest, other])
    pre, held = sources.holdout_split(manifest, plan.holdout)
    assert plan.holdout and set(held.column("traverse").to_pylist()) == set(plan.holdout)
    assert not set(pre.column("traverse").to_pylist()) & set(plan.holdout)
    assert pre.num_rows + held.num_rows == manifest.num_rows
    ids = manifest.column("image_id").to_pylist()
    held_ids = set(held.column("image_id").to_pylist())
    assert pre.column("image_id").to_pylist() == [i for i in ids if i not in held_ids]  # order kept
    assert {"a", "b"} <= set(pre.column("image_id").to_pylist())


def test_holdout_split_absent_ids_and_bad_ids(caplog):
    _, manifest = pool_manifest(count=300)
    pre, held = sources.holdout_split(manifest, [999])
    assert held.num_rows == 0 and pre.num_rows == manifest.num_rows and "999" in caplog.text
    with pytest.raises(ValueError, match=">= 0"):
        sources.holdout_split(manifest, [-1])


def test_read_holdout(tmp_path):
    assert sources.read_holdout(tmp_path) == []
    (tmp_path / sources.HOLDOUT_FILE).write_text("# held out\n7\n\n2  # second\n7\n")
    assert sources.read_holdout(tmp_path) == [2, 7]
    (tmp_path / sources.HOLDOUT_FILE).write_text("1\n\nthree\n")
    with pytest.raises(ValueError, match=f"{sources.HOLDOUT_FILE}:3: 'three'"):
        sources.read_holdout(tmp_path)
    with pytest.raises(ValueError, match="not a folder"):
        sources.read_holdout(tmp_path / "missing")


# ----------------------------------------------------------------------------- the whole evaluation


def test_evaluate_on_a_simulated_pool(tmp_path, capsys):
    root = tmp_path / "rover"
    write_rover(root, count=240, size=16, seed=1)
    manifest = formats.read_folder(root)
    holdout = sources.read_holdout(root)
    _, held = sources.holdout_split(manifest, holdout)
    torch.manual_seed(0)
    model = models.ContrastiveModel("resnet18", width=0.125, small_stem=True)
    before = model_digest(model)
    result = pr.evaluate_place_recognition(model, held, image_size=16, out_dir=tmp_path / "run", progress=False)
    assert model_digest(model) == before
    assert "place recognition: radius" in capsys.readouterr().out
    saved = json.loads((tmp_path / "run" / pr.RESULT_FILE).read_text())
    assert saved == json.loads(json.dumps(result))
    assert result["traverses"] == holdout and result["n_frames"] == held.num_rows and result["default_radius"]
    # Same numbers as the metric on independently extracted features with the documented radius.
    cols = {c: held.column(c).to_numpy() for c in ("x", "y", "traverse", "frame")}
    images, kept, bad = load_images(held.column("path").to_pylist(), 16)
    assert len(kept) == held.num_rows and not bad
    features = extract_features(model, images, progress=False)
    radius = 2 * float(np.median(moving_steps(**cols)))  # the documented default, computed here by hand
    expected = pr.place_recognition(features, **cols, radius=radius)
    assert result["radius"] == pytest.approx(radius)
    for key in ("recall@1", "recall@5", "median_error", "n_answerable"):
        assert result[key] == pytest.approx(expected[key])
    # Selecting the held-out traverses from the whole manifest gives the same evaluation.
    again = pr.evaluate_place_recognition(model, manifest, 16, radius=radius, holdout_traverses=holdout, progress=False)
    assert again["recall@1"] == result["recall@1"] and not again["default_radius"]


def test_evaluate_refuses_a_manifest_without_positions(tmp_path):
    manifest = make_manifest({"path": ["/a.jpg", "/b.jpg"], "image_id": ["a", "b"], "domain": ["rover"] * 2})
    with pytest.raises(ValueError, match="at least 2 held-out frames"):
        pr.evaluate_place_recognition(None, manifest, 16)
