"""Pair rules against hand-written matrices and brute-force loops (square and rectangular forms, ESS);
false-negative statistics against hand counts and brute force; ESS radius defaults by hand."""

import math

import numpy as np
import pytest
import torch

from raysys.methods.pairs import (
    ClusterRule,
    InstanceRule,
    LabelRule,
    PairMatrix,
    count_false_negative_view_pairs,
    default_radius,
    false_negative_fraction_all_pairs,
    false_negative_stats,
    make_rule,
    positives_per_anchor,
)

T = torch.tensor


def _check(pm: PairMatrix, pos, neg):
    assert pm.pos.dtype == torch.float32 and pm.neg.dtype == torch.bool
    assert pm.pos.tolist() == [[float(v) for v in row] for row in pos]
    assert pm.neg.int().tolist() == neg


def test_instance_rule_b3():
    # views 0,1,2 = view1 of images 0,1,2; views 3,4,5 = their view2
    pm = make_rule("instance")({"image_id": T([10, 11, 12])})
    _check(pm,
           pos=[[0, 0, 0, 1, 0, 0],
                [0, 0, 0, 0, 1, 0],
                [0, 0, 0, 0, 0, 1],
                [1, 0, 0, 0, 0, 0],
                [0, 1, 0, 0, 0, 0],
                [0, 0, 1, 0, 0, 0]],
           neg=[[0, 1, 1, 0, 1, 1],
                [1, 0, 1, 1, 0, 1],
                [1, 1, 0, 1, 1, 0],
                [0, 1, 1, 0, 1, 1],
                [1, 0, 1, 1, 0, 1],
                [1, 1, 0, 1, 1, 0]])


def test_cluster_eliminate_b3():
    # images 0 and 2 share cluster 5: not negatives of each other, still not positives
    pm = ClusterRule("eliminate")({"image_id": T([10, 11, 12]), "cluster_id": T([5, 7, 5])})
    _check(pm,
           pos=[[0, 0, 0, 1, 0, 0],
                [0, 0, 0, 0, 1, 0],
                [0, 0, 0, 0, 0, 1],
                [1, 0, 0, 0, 0, 0],
                [0, 1, 0, 0, 0, 0],
                [0, 0, 1, 0, 0, 0]],
           neg=[[0, 1, 0, 0, 1, 0],
                [1, 0, 1, 1, 0, 1],
                [0, 1, 0, 0, 1, 0],
                [0, 1, 0, 0, 1, 0],
                [1, 0, 1, 1, 0, 1],
                [0, 1, 0, 0, 1, 0]])


def test_cluster_attract_b3():
    pm = make_rule("cluster", mode="attract")({"image_id": T([10, 11, 12]), "cluster_id": T([5, 7, 5])})
    _check(pm,
           pos=[[0, 0, 1, 1, 0, 1],
                [0, 0, 0, 0, 1, 0],
                [1, 0, 0, 1, 0, 1],
                [1, 0, 1, 0, 0, 1],
                [0, 1, 0, 0, 0, 0],
                [1, 0, 1, 1, 0, 0]],
           neg=[[0, 1, 0, 0, 1, 0],
                [1, 0, 1, 1, 0, 1],
                [0, 1, 0, 0, 1, 0],
                [0, 1, 0, 0, 1, 0],
                [1, 0, 1, 1, 0, 1],
                [0, 1, 0, 0, 1, 0]])


@pytest.mark.parametrize("mode", ["eliminate", "attract"])
def test_unknown_cluster_is_its_own_cluster(mode):
    meta = {"image_id": T([1, 2, 3]), "cluster_id": T([-1, -1, -1])}
    expected = InstanceRule()(meta)
    pm = ClusterRule(mode)(meta)
    assert torch.equal(pm.pos, expected.pos) and torch.equal(pm.neg, expected.neg)


def test_duplicate_image_ids_are_positives_in_every_rule():
    # images 0 and 2 are the same file: all four of their views are mutual positives
    meta = {"image_id": T([7, 8, 7]), "cluster_id": T([0, 1, 2]), "label": T([0, 1, 2])}
    pos = [[0, 0, 1, 1, 0, 1],
           [0, 0, 0, 0, 1, 0],
           [1, 0, 0, 1, 0, 1],
           [1, 0, 1, 0, 0, 1],
           [0, 1, 0, 0, 0, 0],
           [1, 0, 1, 1, 0, 0]]
    neg = [[0, 1, 0, 0, 1, 0],
           [1, 0, 1, 1, 0, 1],
           [0, 1, 0, 0, 1, 0],
           [0, 1, 0, 0, 1, 0],
           [1, 0, 1, 1, 0, 1],
           [0, 1, 0, 0, 1, 0]]
    for rule in (InstanceRule(), ClusterRule("eliminate"), ClusterRule("attract"), LabelRule()):
        _check(rule(meta), pos, neg)


