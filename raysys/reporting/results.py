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
    "msl_majority_acc", "msl_majority_balanced_acc", "msl_chance_acc",
    "hirise_majority_acc", "hirise_majority_balanced_acc", "hirise_chance_acc",
    "fn_fraction", "removed_precision", "removed_recall", "cluster_nmi", "cluster_purity", "cluster_traverse_nmi",
    "cluster_pair_precision", "cluster_pair_recall", "cluster_clustered_share", "ess_radius", "ess_sigma", "ess_radius_m", "ess_sigma_m",
    "positives_per_anchor", "place_recall1", "place_recall5", "place_median_error", "place_chance_recall1",
    "knn_acc", "pool_knn_acc", "pool_knn_balanced_acc", "pretext_accuracy", "stopped_at_round", "pretrain_seconds",
]
# The shares the tables and figures show in % (accuracies, false-negative and recall shares); the rest stay as written.
PERCENT_COLUMNS = frozenset([c for c in RESULT_COLUMNS if c.endswith("_acc")] + [
    "fn_fraction", "place_recall1", "place_recall5", "place_chance_recall1", "pretext_accuracy"])
# What tells configurations apart (not the seed).
GROUP_KEYS = ("method", "framework", "pair_rule", "k", "noise", "cluster_mode", "decoupled", "temperature", "lr", "mix_ratio",
              "ess_radius", "ess_sigma")
