"""Sweep results: ``results.csv`` (written atomically), a grouped summary, ``summary.md`` and plots."""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path

from raysys import storage

# One row per trial; the first columns are the ones the paper's tables and figures need.
RESULT_COLUMNS = [
    "trial", "method", "framework", "pair_rule", "k", "noise", "cluster_mode", "decoupled", "temperature", "lr", "mix_ratio", "seed",
    "msl_acc", "msl_balanced_acc", "hirise_acc", "hirise_balanced_acc", "msl_ft_acc", "hirise_ft_acc",
    "msl_knn_acc", "msl_knn_balanced_acc", "hirise_knn_acc", "hirise_knn_balanced_acc",
    "fn_fraction", "removed_precision", "removed_recall", "cluster_nmi", "cluster_purity", "cluster_traverse_nmi",
    "cluster_pair_precision", "cluster_pair_recall", "cluster_clustered_share", "ess_radius", "ess_sigma", "ess_radius_m", "ess_sigma_m",
    "positives_per_anchor", "place_recall1", "place_recall5", "place_median_error", "place_chance_recall1",
    "knn_acc", "pool_knn_acc", "pool_knn_balanced_acc", "pretext_accuracy", "stopped_at_epoch", "pretrain_seconds",
]
# What tells configurations apart (not the seed).
GROUP_KEYS = ("method", "framework", "pair_rule", "k", "noise", "cluster_mode", "decoupled", "temperature", "lr", "mix_ratio",
              "ess_radius", "ess_sigma")
METRICS = ["msl_acc", "msl_balanced_acc", "hirise_acc", "hirise_balanced_acc", "msl_ft_acc", "hirise_ft_acc",
           "msl_knn_acc", "msl_knn_balanced_acc", "hirise_knn_acc", "hirise_knn_balanced_acc", "fn_fraction",
           "place_recall1", "place_recall5", "place_median_error", "place_chance_recall1", "ess_radius_m",
           "ess_sigma_m", "positives_per_anchor", "pretext_accuracy", "removed_precision", "removed_recall",
           "cluster_nmi", "cluster_traverse_nmi", "cluster_pair_precision", "pool_knn_acc", "pool_knn_balanced_acc"]


def write_atomic(path: str | Path, text: str) -> None:
    """Write then rename, so a killed process never leaves a half-written file behind."""
    storage.write_text_atomic(str(path), text)


def write_results_csv(rows: list[dict], path: str | Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: r["trial"]):
        writer.writerow({k: ("" if _missing(row.get(k)) else row.get(k)) for k in RESULT_COLUMNS})
    write_atomic(path, buf.getvalue())


def read_results_csv(path: str | Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [{k: _parse(v) for k, v in row.items()} for row in csv.DictReader(f)]


def _parse(value: str):
    if value == "":
        return None
    try:
        number = float(value)
    except ValueError:
        return value
    return int(number) if number.is_integer() and "." not in value else number


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def group(rows: list[dict], keys=GROUP_KEYS) -> list[dict]:
    """Mean and standard deviation over seeds of every metric, per combination of ``keys``."""
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in keys)].append(row)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(str(x) for x in kv[0])):
        entry = dict(zip(keys, key), n=len(members))
        for metric in METRICS:
            values = [m[metric] for m in members if not _missing(m.get(metric))]
            entry[metric] = statistics.fmean(values) if values else None
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0 if values else None
        out.append(entry)
    return out


FRAMEWORK_NAMES = {"simclr": "SimCLR", "moco": "MoCo v2"}  # the rest (pretext tasks) under their own names
WHAT_HEAD = "| method | framework | pair rule |"


def _what(g: dict, label: str | None = None) -> str:
    """The method (``label``, default :func:`_label`), framework and pair rule cells of a table row (``–`` where
    a reference has none)."""
    framework = g.get("framework")
    return (f"| {label or _label(g)} | {FRAMEWORK_NAMES.get(framework, framework) or '–'} "
            f"| {g.get('pair_rule') or '–'} |")


PAIRED_BY = ("seed", "framework", "temperature")  # a trial and the baseline it is compared with share these