def test_label_rule_with_unknown_labels():
    pm = make_rule("label")({"image_id": T([1, 2, 3, 4]), "label": T([3, 3, -1, -1])})
    same_img = [[i % 4 == j % 4 and i != j for j in range(8)] for i in range(8)]
    expected_pos = [[float(same_img[i][j] or (i % 4 < 2 and j % 4 < 2 and i != j)) for j in range(8)]
                    for i in range(8)]
    assert pm.pos.tolist() == expected_pos
    assert pm.neg.tolist() == [[expected_pos[i][j] == 0 and i != j for j in range(8)] for i in range(8)]
    assert LabelRule.uses_labels and not InstanceRule.uses_labels and not ClusterRule.uses_labels


def test_random_metadata_invariants():
    g = torch.Generator().manual_seed(0)
    meta = {"image_id": torch.randint(0, 6, (10,), generator=g),
            "cluster_id": torch.randint(-1, 3, (10,), generator=g),
            "label": torch.randint(-1, 3, (10,), generator=g)}
    for rule in (InstanceRule(), ClusterRule("eliminate"), ClusterRule("attract"), LabelRule()):
        pm = rule(meta)
        assert pm.pos.shape == pm.neg.shape == (20, 20)
        assert not pm.pos.diagonal().any() and not pm.neg.diagonal().any()
        assert not (pm.neg & (pm.pos > 0)).any()
        assert torch.equal(pm.pos, pm.pos.T) and torch.equal(pm.neg, pm.neg.T)
        assert (pm.pos.sum(1) >= 1).all()  # every view keeps at least its other view


def test_rule_errors():
    with pytest.raises(ValueError, match="cluster_id"):
        make_rule("cluster")({"image_id": T([1, 2])})
    with pytest.raises(ValueError, match="'label'"):
        make_rule("label")({"image_id": T([1, 2])})
    with pytest.raises(ValueError, match="valid rules"):
        make_rule("spatial")
    with pytest.raises(ValueError, match="mode"):
        make_rule("cluster", mode="repel")
    with pytest.raises(ValueError, match="one length"):
        make_rule("cluster")({"image_id": T([1, 2]), "cluster_id": T([1, 2, 3])})


def test_false_negative_stats_hand_counted():
    # 4 images; labels: images 0 and 1 share class 0, image 3 unknown. 8 views, 48 baseline negative pairs;
    # known-label negatives are among images 0-2: 3 image pairs x 4 view pairs x 2 directions = 24,
    # of which images 0-1 give 8 false negatives.
    labels = T([0, 0, 1, -1])
    ids = T([0, 1, 2, 3])
    base = InstanceRule()({"image_id": ids})
    stats = false_negative_stats(base, labels)
    assert stats == {"n_negative_pairs": 48, "fn_fraction": 8 / 24}

    # clusters pair image 0 with 2 (wrong: labels differ) and 1 with 3 (unknown label -> excluded)
    pm = ClusterRule("eliminate")({"image_id": ids, "cluster_id": T([0, 1, 0, 1])})
    stats = false_negative_stats(pm, labels, baseline=base)
    assert stats == {"n_negative_pairs": 32, "fn_fraction": 8 / 16,  # left: images 0-1 (FN) and 1-2
                     "n_removed_pairs": 8, "removed_precision": 0.0, "removed_recall": 0.0}

    # clusters pair image 0 with 1 (right) and 2 with 3 (unknown -> excluded)
    pm = ClusterRule("attract")({"image_id": ids, "cluster_id": T([0, 0, 1, 1])})
    stats = false_negative_stats(pm, labels, baseline=base)
    assert stats == {"n_negative_pairs": 32, "fn_fraction": 0.0,
                     "n_removed_pairs": 8, "removed_precision": 1.0, "removed_recall": 1.0}

    # nothing left with known labels -> NaN, not a division error
    pm = ClusterRule("eliminate")({"image_id": ids, "cluster_id": T([0, 0, 0, 1])})
    stats = false_negative_stats(pm, labels, baseline=base)
    assert math.isnan(stats["fn_fraction"])
    assert (stats["removed_precision"], stats["removed_recall"]) == (8 / 24, 1.0)
    with pytest.raises(ValueError, match="8 views but labels describe 3 images"):
        false_negative_stats(base, T([0, 1, 2]))