METRICS = ["msl_acc", "msl_balanced_acc", "hirise_acc", "hirise_balanced_acc", "msl_ft_acc", "hirise_ft_acc",
           "msl_knn_acc", "msl_knn_balanced_acc", "hirise_knn_acc", "hirise_knn_balanced_acc",
           "msl_majority_acc", "msl_majority_balanced_acc", "msl_chance_acc", "hirise_majority_acc",
           "hirise_majority_balanced_acc", "hirise_chance_acc", "fn_fraction",
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


def order_key(value) -> tuple:
    """Sort key of a grouping value: none first, then numbers in numeric order (K 10, 40, 160), then text."""
    if value is None:
        return (0, 0, "")
    if isinstance(value, (int, float)):
        return (1, value, "")
    return (2, 0, str(value))


def group(rows: list[dict], keys=GROUP_KEYS) -> list[dict]:
    """Mean and standard deviation over seeds of every metric, per combination of ``keys``."""
    groups = defaultdict(list)
    for row in rows:
        groups[tuple(row.get(k) for k in keys)].append(row)
    out = []
    for key, members in sorted(groups.items(), key=lambda kv: tuple(order_key(x) for x in kv[0])):
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
    return (f"| {label or method_label(g)} | {FRAMEWORK_NAMES.get(framework, framework) or '–'} "
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


def pct(mean, std=None) -> str:
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
            f"| {g['n']} | {pct(g['msl_acc'], g['msl_acc_std'])} | {pct(g['msl_balanced_acc'], g['msl_balanced_acc_std'])} "
            f"| {pct(g['hirise_acc'], g['hirise_acc_std'])} | {pct(g['hirise_balanced_acc'], g['hirise_balanced_acc_std'])} "
            f"| {pct(g['msl_knn_acc'], g['msl_knn_acc_std'])} | {pct(g['hirise_knn_acc'], g['hirise_knn_acc_std'])} "
            f"| {pct(g['fn_fraction'])} |"
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
        cells = [pct(g["fn_fraction"], g["fn_fraction_std"]), pct(g["msl_acc"], g["msl_acc_std"]),
                 pct(g["msl_balanced_acc"], g["msl_balanced_acc_std"]), pct(g["hirise_acc"], g["hirise_acc_std"]),
                 pct(g["hirise_balanced_acc"], g["hirise_balanced_acc_std"])]
        if tuned:
            cells += [pct(g["msl_ft_acc"], g["msl_ft_acc_std"]), pct(g["hirise_ft_acc"], g["hirise_ft_acc_std"])]
        if pretext:
            cells.append(pct(g["pretext_accuracy"], g["pretext_accuracy_std"]))
        lines.append(f"{_what(g)} {' | '.join(cells)} | {g['n']} |")
    return "\n".join(lines)


# The supervised references' names in tables and plots: neither is the paper's supervised baseline as such
# (raysys.eval.supervised).
METHOD_LABELS = {"supervised": "supervised, from scratch", "supervised-transfer": "supervised, from weights"}


def method_label(g: dict) -> str:
    """A method's name with the parameter that defines it (``cluster K=10``, ``mixed r=0.5``)."""
    if g["method"] == "cluster" and g.get("noise") is not None:
        return f"cluster {g.get('cluster_mode') or 'eliminate'}, noise {g['noise']:g}"
    if g["method"] == "cluster":
        return f"cluster K={g['k']}"
    if g.get("mix_ratio"):
        return f"{g['method']} r={g['mix_ratio']:g}"
    return METHOD_LABELS.get(g["method"], g["method"])


def spatial_table(groups: list[dict]) -> str:
    """ESS comparison: place recognition on held-out traverses beside linear-probe accuracy."""
    lines = [f"{WHAT_HEAD} radius m | sigma m | positives/anchor | place R@1 % | chance R@1 % | place R@5 % "
             "| median error m | MSL acc % | HiRISE acc % | seeds |", "|" + " --- |" * 13]
    for g in groups:
        err = g.get("place_median_error")
        lines.append(
            f"{_what(g)} {_num(g.get('ess_radius_m'))} | {_num(g.get('ess_sigma_m'))} | {_num(g.get('positives_per_anchor'))} "
            f"| {pct(g.get('place_recall1'), g.get('place_recall1_std'))} | {pct(g.get('place_chance_recall1'))} "
            f"| {pct(g.get('place_recall5'), g.get('place_recall5_std'))} "
            f"| {'–' if err is None else f'{err:.1f}'} | {pct(g['msl_acc'], g['msl_acc_std'])} "
            f"| {pct(g['hirise_acc'], g['hirise_acc_std'])} | {g['n']} |")
    return "\n".join(lines)


def _num(value) -> str:
    return "–" if value is None else f"{value:.3g}"


def grouped_table(groups: list[dict], plot: str = "line", param: str = "k", swept=("cluster",),
                  place_recognition: bool = False, rows: list[dict] | None = None) -> str:
    """The grouped table a sweep draws: place recognition, methods side by side (``bars``), the noisy
    oracle's precision curve (``precision``) or accuracy against the swept ``param``."""
    if place_recognition:
        table = spatial_table(groups)
    elif plot == "bars":
        table = methods_table(groups)
    elif plot == "precision":
        table = precision_table(groups)
    else:
        table = results_table(groups, param, swept, rows)
    return drop_empty_columns(table)


def drop_empty_columns(table: str) -> str:
    """A markdown table without the columns that hold ``–`` in every row (nothing measured them)."""
    header, rule, *body = [_md_cells(line) for line in table.splitlines()]
    keep = [i for i in range(len(header)) if not body or any(row[i] != "–" for row in body)]
    return "\n".join("| " + " | ".join(row[i] for i in keep) + " |" for row in (header, rule, *body))


def _md_cells(line: str) -> list[str]:
    return [cell.strip() for cell in line.strip().strip("|").split("|")]


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
                 pct(g["fn_fraction"], g["fn_fraction_std"]), _num(g.get("cluster_nmi")),
                 pct(g["msl_acc"], g["msl_acc_std"]), pct(g["msl_balanced_acc"], g["msl_balanced_acc_std"]),
                 pct(g["hirise_acc"], g["hirise_acc_std"]), pct(g["hirise_balanced_acc"], g["hirise_balanced_acc_std"]),
                 str(g["n"])]
        lines.append(f"{_what(g, g['method'])} " + " | ".join(cells) + " |")
    return "\n".join(lines)


