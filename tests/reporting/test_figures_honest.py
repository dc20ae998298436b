"""Figures that cannot mislead, read from the figures' own data (matplotlib artists and labels, never pixels):
every accuracy figure draws the majority-class and chance lines, an imbalanced benchmark leads with balanced
accuracy, axes carry their unit (%), a legend claims a spread only with two seeds or more, and the training curves
name their benchmark and split. Results rows are made by hand (no Ray, no training); the floors they carry are
worked out by hand from class counts. Last, what a browser shows: the report's screenshot, where Chromium is."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.container import BarContainer, ErrorbarContainer

from raysys.reporting import fn_study
from raysys.reporting import html as hr
from raysys.reporting import plots
from raysys.reporting import results as report
from raysys.reporting import run_figures

# A HiRISE-like test split: 8 classes, each in it, 5/6 of its images the most frequent train class. Always
# predicting it scores 5/6 = 83.3 % accuracy and 1/8 = 12.5 % balanced accuracy (one class of 8 right); chance 1/8.
HIRISE_FLOOR = {"hirise_majority_acc": 5 / 6, "hirise_majority_balanced_acc": 1 / 8, "hirise_chance_acc": 1 / 8}
# An MSL-like one: 4 classes, majority class 40 % of test; balanced 1/4; chance 1/4. Imbalanced too (40 - 25 > 10).
MSL_FLOOR = {"msl_majority_acc": 0.40, "msl_majority_balanced_acc": 0.25, "msl_chance_acc": 0.25}
PERCENT = 100


def _row(trial: str, method: str, seed: int, msl: float, hirise: float, **fields) -> dict:
    """A results.csv row with both benchmarks' accuracies (balanced: a third of the plain one) and their floors."""
    return {"trial": f"{trial}-s{seed}", "method": method, "k": fields.pop("k", 0), "temperature": 0.5, "seed": seed,
            "msl_acc": msl, "msl_balanced_acc": msl / 3, "hirise_acc": hirise, "hirise_balanced_acc": hirise / 3,
            **MSL_FLOOR, **HIRISE_FLOOR, **fields}


def _smoke_rows(seeds: int = 1) -> list[dict]:
    """The smoke K sweep's shape: baseline, cluster K=4, and a supervised reference that scores the majority class."""
    rows = []
    for s in range(seeds):
        rows += [_row("baseline", "baseline", s, 0.30 + s / 100, 0.21 + s / 100),
                 _row("cluster-k4", "cluster", s, 0.33 + s / 100, 0.30 + s / 100, k=4),
                 _row("supervised", "supervised", s, 0.40, 5 / 6)]
    return rows


def _horizontal(ax) -> dict[str, float]:
    """Every labelled horizontal line across the axes (axhline: x from 0 to 1 in axes coordinates), label -> y."""
    return {line.get_label(): line.get_ydata()[0] for line in ax.lines
            if list(line.get_xdata()) == [0, 1] and len(set(line.get_ydata())) == 1}


def _legend_labels(ax) -> list[str]:
    legend = ax.get_legend() or ax.figure.legends[0]
    return [t.get_text() for t in legend.get_texts()]


def _spread_drawn(ax) -> bool:
    """Error bars (vertical or horizontal) or a band: anything that draws a spread."""
    bars = any(c.has_yerr or c.has_xerr for c in ax.containers if isinstance(c, ErrorbarContainer))
    bar_errors = any(c.errorbar is not None for c in ax.containers if isinstance(c, BarContainer))
    band = any((p.get_x(), p.get_width()) == (0, 1) for p in ax.patches)
    return bars or bar_errors or band


def _majority_line(ax, share: float) -> str:
    """The label of the axes' majority-class line, which must sit at ``share`` (in %)."""
    (label,) = [label for label, y in _horizontal(ax).items() if label.startswith(plots.MAJORITY_LABEL)]
    assert _horizontal(ax)[label] == pytest.approx(PERCENT * share)
    return label


def test_the_trial_carries_the_linear_evaluations_majority_and_chance():
    from raysys.distributed.sweep_trial import _floor
    from raysys.eval.linear import majority_baseline

    # class 0 the most frequent in train; test: 55 of 66 images class 0, every other class at least once
    train_y, test_y = np.array([0] * 9 + list(range(1, 8))), np.array([0] * 55 + list(range(1, 8)) + [1, 2, 3, 4])
    evaluation = {"majority": majority_baseline(train_y, test_y, 8), "class_names": [f"c{i}" for i in range(8)]}
    assert _floor("hirise", evaluation) == pytest.approx(HIRISE_FLOOR)
    assert set(HIRISE_FLOOR) <= set(report.RESULT_COLUMNS) and set(HIRISE_FLOOR) <= set(report.METRICS)