def _brute_force_fn_pairs(labels: list[int]) -> int:
    """Appendix B by definition: ordered pairs of distinct views of different images sharing a known label."""
    views = [labels[v % len(labels)] for v in range(2 * len(labels))]
    img = [v % len(labels) for v in range(2 * len(labels))]
    return sum(1 for i in range(len(views)) for j in range(len(views))
               if i != j and img[i] != img[j] and views[i] >= 0 and views[i] == views[j])


def test_appendix_b_count_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(-1, 5, (7, 3, 9), generator=g)  # leading dims [7, 3], B = 9
    counts = count_false_negative_view_pairs(labels)
    assert counts.shape == (7, 3)
    expected = [[_brute_force_fn_pairs(row.tolist()) for row in block] for block in labels]
    assert counts.tolist() == expected
    frac = false_negative_fraction_all_pairs(labels)
    torch.testing.assert_close(frac, torch.tensor(expected, dtype=torch.float64) / (18 * 17))
    # large label values (not dense class ids) and an all-unknown batch
    assert count_false_negative_view_pairs(T([[10**12, 10**12, 5], [-1, -1, -1]])).tolist() == [8, 0]


def test_appendix_b_agrees_with_instance_rule_stats():
    """One definition, two code paths: the baseline's FN pairs are the Appendix B FN pairs."""
    labels = T([0, 2, 0, 1, 2, 0])
    base = InstanceRule()({"image_id": torch.arange(6)})
    stats = false_negative_stats(base, labels)
    assert stats["fn_fraction"] * stats["n_negative_pairs"] == pytest.approx(
        float(count_false_negative_view_pairs(labels)))


# ---------------------------------------------------------------- rectangular form and ESS (seed 001)

NAN = float("nan")


def _brute_pairs(rule: str, a: dict, c: dict, r=None, theta=None, sigma=None, mode=None):
    """Pair matrix of anchor images vs candidate images, entry by entry from the rule definitions."""
    ids_a, ids_c = a["image_id"].tolist(), c["image_id"].tolist()
    pos = [[0.0] * len(ids_c) for _ in ids_a]
    neg = [[False] * len(ids_c) for _ in ids_a]
    for i in range(len(ids_a)):
        for j in range(len(ids_c)):
            same = ids_a[i] == ids_c[j]
            if rule in ("ess-mb", "ess-mw"):
                xa, ya, xc, yc = (float(a["x"][i]), float(a["y"][i]), float(c["x"][j]), float(c["y"][j]))
                d2 = (xa - xc) ** 2 + (ya - yc) ** 2
                near = not math.isnan(d2) and d2 <= r * r
                if theta is not None and "heading" in a and "heading" in c:
                    ha, hc = float(a["heading"][i]), float(c["heading"][j])
                    if not (math.isnan(ha) or math.isnan(hc)):
                        dh = abs(ha - hc) % 360
                        near = near and min(dh, 360 - dh) <= theta
                if rule == "ess-mb":
                    pos[i][j] = float(same or near)
                else:
                    pos[i][j] = 1.0 if same else (math.exp(-d2 / (2 * sigma ** 2)) if near else 0.0)
                neg[i][j] = not (same or near)
            else:
                key = {"cluster": "cluster_id", "label": "label"}.get(rule)
                group = key is not None and a[key][i] >= 0 and a[key][i] == c[key][j]
                if rule == "instance" or (rule == "cluster" and mode == "eliminate"):
                    pos[i][j] = float(same)
                else:
                    pos[i][j] = float(same or group)
                neg[i][j] = not (same or group)
    return pos, neg


def _views_of(img_pos, img_neg):
    """Square view layout from image-level lists: view v shows image v % B; a view is not paired with itself."""
    b = len(img_pos)
    pos = [[0.0 if i == j else img_pos[i % b][j % b] for j in range(2 * b)] for i in range(2 * b)]
    neg = [[False if i == j else img_neg[i % b][j % b] for j in range(2 * b)] for i in range(2 * b)]
    return pos, neg


