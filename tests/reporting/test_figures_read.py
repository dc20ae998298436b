"""Figures that read: categorical axes for few swept values, the baseline as a band, the untrained encoder and the
oracle as reference lines, integer step ticks, per-step training curves, one-line readings stored in the PNGs and
shown as report.html's captions, and grouped tables sorted numerically without all-"–" columns. Hand-made rows:
no Ray, no training."""

from __future__ import annotations

import html
import statistics

import numpy as np
import pytest

from raysys.reporting import html as hr
from raysys.reporting import plots
from raysys.reporting import results as report
from raysys.reporting import run_figures


def _rows(method: str, accs: list[float], **fields) -> list[dict]:
    """One results.csv row per seed of a configuration."""
    k = fields.get("k", 0)
    return [{"trial": f"{method}-k{k}-s{s}", "method": method, "k": 0, "temperature": 0.5, "seed": s, "msl_acc": acc,
             "framework": None if method == "random-init" else "simclr",
             "pair_rule": {"baseline": "instance", "cluster": "cluster"}.get(method), **fields} for s, acc in enumerate(accs)]


def _band(ax) -> tuple[float, float]:
    """The y range of the axes' one horizontal band (axhspan: the axes' whole width, 0 to 1; bars are narrower)."""
    (band,) = [p for p in ax.patches if (p.get_x(), p.get_width()) == (0, 1)]
    return band.get_y(), band.get_y() + band.get_height()


def test_single_k_is_one_category_and_the_baseline_a_band(drawn, tmp_path):
    rows = _rows("baseline", [0.60, 0.70]) + _rows("cluster", [0.62, 0.72], k=20)
    reading = plots.plot_vs_param(report.group(rows), "msl", "k", tmp_path / "k.png", "title")
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["20"] and list(ax.get_xticks()) == [0]
    spread = 100 * statistics.stdev([0.60, 0.70])
    assert _band(ax) == pytest.approx((65 - spread, 65 + spread))
    assert reading == plots.figure_reading(tmp_path / "k.png")  # stored in the PNG


def test_few_uneven_values_are_categories_in_numeric_order(drawn, tmp_path):
    rows = _rows("baseline", [0.5]) + [r for k in (160, 10, 40) for r in _rows("cluster", [0.5 + k / 1000], k=k)]
    plots.plot_vs_param(report.group(rows), "msl", "k", tmp_path / "k.png", "title")
    ax = drawn[0].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["10", "40", "160"]
    (line,) = [c for c in ax.containers]  # the cluster line's error bars
    assert list(line.lines[0].get_xdata()) == [0, 1, 2]
    assert list(line.lines[0].get_ydata()) == pytest.approx([51, 54, 66])


def test_many_integer_values_keep_a_numeric_axis_with_integer_ticks(drawn, tmp_path):
    ks = list(range(10, 281, 30))
    rows = [r for k in ks for r in _rows("cluster", [0.5], k=k)]
    plots.plot_vs_param(report.group(rows), "msl", "k", tmp_path / "k.png", "title")
    ax = drawn[0].axes[0]
    assert list(ax.containers[0].lines[0].get_xdata()) == ks
    assert all(float(t).is_integer() for t in ax.get_xticks())


def test_untrained_encoder_and_oracle_are_reference_lines(drawn, tmp_path):
    rows = (_rows("baseline", [0.60, 0.70]) + _rows("cluster", [0.62, 0.72], k=20) + _rows("random-init", [0.30, 0.32])
            + _rows("cluster", [0.90, 0.92], noise=0.0))
    groups = report.group(rows)
    reading = plots.plot_vs_param(groups, "msl", "k", tmp_path / "k.png", "title")
    ax = drawn[0].axes[0]
    labels = ax.get_legend_handles_labels()[1]
    assert "untrained encoder (random-init): 31.0%" in labels and "oracle clusters (true labels): 91.0%" in labels
    references = {line.get_label(): line.get_ydata()[0] for line in ax.lines if line.get_label() in labels}
    assert references["oracle clusters (true labels): 91.0%"] == pytest.approx(91.0)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["20"]  # the oracle (K 0) is no point of the K line
    assert reading.endswith("; untrained encoder (random-init): 31.0 ± 1.4 %; oracle clusters (true labels): 91.0 ± 1.4 %.")


