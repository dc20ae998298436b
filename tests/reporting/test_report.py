"""Sweep result files: the CSV round trip and the per-configuration mean and spread over seeds."""

import statistics

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
    assert "| cluster | 10 | 3 | 70.0 ± 10.0 |" in table and "| baseline | – | 1 | 50.0 |" in table