def _spatial_meta(n: int, g: torch.Generator, id_offset: int = 0) -> dict:
    """Positions in a 10 m square (so radius 3 m gives several neighbours), some unknown, some repeated ids."""
    x, y = torch.rand(n, generator=g) * 10, torch.rand(n, generator=g) * 10
    x[1], y[4] = NAN, NAN
    heading = torch.rand(n, generator=g) * 360
    heading[2] = NAN
    ids = torch.arange(n) + id_offset
    ids[3] = ids[0]  # a repeated image
    return {"image_id": ids, "x": x, "y": y, "heading": heading,
            "cluster_id": torch.randint(-1, 3, (n,), generator=g), "label": torch.randint(-1, 3, (n,), generator=g)}


def _assert_pm(pm, pos, neg, exact=True):
    assert pm.pos.dtype == torch.float32 and pm.neg.dtype == torch.bool
    if exact:
        assert pm.pos.tolist() == pos
    else:
        torch.testing.assert_close(pm.pos, torch.tensor(pos, dtype=torch.float32), rtol=1e-6, atol=0)
    assert pm.neg.tolist() == neg


ESS_CASES = [("ess-mb", dict(r=3.0)), ("ess-mb", dict(r=3.0, theta=90.0)),
             ("ess-mw", dict(r=3.0, sigma=1.5)), ("ess-mw", dict(r=4.0, theta=60.0, sigma=2.5))]


@pytest.mark.parametrize("name,kw", ESS_CASES)
def test_ess_in_batch_equals_brute_force(name, kw):
    meta = _spatial_meta(9, torch.Generator().manual_seed(10))
    sigma = kw.get("sigma", kw["r"] / 2)
    img_pos, img_neg = _brute_pairs(name, meta, meta, r=kw["r"], theta=kw.get("theta"), sigma=sigma)
    pos, neg = _views_of(img_pos, img_neg)
    _assert_pm(make_rule(name, **kw)(meta), pos, neg, exact=name == "ess-mb")
    n_near = sum(1 for i in range(9) for j in range(9) if img_pos[i][j] > 0 and meta["image_id"][i] != meta["image_id"][j])
    assert n_near >= 4  # the case exercises spatial positives, not only instance ones


@pytest.mark.parametrize("name,kw", ESS_CASES)
def test_ess_query_vs_queue_equals_brute_force(name, kw):
    g = torch.Generator().manual_seed(11)
    queries = _spatial_meta(5, g)
    queue = _spatial_meta(13, g, id_offset=3)  # ids 3, 4 also among the queries: older keys of the same images
    cands = {k: torch.cat([queries[k], queue[k]]) for k in queries}
    pos, neg = _brute_pairs(name, queries, cands, r=kw["r"], theta=kw.get("theta"), sigma=kw.get("sigma", kw["r"] / 2))
    pm = make_rule(name, **kw).pairs(queries, cands)
    assert pm.pos.shape == (5, 18)
    _assert_pm(pm, pos, neg, exact=name == "ess-mb")


@pytest.mark.parametrize("rule,kw", [("instance", {}), ("cluster", {"mode": "eliminate"}),
                                     ("cluster", {"mode": "attract"}), ("label", {})])
def test_rectangular_rules_equal_brute_force_and_build_the_square_form(rule, kw):
    g = torch.Generator().manual_seed(12)
    queries, queue = _spatial_meta(6, g), _spatial_meta(10, g, id_offset=4)
    r = make_rule(rule, **kw)
    pos, neg = _brute_pairs(rule, queries, queue, mode=kw.get("mode"))
    _assert_pm(r.pairs(queries, queue), pos, neg)
    img_pos, img_neg = _brute_pairs(rule, queries, queries, mode=kw.get("mode"))
    _assert_pm(r(queries), *_views_of(img_pos, img_neg))