def test_reading_of_hand_made_rows():
    # Baseline 65.0 ± 7.1 (0.60, 0.70): K 20's 67.0 ± 7.1 overlaps it; K 40's 90.0 ± 1.4 (low 88.6 > 72.1) lies above,
    # K 80's 20.0 ± 1.4 (high 21.4 < 57.9) below.
    base = _rows("baseline", [0.60, 0.70])
    metric = "msl_acc"
    overlap = report.group(base + _rows("cluster", [0.62, 0.72], k=20))
    assert plots.comparison_reading(overlap, metric, "MSL", ("cluster",)) == (
        "MSL: no method separates from the baseline 65.0 ± 7.1 % by more than the seeds' spread (2 seeds).")
    apart = report.group(base + _rows("cluster", [0.62, 0.72], k=20) + _rows("cluster", [0.89, 0.91], k=40)
                         + _rows("cluster", [0.19, 0.21], k=80))
    assert plots.comparison_reading(apart, metric, "MSL", ("cluster",)) == (
        "MSL: cluster K=40 90.0 ± 1.4 % above and cluster K=80 20.0 ± 1.4 % below the baseline 65.0 ± 7.1 % "
        "by more than the seeds' spread (2 seeds).")
    single = report.group(_rows("baseline", [0.5]) + _rows("cluster", [0.6], k=20))
    assert "one seed per configuration gives no spread" in plots.comparison_reading(single, metric, "MSL")
    swept = report.group([r for t, accs in ((0.1, [0.50, 0.52]), (1.0, [0.70, 0.72]))
                          for r in _rows("baseline", accs, temperature=t)])
    assert plots.comparison_reading(swept, metric, "MSL", ("baseline",)) == (
        "MSL: the best, baseline 71.0 ± 1.4 %, separates from the worst, baseline 51.0 ± 1.4 %, by more than the "
        "seeds' spread (2 seeds).")


def test_bars_draw_the_baseline_band_and_store_their_reading(drawn, tmp_path):
    rows = _rows("baseline", [0.60, 0.70]) + _rows("fnc", [0.89, 0.91])
    reading = plots.plot_methods(report.group(rows), "msl", tmp_path / "bars.png", "title")
    spread = 100 * statistics.stdev([0.60, 0.70])
    assert _band(drawn[0].axes[0]) == pytest.approx((65 - spread, 65 + spread))
    assert reading == plots.figure_reading(tmp_path / "bars.png") and "fnc 90.0 ± 1.4 % above the baseline" in reading


def test_grouped_table_sorts_k_numerically_and_drops_columns_no_row_measured():
    rows = [r for k in (10, 160, 40) for r in _rows("cluster", [0.5, 0.6], k=k)] + _rows("baseline", [0.5, 0.6])
    table = report.grouped_table(report.group(rows), rows=rows)
    header, rule, *body = table.splitlines()
    assert [line.split(" | ")[3] for line in body if line.startswith("| cluster")] == ["10", "40", "160"]
    assert "HiRISE" not in header and "FN pairs" not in header and "kNN" not in header  # nothing measured them
    assert "| framework | pair rule | k | seeds | MSL acc |" in header  # columns some row filled stay
    assert header.count("|") == rule.count("|") and all(line.count("|") == header.count("|") for line in body)


def test_training_curves_are_drawn_per_step_with_integer_ticks(drawn):
    loss_steps = [(10, 5.0), (20, 4.6), (30, 4.1)]
    runs = {"a": {"train/loss_step": loss_steps, "train/loss": [(16, 4.8), (32, 4.0)],
                  "train/knn_acc": [(1, 0.30), (2, 0.35), (3, 0.40)]},
            "b": {"train/loss_step": [(10, 5.1), (20, 5.2), (30, 5.3)], "train/knn_acc": [(1, 0.2), (2, 0.25), (3, 0.3)]}}
    png = run_figures.training_curves_png(runs)
    loss_ax, knn_ax = drawn[0].axes
    line_a = next(line for line in loss_ax.lines if line.get_label() == "a")
    assert list(line_a.get_xdata()) == [s for s, _ in loss_steps]  # every logged step, not the epochs' ends
    assert "per logged step" in loss_ax.get_title() and "at each epoch end" in knn_ax.get_title()
    assert all(float(t).is_integer() for ax in (loss_ax, knn_ax) for t in ax.get_xticks())
    assert plots.figure_reading(png) == ("loss fell in 1 of 2 runs (median 5.05 at the first point, 4.7 at the last); "
                                          "last kNN accuracy 30.0–40.0 % (best: a).")
    # A run shorter than the logging interval (one logged step, two epoch ends): the epoch means draw more.
    short = {"train/loss_step": [(10, 4.5)], "train/loss": [(7, 4.6), (14, 4.4)], "train/knn_acc": [(7, 0.1), (14, 0.2)]}
    png = run_figures.training_curves_png({"a": short, "b": short})
    assert "epoch mean" in drawn[1].axes[0].get_title()
    assert plots.figure_reading(png) == ("loss fell in 2 of 2 runs (median 4.6 at the first point, 4.4 at the last); "
                                          "last kNN accuracy 20.0 % in every run.")


