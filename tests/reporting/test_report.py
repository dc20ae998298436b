"""Sweep result files: the CSV round trip and the per-configuration mean and spread over seeds."""

import statistics

import pytest

from raysys.reporting import plots
from raysys.reporting import results as report


def _row(trial, method, k, seed, msl):
    return {"trial": trial, "method": method, "k": k, "temperature": 0.5, "seed": seed, "msl_acc": msl,
            "fn_fraction": None if method == "supervised" else 0.15}


def test_results_csv_round_trip(tmp_path):
    rows = [_row("cluster-k10-t0.5-s0", "cluster", 10, 0, 0.625), _row("supervised-t0.5-s0", "supervised", 0, 0, 0.75)]
    path = tmp_path / "results.csv"
    report.write_results_csv(rows, path)
    back = report.read_results_csv(path)
    assert [r["trial"] for r in back] == sorted(r["trial"] for r in rows)
    assert back[0]["k"] == 10 and back[0]["msl_acc"] == 0.625 and back[1]["fn_fraction"] is None
    assert not list(tmp_path.glob(".results.csv.*")), "no temporary file may be left behind"


def test_group_mean_and_std_over_seeds():
    rows = [_row(f"cluster-k10-s{s}", "cluster", 10, s, acc) for s, acc in enumerate([0.6, 0.7, 0.8])]
    rows.append(_row("baseline-s0", "baseline", 0, 0, 0.5))
    groups = {(g["method"], g["k"]): g for g in report.group(rows)}
    cluster = groups[("cluster", 10)]
    assert cluster["n"] == 3
    assert abs(cluster["msl_acc"] - 0.7) < 1e-12
    assert abs(cluster["msl_acc_std"] - statistics.stdev([0.6, 0.7, 0.8])) < 1e-12
    assert groups[("baseline", 0)]["msl_acc_std"] == 0.0 and groups[("baseline", 0)]["hirise_acc"] is None
    table = report.results_table(list(groups.values()))
    assert "| cluster | – | – | 10 | 3 | 70.0 ± 10.0 |" in table and "| baseline | – | – | – | 1 | 50.0 |" in table


def test_tables_name_the_framework_and_pair_rule_beside_the_method():
    rows = [{**_row(f"baseline-s{s}", "baseline", 0, s, 0.5), "framework": framework, "pair_rule": "instance"}
            for s, framework in enumerate(("simclr", "moco"))]
    rows.append({**_row("ess-mb-s0", "ess-mb", 0, 0, 0.6), "framework": "moco", "pair_rule": "ess-mb"})
    rows.append({**_row("rotation-s0", "rotation", 0, 0, 0.4), "framework": "rotation", "pair_rule": None})
    groups = report.group(rows)
    assert len(groups) == 4  # the SimCLR and the MoCo v2 baselines are not averaged together
    for table in (report.results_table(groups), report.methods_table(groups), report.spatial_table(groups)):
        assert table.startswith("| method | framework | pair rule |")
        for cells in ("| baseline | SimCLR | instance |", "| baseline | MoCo v2 | instance |",
                      "| ess-mb | MoCo v2 | ess-mb |", "| rotation | rotation | – |"):
            assert cells in table, (cells, table)
        header, rule, *body = table.splitlines()
        assert header.count("|") == rule.count("|") and all(line.count("|") == header.count("|") for line in body)


def _fn_rows(baseline: list[float], curves: dict[str, list[tuple[float, float, list[float]]]]) -> list[dict]:
    """results.csv rows of a noisy-oracle sweep: the baseline's MSL accuracies per seed, and per mode
    (noise, removed precision, MSL accuracies per seed)."""
    rows = [{"trial": f"baseline-s{s}", "method": "baseline", "k": 0, "seed": s, "msl_acc": acc}
            for s, acc in enumerate(baseline)]
    for mode, points in curves.items():
        for noise, precision, accs in points:
            rows += [{"trial": f"cluster-{mode}-n{noise}-s{s}", "method": "cluster", "k": 0, "noise": noise,
                      "cluster_mode": mode, "seed": s, "msl_acc": acc, "removed_precision": precision}
                     for s, acc in enumerate(accs)]
    return rows


def test_precision_reading_names_the_precision_above_which_elimination_pays():
    # Baseline 0.50 ± 0.01: a level must keep mean - std above 0.51. Eliminate pays from precision 0.6 on
    # (0.55 ± 0.01 and 0.60 ± 0.01; 0.2 is below); attract's only winner (precision 0.2) is followed by a
    # loss, so it has no precision above which it pays.
    rows = _fn_rows([0.49, 0.50, 0.51], {
        "eliminate": [(1.0, 0.2, [0.49, 0.50, 0.51]), (0.5, 0.6, [0.54, 0.55, 0.56]), (0.0, 1.0, [0.59, 0.60, 0.61])],
        "attract": [(1.0, 0.2, [0.59, 0.60, 0.61]), (0.0, 1.0, [0.49, 0.50, 0.51])],
    })
    groups = report.group(rows)
    reading = plots.precision_reading(groups, "msl")
    assert "eliminate beats the baseline 50.0 ± 1.0 % by more than the seeds' spread at every removed-pair " \
           "precision from 0.60 on (noise 0.5: 55.0 ± 1.0 %)" in reading
    assert "attract does not beat the baseline 50.0 ± 1.0 % by more than the seeds' spread even at precision 1.00" \
           in reading
    table = report.grouped_table(groups, plot="precision")
    # framework, pair rule, recall, FN pairs, NMI and HiRISE measured nothing: their columns are gone
    assert table.startswith("| method | mode | noise | removed precision | MSL acc % | seeds |\n")
    assert "| baseline | – | – | – | 50.0 ± 1.0 | 3 |" in table and "| cluster | eliminate | 0.5 | 0.6 | 55.0 ± 1.0 | 3 |" in table


def test_precision_reading_refuses_a_single_seed(tmp_path):
    groups = report.group(_fn_rows([0.5], {"eliminate": [(0.0, 1.0, [0.9])]}))
    assert "no spread" in plots.precision_reading(groups, "msl")
    path = tmp_path / "p.png"
    plots.plot_vs_precision(groups, "msl", path, "title")
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_paired_difference_subtracts_the_baseline_of_the_same_seed():
    rows = [_row(f"baseline-s{s}", "baseline", 0, s, acc) for s, acc in enumerate([0.50, 0.70, 0.40])]
    rows += [_row(f"cluster-k10-s{s}", "cluster", 10, s, acc) for s, acc in enumerate([0.55, 0.72, 0.39])]
    rows.append(_row("cluster-k10-s7", "cluster", 10, 7, 0.99))  # no baseline of seed 7: not paired
    groups = report.group(rows)
    cluster = next(g for g in groups if g["method"] == "cluster")
    deltas = report.paired_deltas(rows, cluster)
    assert deltas == pytest.approx([0.05, 0.02, -0.01])
    table = report.results_table(groups, rows=rows)
    spread = 100 * statistics.stdev([0.05, 0.02, -0.01])
    assert f"| +2.0 ± {spread:.1f} (2/3 seeds up) |" in table and "MSL acc − baseline, same seed" in table
    assert "same seed" not in report.results_table(groups)  # without the trials, no pairing