def test_heading_wraps_around():
    # all at one spot; headings 359 / 1 differ by 2 degrees, 359 / 5 by 6, 180 / 1 by 179; NaN = unknown
    meta = {"image_id": T([0, 1, 2, 3, 4]), "x": torch.zeros(5), "y": torch.zeros(5),
            "heading": T([359.0, 1.0, 5.0, 180.0, NAN])}
    pm = make_rule("ess-mb", r=1.0, theta=2.0).pairs(meta, meta)
    assert pm.pos.tolist() == [[1, 1, 0, 0, 1],
                               [1, 1, 0, 0, 1],
                               [0, 0, 1, 0, 1],
                               [0, 0, 0, 1, 1],
                               [1, 1, 1, 1, 1]]
    assert make_rule("ess-mb", r=1.0, theta=6.0).pairs(meta, meta).pos[0].tolist() == [1, 1, 1, 0, 1]
    # without theta (or without headings) position alone decides
    assert make_rule("ess-mb", r=1.0).pairs(meta, meta).pos.sum() == 25
    no_heading = {k: v for k, v in meta.items() if k != "heading"}
    assert make_rule("ess-mb", r=1.0, theta=2.0).pairs(no_heading, no_heading).pos.sum() == 25


def test_ess_mw_weights_and_missing_positions_hand_computed():
    # image 0 at origin, 1 at 1 m, 2 at 2 m, 3 at 6 m (beyond r = 3 of all), 4 unknown position
    meta = {"image_id": T([0, 1, 2, 3, 4]), "x": T([0.0, 1.0, 2.0, 6.0, NAN]), "y": torch.zeros(5)}
    pm = make_rule("ess-mw", r=3.0, sigma=1.0).pairs(meta, meta)
    e = math.exp
    expected = [[1, e(-0.5), e(-2), 0, 0],
                [e(-0.5), 1, e(-0.5), 0, 0],
                [e(-2), e(-0.5), 1, 0, 0],
                [0, 0, 0, 1, 0],
                [0, 0, 0, 0, 1]]
    torch.testing.assert_close(pm.pos, torch.tensor(expected, dtype=torch.float32))
    assert pm.neg.tolist() == [[v == 0 for v in row] for row in expected]
    assert positives_per_anchor(pm) == {"positives_mean": 11 / 5, "positives_min": 1.0, "positives_max": 3.0}
    # the square form counts the other view: image 1 has 2 x 3 - 1 = 5 positive views
    assert positives_per_anchor(make_rule("ess-mb", r=3.0)(meta)) == {
        "positives_mean": (5 + 5 + 5 + 1 + 1) * 2 / 10, "positives_min": 1.0, "positives_max": 5.0}


def test_default_radius_hand_computed():
    # traverse 7 (frames given out of order): steps 3, 0 (stationary, ignored), 4 -> via a gap 5;
    # traverse 2: steps 6 and 10; traverse -1 and NaN positions ignored. Steps {3, 4, 5, 6, 10}: median 5.
    x = [0.0, 3.0, 3.0, 7.0, 12.0, 100.0, 106.0, 116.0, 50.0, NAN]
    y = [0.0] * 10
    traverse = [7, 7, 7, 7, 7, 2, 2, 2, -1, 2]
    frame = [0, 1, 2, 3, 5, 10, 11, 12, 0, 13]
    order = [4, 0, 8, 2, 6, 1, 9, 3, 5, 7]
    d = default_radius(*(np.array(col)[order] for col in (x, y, traverse, frame)))
    assert d == {"r": 10.0, "sigma": 5.0, "median_step": 5.0}
    assert default_radius(torch.tensor(x), torch.tensor(y), torch.tensor(traverse), torch.tensor(frame)) == d
    with pytest.raises(ValueError, match="explicitly"):
        default_radius([1.0, 1.0], [0.0, 0.0], [0, 0], [0, 1])


def test_ess_rule_errors():
    with pytest.raises(ValueError, match="radius r"):
        make_rule("ess-mb")
    with pytest.raises(ValueError, match="theta"):
        make_rule("ess-mw", r=1.0, theta=200.0)
    with pytest.raises(ValueError, match="sigma"):
        make_rule("ess-mw", r=1.0, sigma=0.0)
    with pytest.raises(ValueError, match="bad options"):
        make_rule("ess-mb", r=1.0, sigma=2.0)
    with pytest.raises(ValueError, match="'x'"):
        make_rule("ess-mb", r=1.0)({"image_id": T([1, 2])})
    with pytest.raises(ValueError, match="image_id"):
        make_rule("instance").pairs({"image_id": T([1])}, {"x": T([0.0])})
    assert make_rule("ess-mw", r=4.0).sigma == 2.0