def test_every_sweep_figure_draws_the_floor_and_leads_with_balanced_accuracy(drawn, tmp_path):
    from raysys.distributed.sweep import SweepSpec
    from raysys.distributed.sweep_summary import write_summary

    spec = SweepSpec(name="sweep_k", out=str(tmp_path), base={}, command="python experiments/sweep_k.py")
    files = write_summary(spec, _smoke_rows(), [])
    # both benchmarks are imbalanced: balanced accuracy first, in the files and in summary.md's order
    assert files[1:] == ["sweep_k-msl-balanced.png", "sweep_k-msl.png", "sweep_k-hirise-balanced.png",
                         "sweep_k-hirise.png"]
    summary = (tmp_path / "summary.md").read_text()
    assert [summary.index(f"![{f}]") for f in files[1:]] == sorted(summary.index(f"![{f}]") for f in files[1:])
    assert "Best trial on MSL test balanced accuracy: **cluster-k4-s0** (11.0 %)" in summary
    floors = {"msl": ((0.40, 0.25), (0.25, 0.25)), "hirise": ((5 / 6, 1 / 8), (1 / 8, 1 / 8))}
    for fig, name in zip(drawn, files[1:]):
        ax = fig.axes[0]
        benchmark, balanced = name.split("-")[1].removesuffix(".png"), "balanced" in name
        (plain_floor, balanced_floor) = floors[benchmark]
        majority, chance = balanced_floor if balanced else plain_floor
        label = _majority_line(ax, majority)
        if majority == chance:  # one line, named for both
            assert label.startswith(f"{plots.MAJORITY_LABEL} = chance (1/{round(1 / chance)} classes)")
        else:
            assert _horizontal(ax)[f"chance (1/{round(1 / chance)} classes): {PERCENT * chance:.1f}%"] == \
                pytest.approx(PERCENT * chance)
        assert ax.get_ylabel().endswith("accuracy (%)") and ("balanced" in ax.get_ylabel()) == balanced
        assert ax.get_ylim()[0] == 0 and ax.get_xlabel() == "K (number of clusters)"
        # one seed: neither bars nor a band, and no legend entry says mean ± std
        assert not _spread_drawn(ax) and not any("±" in t for t in _legend_labels(ax))
        assert "cluster (1 seed)" in _legend_labels(ax)
        (point,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        row = _smoke_rows()[1]
        assert point.lines[0].get_ydata()[0] == pytest.approx(PERCENT * row[plots.accuracy_metric(benchmark, balanced)])
    hirise = drawn[3].axes[0]  # the supervised reference scores the majority class, and its label says so
    assert _horizontal(hirise)["supervised, from scratch: 83.3% = majority class"] == pytest.approx(PERCENT * 5 / 6)


def test_two_seeds_draw_the_spread_and_say_so(drawn, tmp_path):
    groups = report.group(_smoke_rows(seeds=2))
    plots.plot_vs_param(groups, "hirise", "k", tmp_path / "k.png", "title", balanced=True)
    plots.plot_methods(groups, "msl", tmp_path / "bars.png", "title", balanced=True)
    for fig in drawn:
        ax = fig.axes[0]
        assert _spread_drawn(ax) and any("± " in t and "over 2 seeds" in t for t in _legend_labels(ax) + [ax.get_xlabel()])
        _majority_line(ax, 0.25 if "MSL" in ax.get_ylabel() else 1 / 8)


def test_bars_and_precision_curves_with_one_seed_claim_no_spread(drawn, tmp_path):
    rows = _smoke_rows() + [_row("cluster-eliminate-n0.5", "cluster", 0, 0.35, 0.5, noise=0.5, removed_precision=0.6,
                                 removed_recall=0.3, cluster_mode="eliminate")]
    groups = report.group(rows)
    plots.plot_methods(groups, "hirise", tmp_path / "bars.png", "title")
    plots.plot_vs_precision(groups, "msl", tmp_path / "precision.png", "title", balanced=True)
    bars, precision = (fig.axes[0] for fig in drawn)
    assert bars.get_xlabel() == "method (1 seed)" and "83.3 = majority class" in [t.get_text() for t in bars.texts]
    _majority_line(bars, 5 / 6)
    _majority_line(precision, 0.25)
    for ax in (bars, precision):
        assert not _spread_drawn(ax) and not any("±" in t for t in _legend_labels(ax)) and ax.get_ylabel().endswith("(%)")


def test_study_figure_claims_its_spread_only_with_two_seeds(drawn, tmp_path):
    def rows(seeds):
        return [{"arm": arm, "seed": s, "step": step, "knn_acc": 0.4 + step / 1000 + s / 100 + (arm != "simclr") / 50}
                for arm in ("simclr", "oracle-elim") for s in range(seeds) for step in (0, 100)]

    for seeds in (1, 2):
        fn_study.plot_study(rows(seeds), ["simclr", "oracle-elim"], tmp_path / f"study-{seeds}.png")
    (one, _), (two, _) = (fig.axes for fig in drawn)
    assert one.get_ylabel() == two.get_ylabel() == "kNN accuracy (%)"
    assert "±" not in one.get_title() and not one.collections  # no band
    assert "mean ± sd over seeds" in two.get_title() and len(two.collections) == 2  # one band per arm


def test_training_curves_in_percent_naming_the_monitor_with_its_floor(drawn):
    runs = {"a": {"train/loss": [(7, 4.7), (14, 4.5)], "train/knn_acc": [(7, 0.16), (14, 0.21)]}}
    png = run_figures.training_curves_png(runs, "MSL", floor=(0.30, 0.05))
    loss_ax, knn_ax = drawn[0].axes
    assert loss_ax.get_ylabel() == "loss (no unit)" and knn_ax.get_ylabel() == "kNN accuracy (%)"
    assert loss_ax.get_xlabel() == knn_ax.get_xlabel() == "training step"
    assert knn_ax.get_title() == "kNN accuracy (%) on MSL val, at each epoch end"
    (line,) = [line for line in knn_ax.lines if line.get_label() == "a"]
    assert list(line.get_ydata()) == pytest.approx([16, 21])  # fractions logged, % drawn
    assert _majority_line(knn_ax, 0.30) == "majority class (always predicted): 30.0%"
    assert _horizontal(knn_ax)["chance (1/20 classes): 5.0%"] == pytest.approx(5)
    assert _legend_labels(knn_ax) == ["a", "majority class (always predicted): 30.0%", "chance (1/20 classes): 5.0%"]
    assert plots.figure_reading(png).endswith("always predicting the majority class 30.0 %.")


def test_monitor_floor_from_the_class_counts():
    # train 10/30/5: class 1 the majority; val 2/4/2 -> 4 of 8 queries; without val, the train share 30/45
    counts = {"train": {"per_class": [10, 30, 5]}, "val": {"per_class": [2, 4, 2]}}
    assert run_figures.monitor_floor({"counts": counts}) == pytest.approx((0.5, 1 / 3))
    no_val = {"train": counts["train"], "val": {"per_class": [0, 0, 0]}}
    assert run_figures.monitor_floor({"counts": no_val}) == pytest.approx((30 / 45, 1 / 3))
    assert run_figures.monitor_floor({}) is None


def _run_folder(root: Path) -> Path:
    """A pretraining run folder as ``raysys pretrain`` leaves it: config, kNN monitor scalars, an evaluation."""
    from torch.utils.tensorboard import SummaryWriter

    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"knn_monitor": "msl"}))
    with SummaryWriter(str(root / "tb")) as writer:
        for step, (loss, acc) in enumerate([(4.7, 0.16), (4.5, 0.21)], 1):
            writer.add_scalar("train/loss", loss, 7 * step)
            writer.add_scalar("train/knn_acc", acc, 7 * step)
    (root / "eval-msl.json").write_text(json.dumps({
        "class_names": ["a", "b", "c", "d"], "counts": {"train": {"per_class": [1, 5, 2, 2]}, "val": {"per_class": [1, 2, 1, 1]}},
        "metrics": {"accuracy": 0.5, "balanced_accuracy": 0.3, "confusion_matrix": [[1, 1], [1, 1]]},
        "majority": {"accuracy": 0.4, "balanced_accuracy": 0.25}}))
    return root


