"""Label-fraction results (the paper's Fig. 4): ``label-fraction.csv`` (one row per encoder, benchmark,
fraction and seed), ``label-fraction.md`` (mean ± std over seeds and the plateau per encoder) and one
``label-fraction-<benchmark>.png`` per benchmark."""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path

from raysys.reporting.plots import bench_name, pyplot, save_figure
from raysys.storage import write_text_atomic

CSV_FILE, TABLE_FILE = "label-fraction.csv", "label-fraction.md"
CSV_COLUMNS = ["encoder", "benchmark", "fraction", "seed", "n_train", "accuracy", "balanced_accuracy"]
PLATEAU_POINTS = 0.01  # "within one accuracy point of the full-label score"


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over seeds per (encoder, benchmark, fraction)."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["encoder"], row["benchmark"], row["fraction"])].append(row)
    out = []
    for (encoder, benchmark, fraction), members in sorted(groups.items()):
        entry = {"encoder": encoder, "benchmark": benchmark, "fraction": fraction, "seeds": len(members),
                 "n_train": statistics.fmean(m["n_train"] for m in members)}
        for metric in ("accuracy", "balanced_accuracy"):
            values = [m[metric] for m in members]
            entry[metric] = statistics.fmean(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def plateau_fraction(curve: list[dict], points: float = PLATEAU_POINTS) -> float:
    """Smallest fraction from which every mean accuracy of ``curve`` (one encoder on one benchmark,
    :func:`summarize` entries) stays within ``points`` of the largest fraction's mean."""
    curve = sorted(curve, key=lambda e: e["fraction"])
    full = curve[-1]["accuracy"]
    plateau = curve[-1]["fraction"]
    for entry in reversed(curve):
        if entry["accuracy"] < full - points - 1e-12:
            break
        plateau = entry["fraction"]
    return plateau


def _curves(summary: list[dict]) -> dict:
    curves = defaultdict(list)
    for entry in summary:
        curves[(entry["benchmark"], entry["encoder"])].append(entry)
    return curves


def results_table(summary: list[dict], majority: dict | None = None) -> str:
    """Markdown: per benchmark and encoder the full-label accuracy and the plateau, then every fraction."""
    curves = _curves(summary)
    lines = ["| benchmark | encoder | full-label acc | within 1 point from |", "| --- | --- | --- | --- |"]
    for (benchmark, encoder), curve in sorted(curves.items()):
        full = max(curve, key=lambda e: e["fraction"])
        lines.append(f"| {benchmark} | {encoder} | {_pct(full['accuracy'], full['accuracy_std'])} "
                     f"| {100 * plateau_fraction(curve):g} % |")
    for benchmark, result in sorted((majority or {}).items()):
        lines.append(f"| {benchmark} | majority class | {_pct(result['accuracy'])} | – |")
    lines += ["", "| benchmark | encoder | fraction | train images | seeds | accuracy | balanced accuracy |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for e in summary:
        lines.append(f"| {e['benchmark']} | {e['encoder']} | {100 * e['fraction']:g} % | {e['n_train']:.0f} "
                     f"| {e['seeds']} | {_pct(e['accuracy'], e['accuracy_std'])} "
                     f"| {_pct(e['balanced_accuracy'], e['balanced_accuracy_std'])} |")
    return "\n".join(lines) + "\n"


def _pct(mean: float, std: float | None = None) -> str:
    return f"{100 * mean:.1f}" + (f" ± {100 * std:.1f}" if std else "")


def plot_curves(summary: list[dict], benchmark: str, path, majority: float | None = None) -> None:
    """Fig. 4 style: test accuracy vs % of train labels, mean ± std over seeds per encoder, a dotted line
    at each encoder's plateau fraction and the majority-class accuracy for reference."""
    fig, ax = pyplot().subplots(figsize=(6.5, 4))
    for (bench, encoder), curve in sorted(_curves(summary).items()):
        if bench != benchmark:
            continue
        curve.sort(key=lambda e: e["fraction"])
        line = ax.errorbar([100 * e["fraction"] for e in curve], [100 * e["accuracy"] for e in curve],
                           yerr=[100 * e["accuracy_std"] for e in curve], marker="o", markersize=3, capsize=3,
                           label=encoder)
        plateau = plateau_fraction(curve)
        ax.axvline(100 * plateau, linestyle=":", color=line[0].get_color(),
                   label=f"{encoder}: within 1 pt of full at {100 * plateau:g} %")
    if majority is not None:
        ax.axhline(100 * majority, linestyle="--", color="gray", label=f"majority class ({100 * majority:.1f}%)")
    ax.set_xlabel("train labels used by the linear probe (%)")
    ax.set_ylabel(f"{bench_name(benchmark)} test accuracy (%)")
    ax.set_title(f"Label efficiency on {bench_name(benchmark)} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path, curves_reading(summary, benchmark, majority))


def curves_reading(summary: list[dict], benchmark: str, majority: float | None = None) -> str:
    """One line: per encoder, its full-label accuracy and the label fraction from which it stays within 1 point."""
    parts = []
    for (bench, encoder), curve in sorted(_curves(summary).items()):
        if bench == benchmark:
            full = max(curve, key=lambda e: e["fraction"])
            parts.append(f"{encoder} {_pct(full['accuracy'], full['accuracy_std'])} % with every label, within 1 point "
                         f"of it from {100 * plateau_fraction(curve):g} % of them")
    if majority is not None:
        parts.append(f"majority class {100 * majority:.1f} %")
    return f"{bench_name(benchmark)}: " + "; ".join(parts) + "."


def write_results(rows: list[dict], out, majority: dict | None = None) -> dict:
    """Write the CSV, the markdown table and one PNG per benchmark into ``out``; return their paths.
    ``majority`` maps benchmark -> :func:`raysys.eval.linear.majority_baseline` result (optional)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: (r["encoder"], r["benchmark"], r["fraction"], r["seed"])))
    write_text_atomic(str(out / CSV_FILE), buf.getvalue())
    summary = summarize(rows)
    write_text_atomic(str(out / TABLE_FILE), results_table(summary, majority))
    files = {"csv": out / CSV_FILE, "table": out / TABLE_FILE, "plots": {}}
    for benchmark in sorted({r["benchmark"] for r in rows}):
        path = out / f"label-fraction-{benchmark}.png"
        plot_curves(summary, benchmark, path, (majority or {}).get(benchmark, {}).get("accuracy"))
        files["plots"][benchmark] = path
    return {**files, "summary": summary}
