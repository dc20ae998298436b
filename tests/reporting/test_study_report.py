"""The study's statistics against hand computations: paired gaps, Student-t intervals, the separation step."""

import math

import pytest

from raysys.reporting import fn_study


def _rows() -> list[dict]:
    """simclr and oracle-elim over 3 seeds at steps 0 and 100; oracle is +1, +2, +3 points at step 100
    (51, 62, 73 %: mean 62, sd 11)."""
    rows = []
    for seed, base in enumerate((0.50, 0.60, 0.70)):
        rows += [{"arm": "simclr", "seed": seed, "step": 0, "knn_acc": 0.4},
                 {"arm": "oracle-elim", "seed": seed, "step": 0, "knn_acc": 0.4},
                 {"arm": "simclr", "seed": seed, "step": 100, "knn_acc": base},
                 {"arm": "oracle-elim", "seed": seed, "step": 100, "knn_acc": base + 0.01 * (seed + 1)}]
    return rows


def test_paired_gap_is_the_mean_per_seed_difference_with_a_t_interval():
    (step0, m0, lo0, hi0, n0), (step, mean, low, high, n) = fn_study.paired_gaps(_rows(), "knn_acc")["oracle-elim"]
    assert (step0, m0, lo0, hi0, n0) == (0, 0.0, 0.0, 0.0, 3)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t(0.975, 2) x sd(1, 2, 3 points) / sqrt(3)
    assert (step, n) == (100, 3) and mean == pytest.approx(0.02)
    assert low == pytest.approx(0.02 - half) and high == pytest.approx(0.02 + half)


def test_separation_is_the_first_step_above_zero_and_how_often_it_stays():
    gaps = [(0, 0, -1, 1, 3), (50, 1, 0.5, 2, 3), (100, 0.5, -0.1, 1, 3), (150, 1, 0.2, 2, 3), (200, 1, 0.1, 2, 3)]
    assert fn_study.separation(gaps) == (50, 3, 4)
    assert fn_study.separation(gaps[:1]) is None


def test_table_and_reading_name_the_gap():
    rows = _rows()
    table = fn_study.study_table(rows, ["simclr", "oracle-elim"], {"oracle-elim": "oracle"})
    assert "| oracle-elim | oracle | 3 | 100 | 62.0 ± 11.0 | – | +2.0 [-0.5, +4.5] |" in table and "| simclr |" in table
    (line,) = fn_study.study_reading(rows, ["simclr", "oracle-elim"])
    assert "**oracle-elim**" in line and "+2.0 points" in line and "does not separate" in line  # CI spans 0


def test_gap_table_has_a_row_per_step():
    table = fn_study.gap_table(_rows(), ["simclr", "oracle-elim"])
    assert table.splitlines()[0] == "| step | oracle-elim |"
    assert "| 0 | +0.0 [+0.0, +0.0] |" in table and "| 100 | +2.0 [-0.5, +4.5] |" in table


def test_pairing_check_names_the_seed_whose_arms_differ():
    same = {"init_weights_sha256": "a", "first_batch_image_ids": [1, 2]}
    curves = {"simclr-s0": same, "supcon-s0": same, "simclr-s1": same, "supcon-s1": {**same, "first_batch_image_ids": [2, 1]}}
    arm_seed = {t: (t.rsplit("-", 1)[0], int(t[-1])) for t in curves}
    assert fn_study.pairing_check({t: curves[t] for t in ("simclr-s0", "supcon-s0")}, arm_seed).startswith("Pairing checked")
    assert "seed 1: ['simclr', 'supcon']" in fn_study.pairing_check(curves, arm_seed)


def test_gap_reading_is_stored_in_the_study_plot(tmp_path):
    from raysys.reporting.plots import figure_reading

    rows = _rows()  # oracle-elim +2.0 [-0.5, +4.5] at step 100 (see above): its interval spans 0
    reading = fn_study.gap_reading(rows)
    assert reading == ("kNN accuracy, paired gap to simclr at step 100 (points, 95 % interval, 3 seeds): "
                       "oracle-elim +2.0 [-0.5, +4.5]; no interval clear of 0.")
    lifted = [{**r, "knn_acc": r["knn_acc"] + 0.1} if r["arm"] == "oracle-elim" else r for r in rows]
    assert fn_study.gap_reading(lifted).endswith("oracle-elim +12.0 [+9.5, +14.5]; above 0: oracle-elim.")
    fn_study.plot_study(rows, ["simclr", "oracle-elim"], tmp_path / "study.png")
    assert figure_reading(tmp_path / "study.png") == reading


def test_removed_pairs_plot_reads_the_last_steps_precision_and_recall(tmp_path):
    from raysys.reporting.plots import figure_reading

    rows = [{"arm": "simclr", "seed": s, "step": step, "false_negative_fraction": 0.1} for s in (0, 1) for step in (0, 4)]
    rows += [{"arm": "fnc", "seed": s, "step": step, "removed_pair_precision": p, "removed_pair_recall": r}
             for s in (0, 1) for step, p, r in ((0, 0.2 + 0.1 * s, 0.1), (4, 0.3 + 0.1 * s, 0.2))]
    assert fn_study.plot_removed_pairs(rows, tmp_path / "pairs.png")
    assert figure_reading(tmp_path / "pairs.png") == (
        "Removed pairs at the last step: fnc precision 0.35, recall 0.20 (random removal: 0.10).")