def test_run_report_draws_the_monitors_floor_and_tables_in_percent(tmp_path):
    page = hr.render_report(_run_folder(tmp_path))
    # the monitor's majority class (b): 2 of 5 val queries; the caption holds the curves' reading
    assert "last kNN accuracy 21.0 % in every run, always predicting the majority class 40.0 %." in page
    assert "Always predicting the majority train class: 40.0 %." in page  # the confusion matrix's caption
    assert "<td>50.0</td><td>30.0</td><td>–</td><td>40.0</td><td>25.0</td><td>25.0</td>" in page


def test_sweep_report_claims_no_spread_with_one_seed(tmp_path):
    report.write_results_csv(_smoke_rows(), tmp_path / "results.csv")
    page = hr.render_report(tmp_path)
    assert "Mean ± std" not in page and "One seed per configuration, no spread (accuracies in %)" in page
    assert "HiRISE majority class 83.3 % (balanced accuracy 12.5 %), chance 12.5 %, imbalanced" in page
    report.write_results_csv(_smoke_rows(seeds=2), tmp_path / "results.csv")
    assert "Mean ± std over seeds (accuracies in %)" in hr.render_report(tmp_path)


BROWSER = next((b for b in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if b), None)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (Debian: apt-get install chromium); CI has none")
def test_screenshot_of_a_sweep_report_fits_the_window(tmp_path, capsys):
    """bench/report_screenshot.py on a sweep folder: the browser's own layout has every table inside the window
    (the wide ones scroll in their own box), a non-blank page, and the screens to look at."""
    script = Path(__file__).parents[2] / "bench" / "report_screenshot.py"
    spec = importlib.util.spec_from_file_location("report_screenshot", script)
    screenshot = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(screenshot)
    folder = tmp_path / "sweep"
    folder.mkdir()
    report.write_results_csv(_smoke_rows(), folder / "results.csv")  # about 40 columns: wider than the window
    assert screenshot.main([str(folder), "--browser", BROWSER, "--out", str(tmp_path / "shot.png")]) == 0
    out = capsys.readouterr().out
    assert "1 wider than their box (they scroll inside it), 0 cut off" in out and "fits the window" in out
    assert (tmp_path / "shot-01.png").is_file()