def test_false_negative_stats_rectangular_hand_counted():
    # 2 queries (labels 0, 1) vs 4 candidates (labels 0, 0, 1, -1); candidate 0 is query 0's own key.
    labels_q, labels_c = T([0, 1]), T([0, 0, 1, -1])
    ids_q, ids_c = T([10, 11]), T([10, 12, 11, 13])
    base = InstanceRule().pairs({"image_id": ids_q}, {"image_id": ids_c})
    # baseline negatives with known labels: q0 vs c1 (same label: FN), c2; q1 vs c0, c1 -> 1 FN of 4
    stats = false_negative_stats(base, labels_q, candidate_labels=labels_c)
    assert stats == {"n_negative_pairs": 6, "fn_fraction": 1 / 4}
    pm = LabelRule().pairs({"image_id": ids_q, "label": labels_q}, {"image_id": ids_c, "label": labels_c})
    stats = false_negative_stats(pm, labels_q, base, candidate_labels=labels_c)
    assert stats == {"n_negative_pairs": 5, "fn_fraction": 0.0, "n_removed_pairs": 1,
                     "removed_precision": 1.0, "removed_recall": 1.0}
    with pytest.raises(ValueError, match="2 anchors x 3 candidates"):
        false_negative_stats(base, labels_q, candidate_labels=labels_c[:3])


def _fnc_brute_force(support: torch.Tensor, ids: list, k: int, threshold: float) -> set:
    """Detected (anchor, candidate) image pairs by loops: per anchor, sort the other images by similarity."""
    detected = set()
    for a in range(len(ids)):
        others = [c for c in range(len(ids)) if ids[c] != ids[a]]
        ranked = sorted(others, key=lambda c: -float(support[a] @ support[c]))[:k]
        detected |= {(a, c) for c in ranked if float(support[a] @ support[c]) > threshold}
    return detected


@pytest.mark.parametrize("k,threshold", [(1, -1.0), (3, 0.0), (5, 0.3), (50, 0.0)])
def test_fnc_rule_equals_brute_force_in_both_modes(k, threshold):
    """Per anchor, the k most similar other images above the threshold; eliminate: out of the negatives,
    attract: positives of weight 1; the square form tiles the image matrix over both views."""
    gen = torch.Generator().manual_seed(k)
    b = 12
    support = torch.nn.functional.normalize(torch.randn(b, 6, generator=gen), dim=1)
    ids = list(range(100, 100 + b))
    ids[5] = ids[4]  # a repeated image: always the positive, never counted among the k
    detected = _fnc_brute_force(support, ids, k, threshold)
    meta = {"image_id": T(ids), "support": support}
    for mode in ("eliminate", "attract"):
        pm = make_rule("fnc", k=k, threshold=threshold, mode=mode)(meta)
        for i in range(2 * b):
            for j in range(2 * b):
                a, c = i % b, j % b
                same = ids[a] == ids[c]
                found = (a, c) in detected
                expected_pos = i != j and (same or (mode == "attract" and found))
                assert pm.pos[i, j] == float(expected_pos), (mode, i, j)
                assert bool(pm.neg[i, j]) == (i != j and not same and not found), (mode, i, j)


def test_fnc_rule_removed_pairs_scored_against_labels():
    """Two tight groups of embeddings that match the labels: with k = group size - 1 every removed pair is a
    true false negative and every false negative is removed (precision = recall = 1)."""
    centres = torch.eye(4)[[0, 0, 0, 1, 1, 1]]
    support = torch.nn.functional.normalize(centres + 0.01 * torch.arange(24.0).reshape(6, 4).sin(), dim=1)
    meta, labels = {"image_id": torch.arange(6), "support": support}, T([0, 0, 0, 1, 1, 1])
    stats = false_negative_stats(make_rule("fnc", k=2)(meta), labels, make_rule("instance")(meta))
    assert stats["removed_precision"] == 1.0 and stats["removed_recall"] == 1.0 and stats["fn_fraction"] == 0.0


def test_fnc_rule_errors():
    with pytest.raises(ValueError, match="k >= 1"):
        make_rule("fnc", k=0)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        make_rule("fnc", threshold=1.5)
    with pytest.raises(ValueError, match="needs metadata 'support'"):
        make_rule("fnc")({"image_id": torch.arange(3)})
    with pytest.raises(ValueError, match=r"\[B\] \(or \[B, D\]\)"):
        make_rule("fnc")({"image_id": torch.arange(3), "support": torch.zeros(4, 2)})