def paired_deltas(rows: list[dict], group_entry: dict, metric: str = "msl_acc") -> list[float]:
    """``metric`` of each trial of ``group_entry`` minus that of the baseline trial with the same seed (and
    framework and temperature): the seed fixes the initial weights and the data order, so the paired
    difference isolates the method from the seed's luck, which at demo scale is larger than the effects."""
    baselines = {tuple(r.get(k) for k in PAIRED_BY): r[metric] for r in rows
                 if r.get("method") == "baseline" and not _missing(r.get(metric))}
    members = [r for r in rows if all(r.get(k) == group_entry.get(k) for k in GROUP_KEYS)]
    return [r[metric] - baselines[key] for r in members if not _missing(r.get(metric))
            and (key := tuple(r.get(k) for k in PAIRED_BY)) in baselines]


def _delta(deltas: list[float]) -> str:
    if not deltas:
        return "–"
    spread = f" ± {100 * statistics.stdev(deltas):.1f}" if len(deltas) > 1 else ""
    return f"{100 * statistics.fmean(deltas):+.1f}{spread} ({sum(d > 0 for d in deltas)}/{len(deltas)} seeds up)"


def _pct(mean, std=None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def results_table(groups: list[dict], param: str = "k", swept=("cluster",), rows: list[dict] | None = None) -> str:
    """A markdown table of the grouped results (accuracies in %, mean ± std over seeds); ``param`` is shown
    for the ``swept`` methods only (the others are references). With the trial ``rows`` and a baseline among
    them, a column gives each method's MSL accuracy minus the baseline's of the same seed (:func:`paired_deltas`)."""
    clusters = any(g.get("cluster_nmi") is not None for g in groups)  # the clusters' quality, where measured
    paired = rows is not None and any(r.get("method") == "baseline" for r in rows)
    head = (f"{WHAT_HEAD} {param} | seeds | MSL acc | MSL bal. acc | HiRISE acc | HiRISE bal. acc "
            f"| MSL kNN acc | HiRISE kNN acc | FN pairs % |"
            + (" MSL acc − baseline, same seed |" if paired else "")
            + (" cluster NMI (class) | NMI (traverse) | removed precision | removed recall |" if clusters else ""))
    lines = [head, "|" + " --- |" * (12 + paired + 4 * clusters)]
    for g in groups:
        value = g.get(param) if g["method"] in swept else None
        extra = "".join(f" {_num(g.get(key))} |" for key in ("cluster_nmi", "cluster_traverse_nmi",
                                                             "removed_precision", "removed_recall")) if clusters else ""
        lines.append(
            f"{_what(g, METHOD_LABELS.get(g['method'], g['method']))} {'–' if value is None else f'{value:g}'} "
            f"| {g['n']} | {_pct(g['msl_acc'], g['msl_acc_std'])} | {_pct(g['msl_balanced_acc'], g['msl_balanced_acc_std'])} "
            f"| {_pct(g['hirise_acc'], g['hirise_acc_std'])} | {_pct(g['hirise_balanced_acc'], g['hirise_balanced_acc_std'])} "
            f"| {_pct(g['msl_knn_acc'], g['msl_knn_acc_std'])} | {_pct(g['hirise_knn_acc'], g['hirise_knn_acc_std'])} "
            f"| {_pct(g['fn_fraction'])} |"
            + (f" {'–' if g['method'] == 'baseline' else _delta(paired_deltas(rows, g))} |" if paired else "") + extra
        )
    return "\n".join(lines)


def methods_table(groups: list[dict]) -> str:
    """Paper Table 2's layout: false-negative pairs per batch and accuracy (and balanced accuracy: both
    benchmarks are imbalanced) per benchmark (linear probe, and fine-tuned when measured; the supervised row
    trains from scratch), one row per method; pretext tasks add their own task's accuracy."""
    tuned = any(g.get("msl_ft_acc") is not None or g.get("hirise_ft_acc") is not None for g in groups)
    pretext = any(g.get("pretext_accuracy") is not None for g in groups)
    extra = (" MSL fine-tuned % | HiRISE fine-tuned % |" if tuned else "") + (" pretext task acc % |" if pretext else "")
    lines = [f"{WHAT_HEAD} FN pairs per batch % | MSL acc % | MSL balanced % | HiRISE acc % | HiRISE balanced % |{extra} "
             "seeds |", "|" + " --- |" * (9 + 2 * tuned + pretext)]
    for g in groups:
        cells = [_pct(g["fn_fraction"], g["fn_fraction_std"]), _pct(g["msl_acc"], g["msl_acc_std"]),
                 _pct(g["msl_balanced_acc"], g["msl_balanced_acc_std"]), _pct(g["hirise_acc"], g["hirise_acc_std"]),
                 _pct(g["hirise_balanced_acc"], g["hirise_balanced_acc_std"])]
        if tuned:
            cells += [_pct(g["msl_ft_acc"], g["msl_ft_acc_std"]), _pct(g["hirise_ft_acc"], g["hirise_ft_acc_std"])]
        if pretext:
            cells.append(_pct(g["pretext_accuracy"], g["pretext_accuracy_std"]))
        lines.append(f"{_what(g)} {' | '.join(cells)} | {g['n']} |")
    return "\n".join(lines)


# The supervised references' names in tables and plots: neither is the paper's supervised baseline as such
# (raysys.eval.supervised).
METHOD_LABELS = {"supervised": "supervised, from scratch", "supervised-transfer": "supervised, from weights"}


def _label(g: dict) -> str:
    """A method's name with the parameter that defines it (``cluster K=10``, ``mixed r=0.5``)."""
    if g["method"] == "cluster" and g.get("noise") is not None:
        return f"cluster {g.get('cluster_mode') or 'eliminate'}, noise {g['noise']:g}"
    if g["method"] == "cluster":
        return f"cluster K={g['k']}"
    if g.get("mix_ratio"):
        return f"{g['method']} r={g['mix_ratio']:g}"
    return METHOD_LABELS.get(g["method"], g["method"])


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, imported when a plot is drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# Published test accuracies on the real benchmarks (shared facts: the paper's Table 2 and the benchmark authors'),
# drawn as reference lines only where a sweep evaluated on the real datasets.
PUBLISHED = {
    "msl": (("paper: SimCLR baseline, linear eval", 75.60), ("Wagstaff et al.: supervised transfer", 74.5)),
    "hirise": (("paper: SimCLR baseline, linear eval", 89.70), ("Wagstaff et al.: supervised transfer", 92.8)),
}


def _published_lines(ax, benchmark: str) -> None:
    for i, (source, value) in enumerate(PUBLISHED.get(benchmark, ())):
        ax.axhline(value, linestyle="-.", color=f"C{6 + i}", label=f"{source} ({value:.1f}%, published)")


def published_note(benchmarks) -> str:
    """One line per real benchmark with the published numbers a sweep's table can be read against."""
    return "\n".join(f"Published on real {b.upper()}: " + "; ".join(f"{s} {v:.1f} %" for s, v in PUBLISHED[b]) + "."
                     for b in benchmarks if b in PUBLISHED)


def _legend_below(ax) -> None:
    """The legend under the axes, never over the data (the figure grows to hold it)."""
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def plot_vs_param(groups: list[dict], benchmark: str, param: str, path: str | Path, title: str,
                  swept=("cluster",), published: bool = False) -> None:
    """Fig. 5 style: accuracy vs ``param`` with error bars, one line per ``swept`` method; every other
    method (baseline, supervised) is a horizontal reference line, and so are the published numbers when
    ``published`` (the benchmark is the real dataset)."""
    plt = pyplot()
    metric = f"{benchmark}_acc"
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in swept:
        points = sorted((g for g in groups if g["method"] == method and g[metric] is not None), key=lambda g: g[param])
        if points:
            ax.errorbar([g[param] for g in points], [100 * g[metric] for g in points],
                        yerr=[100 * (g[f"{metric}_std"] or 0) for g in points], marker="o", capsize=4, label=method)
    for g in groups:
        if g["method"] not in swept and g[metric] is not None:
            ax.axhline(100 * g[metric], linestyle="--" if g["method"] == "baseline" else ":",
                       color="gray" if g["method"] == "baseline" else "black",
                       label=f"{_label(g)} ({100 * g[metric]:.1f}%)")
    if published:
        _published_lines(ax, benchmark)
    ax.set_xlabel(param)
    ax.set_ylabel(f"{benchmark.upper()} test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_below(ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_methods(groups: list[dict], benchmark: str, path: str | Path, title: str, metric: str | None = None,
                 ylabel: str | None = None, published: bool = False) -> None:
    """Fig. 3 style: one bar per method (mean over seeds, standard deviation as error bar) of
    ``metric`` (default ``<benchmark>_acc``), in %, with the published numbers as lines when ``published``."""
    plt = pyplot()
    metric = metric or f"{benchmark}_acc"
    shown = [g for g in groups if g.get(metric) is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    heights = [100 * g[metric] for g in shown]
    bars = ax.bar(range(len(shown)), heights, yerr=[100 * (g[f"{metric}_std"] or 0) for g in shown], capsize=4,
                  color=[f"C{i}" for i in range(len(shown))])
    ax.bar_label(bars, labels=[f"{h:.1f}" for h in heights], padding=2, fontsize=8)
    ax.set_xticks(range(len(shown)), [_label(g) for g in shown], rotation=15)
    ax.set_ylabel(ylabel or f"{benchmark.upper()} test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if published:
        _published_lines(ax, benchmark)
        _legend_below(ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def spatial_table(groups: list[dict]) -> str:
    """ESS comparison: place recognition on held-out traverses beside linear-probe accuracy."""
    lines = [f"{WHAT_HEAD} radius m | sigma m | positives/anchor | place R@1 % | chance R@1 % | place R@5 % "
             "| median error m | MSL acc % | HiRISE acc % | seeds |", "|" + " --- |" * 13]
    for g in groups:
        err = g.get("place_median_error")
        lines.append(
            f"{_what(g)} {_num(g.get('ess_radius_m'))} | {_num(g.get('ess_sigma_m'))} | {_num(g.get('positives_per_anchor'))} "
            f"| {_pct(g.get('place_recall1'), g.get('place_recall1_std'))} | {_pct(g.get('place_chance_recall1'))} "
            f"| {_pct(g.get('place_recall5'), g.get('place_recall5_std'))} "
            f"| {'–' if err is None else f'{err:.1f}'} | {_pct(g['msl_acc'], g['msl_acc_std'])} "
            f"| {_pct(g['hirise_acc'], g['hirise_acc_std'])} | {g['n']} |")
    return "\n".join(lines)


def _num(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def grouped_table(groups: list[dict], plot: str = "line", param: str = "k", swept=("cluster",),
                  place_recognition: bool = False, rows: list[dict] | None = None) -> str:
    """The grouped table a sweep draws: place recognition, methods side by side (``bars``), the noisy
    oracle's precision curve (``precision``) or accuracy against the swept ``param``."""
    if place_recognition:
        return spatial_table(groups)
    if plot == "bars":
        return methods_table(groups)
    if plot == "precision":
        return precision_table(groups)
    return results_table(groups, param, swept, rows)


def precision_table(groups: list[dict]) -> str:
    """The noisy-oracle experiment: per mode and noise, the removed pairs' precision and recall beside the
    linear probe's accuracy and balanced accuracy (the baseline's row removes nothing)."""
    lines = [f"{WHAT_HEAD} mode | noise | removed precision | removed recall | FN pairs per batch % | cluster NMI "
             "| MSL acc % | MSL balanced % | HiRISE acc % | HiRISE balanced % | seeds |", "|" + " --- |" * 14]
    order = sorted(groups, key=lambda g: (g["method"] != "baseline", str(g.get("cluster_mode")), g.get("noise") or 0))
    for g in order:
        clustered = g["method"] == "cluster"
        cells = [g.get("cluster_mode") if clustered else "–", _num(g.get("noise")),
                 _num(g.get("removed_precision")), _num(g.get("removed_recall")),
                 _pct(g["fn_fraction"], g["fn_fraction_std"]), _num(g.get("cluster_nmi")),
                 _pct(g["msl_acc"], g["msl_acc_std"]), _pct(g["msl_balanced_acc"], g["msl_balanced_acc_std"]),
                 _pct(g["hirise_acc"], g["hirise_acc_std"]), _pct(g["hirise_balanced_acc"], g["hirise_balanced_acc_std"]),
                 str(g["n"])]
        lines.append(f"{_what(g, g['method'])} " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _baseline(groups: list[dict], metric: str) -> dict | None:
    return next((g for g in groups if g["method"] == "baseline" and g.get(metric) is not None), None)


def _curves(groups: list[dict], metric: str) -> dict[str, list[dict]]:
    """Cluster-aware groups with a measured removed precision, per mode, in order of precision."""
    curves = defaultdict(list)
    for g in groups:
        if g["method"] == "cluster" and g.get("removed_precision") is not None and g.get(metric) is not None:
            curves[g.get("cluster_mode") or "eliminate"].append(g)
    return {mode: sorted(points, key=lambda g: g["removed_precision"]) for mode, points in sorted(curves.items())}


def plot_vs_precision(groups: list[dict], benchmark: str, path: str | Path, title: str,
                      ylabel: str | None = None) -> None:
    """Accuracy against removed-pair precision, one line per mode (error bars: spread over seeds in both
    directions; each point annotated with its noise and removed-pair recall), the baseline's mean ± spread
    as a band."""
    plt = pyplot()
    metric = f"{benchmark}_acc"
    fig, ax = plt.subplots(figsize=(6, 4))
    base = _baseline(groups, metric)
    if base:
        mean, spread = 100 * base[metric], 100 * (base[f"{metric}_std"] or 0)
        ax.axhspan(mean - spread, mean + spread, color="gray", alpha=0.25, label=f"baseline {mean:.1f} ± {spread:.1f}%")
        ax.axhline(mean, color="gray", linestyle="--")
    for mode, points in _curves(groups, metric).items():
        ax.errorbar([g["removed_precision"] for g in points], [100 * g[metric] for g in points],
                    xerr=[g["removed_precision_std"] or 0 for g in points],
                    yerr=[100 * (g[f"{metric}_std"] or 0) for g in points], marker="o", capsize=4, label=mode)
        for g in points:
            recall = f", recall {g['removed_recall']:.2f}" if g.get("removed_recall") is not None else ""
            ax.annotate(f"noise {g['noise']:g}{recall}", (g["removed_precision"], 100 * g[metric]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("removed-pair precision (share that are true false negatives)")
    ax.set_ylabel(ylabel or f"{benchmark.upper()} test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_below(ax)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def precision_reading(groups: list[dict], benchmark: str, name: str | None = None) -> str:
    """One sentence per mode: the removed-pair precision (and its recall) from which on every measured level of
    the mode beats the baseline by more than both spreads (its mean - std above the baseline's mean + std), or
    that none does."""
    metric = f"{benchmark}_acc"
    name = name or benchmark.upper()
    base = _baseline(groups, metric)
    if base is None:
        return f"{name}: no baseline result to compare with."
    curves = _curves(groups, metric)
    if base["n"] < 2 or any(g["n"] < 2 for points in curves.values() for g in points):
        return f"{name}: one seed per configuration gives no spread to compare with; run --seeds 3 or more."
    bar = base[metric] + (base[f"{metric}_std"] or 0)
    baseline = f"baseline {_pct(base[metric], base[f'{metric}_std'])} %"
    sentences = []
    for mode, points in curves.items():
        wins = [g[metric] - (g[f"{metric}_std"] or 0) > bar for g in points]
        above = len(points)
        while above and wins[above - 1]:
            above -= 1  # points[above:] all win: the precision above which the mode pays
        if above < len(points):
            g = points[above]
            recall = f", recall {g['removed_recall']:.2f}" if g.get("removed_recall") is not None else ""
            sentences.append(f"{mode} beats the {baseline} by more than the seeds' spread at every removed-pair "
                             f"precision from {g['removed_precision']:.2f} on (noise {g['noise']:g}{recall}: "
                             f"{_pct(g[metric], g[f'{metric}_std'])} %)")
        else:
            best = max(points, key=lambda g: g[metric])
            sentences.append(f"{mode} does not beat the {baseline} by more than the seeds' spread even at "
                             f"precision {points[-1]['removed_precision']:.2f} (its best: precision "
                             f"{best['removed_precision']:.2f}, {_pct(best[metric], best[f'{metric}_std'])} %)")
    return f"{name}: " + ("; ".join(sentences) if sentences else "no cluster-aware result") + "."
