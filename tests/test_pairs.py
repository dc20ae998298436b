"""Pair rules against hand-written matrices; false-negative statistics against hand counts and brute force."""

import math

import pytest
import torch

from raysys.pairs import (ClusterRule, InstanceRule, LabelRule, PairMatrix, count_false_negative_view_pairs,
                          false_negative_fraction_all_pairs, false_negative_stats, make_rule)

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