def test_confusion_reading_names_the_accuracy_and_the_worst_confusion():
    png = run_figures.confusion_png({"class_names": ["rock", "sand"], "metrics": {"confusion_matrix": [[3, 1], [0, 2]]}},
                                    "msl confusion matrix")
    assert plots.figure_reading(png) == ("accuracy 83.3 % of 6 test images; most frequent confusion: rock taken for "
                                          "sand (1 of 4 rock images).")
    assert run_figures.confusion_reading(np.diag([2, 3]), ["a", "b"]) == "accuracy 100.0 % of 5 test images."


def test_report_captions_carry_each_figures_reading(tmp_path):
    rows = _rows("baseline", [0.60, 0.70]) + _rows("cluster", [0.62, 0.72], k=20)
    report.write_results_csv(rows, tmp_path / "results.csv")
    reading = plots.plot_vs_param(report.group(rows), "msl", "k", tmp_path / "sweep_k-msl.png", "title")
    page = hr.render_report(tmp_path)
    assert f"<figcaption><code>sweep_k-msl.png</code>: {html.escape(reading, quote=True)}</figcaption>" in page
    assert plots.figure_reading(b"not a png") is None


def test_label_fraction_and_simulation_plots_store_their_readings(tmp_path):
    from raysys.reporting import fn_simulation, label_fraction

    # simclr: 60 % at full labels, 59.5 % at half (within 1 point), 50 % at a tenth: the plateau starts at 50 %.
    rows = [{"encoder": "simclr", "benchmark": "msl", "fraction": f, "seed": 0, "n_train": 100 * f, "accuracy": a,
             "balanced_accuracy": a} for f, a in ((0.1, 0.50), (0.5, 0.595), (1.0, 0.60))]
    summary = label_fraction.summarize(rows)
    label_fraction.plot_curves(summary, "msl", tmp_path / "lf.png", majority=0.4)
    assert plots.figure_reading(tmp_path / "lf.png") == (
        "MSL: simclr 60.0 % with every label, within 1 point of it from 50 % of them; majority class 40.0 %.")
    # exact 10 %: 10.1 ± 0.1 is within 2 s.e., 10.5 ± 0.1 is not (gap 0.5 points)
    points = [{"classes": 10, "simulated_mean": m, "simulated_sem": 0.001, "analytic": 0.10} for m in (0.101, 0.105)]
    assert fn_simulation.agreement_reading(points) == (
        "The simulation agrees with the exact expectation within 2 standard errors at 1 of 2 points (largest gap "
        "0.5 points).")


def test_map_reading_counts_nearest_neighbours_of_the_same_group():
    from raysys.reporting.visualize import UNLABELED, map_reading

    # Two tight pairs far apart, one group each, and an unlabeled point: every labelled image's neighbour is its
    # pair (100 %); two of the four at random share a group with chance (2 + 2) / (4 * 3) = 33 %.
    coords = np.array([[0, 0], [0, 1], [50, 0], [50, 1], [0, 0.5]], dtype=float)
    groups = np.array([0, 0, 1, 1, UNLABELED])
    assert map_reading(coords, groups) == ("100 % of the 4 labelled images have a nearest neighbour in the map of "
                                           "their own group (2 groups; two images at random: 33 %).")
    assert map_reading(coords[:4], np.array([0, 1, 0, 1])).startswith("0 % ")  # each neighbour: the other group
