"""Sweep results: ``results.csv`` (written atomically), a grouped summary, ``summary.md`` and plots."""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

# One row per trial; the first columns are the ones the paper's tables and figures need.
RESULT_COLUMNS = [
    "trial", "method", "k", "temperature", "seed",
    "msl_acc", "msl_balanced_acc", "hirise_acc", "hirise_balanced_acc",
    "fn_fraction", "removed_precision", "removed_recall", "cluster_nmi", "cluster_purity",
    "pretrain_seconds",
]
REFERENCE_METHODS = ("baseline", "supervised")  # drawn as horizontal lines, not swept
METRICS = ["msl_acc", "msl_balanced_acc", "hirise_acc", "hirise_balanced_acc", "fn_fraction"]


def write_atomic(path: str | Path, text: str) -> None:
    """Write then rename, so a killed process never leaves a half-written file behind."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


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


def group(rows: list[dict], keys=("method", "k", "temperature")) -> list[dict]:
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


def _pct(mean, std=None) -> str:
    if mean is None:
        return "–"
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def results_table(groups: list[dict], param: str = "k") -> str:
    """A markdown table of the grouped results (accuracies in %, mean ± std over seeds)."""
    head = f"| method | {param} | seeds | MSL acc | MSL bal. acc | HiRISE acc | HiRISE bal. acc | FN pairs % |"
    lines = [head, "|" + " --- |" * 8]
    for g in groups:
        value = g.get(param) if g["method"] not in REFERENCE_METHODS else None
        lines.append(
            f"| {g['method']} | {'–' if value is None else value} "
            f"| {g['n']} | {_pct(g['msl_acc'], g['msl_acc_std'])} | {_pct(g['msl_balanced_acc'], g['msl_balanced_acc_std'])} "
            f"| {_pct(g['hirise_acc'], g['hirise_acc_std'])} | {_pct(g['hirise_balanced_acc'], g['hirise_balanced_acc_std'])} "
            f"| {_pct(g['fn_fraction'])} |"
        )
    return "\n".join(lines)


def plot_vs_param(groups: list[dict], benchmark: str, param: str, path: str | Path, title: str) -> None:
    """Fig. 5 style: accuracy vs ``param`` with error bars; baseline and supervised as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = f"{benchmark}_acc"
    swept = sorted((g for g in groups if g["method"] not in REFERENCE_METHODS and g[metric] is not None),
                   key=lambda g: g[param])
    fig, ax = plt.subplots(figsize=(6, 4))
    if swept:
        ax.errorbar([g[param] for g in swept], [100 * g[metric] for g in swept],
                    yerr=[100 * (g[f"{metric}_std"] or 0) for g in swept], marker="o", capsize=4,
                    label=swept[0]["method"])
    for method, style in (("baseline", "--"), ("supervised", ":")):
        for g in groups:
            if g["method"] == method and g[metric] is not None:
                ax.axhline(100 * g[metric], linestyle=style, color="gray" if method == "baseline" else "black",
                           label=f"{method} ({100 * g[metric]:.1f}%)")
    ax.set_xlabel(param)
    ax.set_ylabel(f"{benchmark.upper()} test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
