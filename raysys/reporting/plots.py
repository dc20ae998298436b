"""The sweeps' figures: accuracy against the swept parameter or the removed-pair precision, methods side by
side, with the baseline as a band and the references as lines; each figure keeps its one-line reading in the
PNG (:func:`save_figure`, :func:`figure_reading`), which ``report.html`` shows as its caption."""

from __future__ import annotations

import io
import statistics
from collections import defaultdict
from pathlib import Path

from raysys.reporting.results import method_label, order_key, pct


BENCHMARK_NAMES = {"msl": "MSL", "hirise": "HiRISE"}


def bench_name(benchmark: str) -> str:
    """``MSL``, ``HiRISE``: a benchmark as the papers write it."""
    return BENCHMARK_NAMES.get(benchmark, benchmark.upper())


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
    return "\n".join(f"Published on real {bench_name(b)}: " + "; ".join(f"{s} {v:.1f} %" for s, v in PUBLISHED[b]) + "."
                     for b in benchmarks if b in PUBLISHED)


def _legend_below(ax) -> None:
    """The legend under the axes, never over the data (the figure grows to hold it); none without labelled artists."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)


def accuracy_metric(benchmark: str, balanced: bool = False) -> str:
    """The results column of a benchmark's linear-probe accuracy, or of its class-balanced accuracy."""
    return f"{benchmark}_balanced_acc" if balanced else f"{benchmark}_acc"


def accuracy_label(benchmark: str, balanced: bool = False) -> str:
    """The y-axis label of an accuracy figure, with its unit."""
    return f"{bench_name(benchmark)} test {'balanced ' if balanced else ''}accuracy (%)"


# A benchmark is imbalanced when always predicting its majority class scores this much (a share, here ten points)
# above chance: plain accuracy then credits a model for the class counts, so its figures lead with balanced accuracy.
IMBALANCED_ABOVE_CHANCE = 0.10


def floor(groups: list[dict], metric: str) -> tuple[float, float] | None:
    """``(majority class, chance)``: what the accuracy ``metric`` (``<benchmark>_acc`` or ``<benchmark>_balanced_acc``)
    of a model that learned nothing reaches on the test split -- always predicting the most frequent train class,
    and guessing (one over the classes) -- from the trials that recorded them; None when none did."""
    balanced = metric.endswith("_balanced_acc")
    benchmark = metric.removesuffix("_balanced_acc" if balanced else "_acc")
    keys = (f"{benchmark}_majority_balanced_acc" if balanced else f"{benchmark}_majority_acc", f"{benchmark}_chance_acc")
    values = [[g[key] for g in groups if g.get(key) is not None] for key in keys]
    return None if not all(values) else tuple(statistics.fmean(v) for v in values)


def imbalanced(groups: list[dict], benchmark: str) -> bool:
    """Whether the benchmark's majority class alone scores well over chance (:data:`IMBALANCED_ABOVE_CHANCE`)."""
    known = floor(groups, accuracy_metric(benchmark))
    return known is not None and known[0] - known[1] > IMBALANCED_ABOVE_CHANCE


def accuracy_figures(groups: list[dict], benchmark: str) -> list[bool]:
    """The ``balanced`` flags of a benchmark's accuracy figures in the order they are shown: an imbalanced
    benchmark (:func:`imbalanced`) leads with balanced accuracy, then plain accuracy; any other has plain accuracy only."""
    return [True, False] if imbalanced(groups, benchmark) else [False]


def lead_metric(groups: list[dict], benchmark: str) -> str:
    """The accuracy a benchmark is judged by (its first figure, the best trial): balanced where it is imbalanced."""
    return accuracy_metric(benchmark, accuracy_figures(groups, benchmark)[0])


def floor_note(groups: list[dict]) -> str:
    """One line for a results table: per benchmark that recorded them, the majority class's accuracy and balanced
    accuracy and chance, and which benchmarks are imbalanced (read their balanced accuracy first); "" when none did."""
    parts = []
    for benchmark in BENCHMARK_NAMES:
        plain, balanced = floor(groups, accuracy_metric(benchmark)), floor(groups, accuracy_metric(benchmark, True))
        if plain is not None:
            parts.append(f"{bench_name(benchmark)} majority class {pct(plain[0])} % (balanced accuracy "
                         f"{pct(balanced[0]) if balanced else '–'} %), chance {pct(plain[1])} %"
                         + (", imbalanced: compare balanced accuracy" if imbalanced(groups, benchmark) else ""))
    return f"Without learning, on the test split: {'; '.join(parts)}." if parts else ""


MAJORITY_LABEL = "majority class"  # how every figure's legend names the always-predict-one-class line
SAME_POINTS = 0.05  # percentage points: scores this close are drawn, and named, as one
HEADROOM = 1.06  # an accuracy axis reaches this far over the majority line, which then shows whole


def draw_floor(ax, majority: float, chance: float) -> None:
    """The majority-class and chance lines (shares) on an accuracy axis in %, one line where they coincide
    (balanced accuracy with every class in the test split). The majority line is broad and pale, under the rest:
    a reference or a result that scores no more than the majority class shows on it, not hidden by it."""
    majority, chance = 100 * majority, 100 * chance
    classes = f"1/{round(100 / chance)} classes"
    same = abs(majority - chance) < SAME_POINTS
    ax.axhline(majority, color="C1", lw=6, alpha=0.35, zorder=1,
               label=f"{MAJORITY_LABEL} = chance ({classes}): {majority:.1f}%" if same
               else f"{MAJORITY_LABEL} (always predicted): {majority:.1f}%")
    if not same:
        ax.axhline(chance, color="C5", linestyle=(0, (1, 3)), lw=1.2, label=f"chance ({classes}): {chance:.1f}%")


def _floor_lines(ax, groups: list[dict], metric: str) -> None:
    """:func:`draw_floor` from the groups' recorded floor (:func:`floor`), where known. Drawn last: the y axis
    then starts at 0 and reaches over everything drawn, the broad majority line included whole (not cut in half
    at the top edge when it is the highest score)."""
    known = floor(groups, metric)
    top = ax.get_ylim()[1]
    if known is not None:
        draw_floor(ax, *known)
        top = max(ax.get_ylim()[1], 100 * HEADROOM * known[0])
    ax.set_ylim(0, top)


def _majority(groups: list[dict], metric: str) -> float | None:
    known = floor(groups, metric)
    return None if known is None else known[0]


def _spread(groups: list[dict]) -> bool:
    """Whether every group ran on two seeds or more, so that a standard deviation over seeds can be drawn."""
    return bool(groups) and all(g["n"] >= 2 for g in groups)


def _seeds_claim(groups: list[dict]) -> str:
    """What a legend may say a line's points are: a mean ± std only where every point has seeds to spread."""
    if _spread(groups):
        return f"mean ± std over {_seeds(groups)}"
    return _seeds(groups) if all(g["n"] == 1 for g in groups) else f"mean over {_seeds(groups)}"


# Methods that are references, never results of their own: the SimCLR baseline, the untrained encoder and the
# supervised runs (a cluster-aware row with a noise level is the oracle's, see is_oracle).
REFERENCE_METHODS = ("baseline", "random-init", "supervised", "supervised-transfer")

CATEGORICAL_UP_TO = 5  # a swept parameter with at most this many values gets one evenly spaced tick per value

PARAM_LABELS = {"k": "K (number of clusters)", "temperature": "temperature",
                "mix_ratio": "out-of-domain share of the pool", "noise": "oracle noise (share of random cluster ids)"}

READING_KEY = "Description"  # the PNG text chunk that holds a figure's one-line reading (its caption in report.html)


def is_oracle(g: dict) -> bool:
    """A cluster-aware row whose clusters are the true labels: only the (noisy) oracle has a noise level."""
    return g["method"] == "cluster" and g.get("noise") is not None


def _is_reference(g: dict) -> bool:
    return g["method"] in REFERENCE_METHODS or is_oracle(g)


def _reference_label(g: dict) -> str:
    if g["method"] == "random-init":
        return "untrained encoder (random-init)"
    if is_oracle(g):
        mode = "" if (g.get("cluster_mode") or "eliminate") == "eliminate" else f", {g['cluster_mode']}"
        return f"noisy oracle (noise {g['noise']:g}{mode})" if g["noise"] else f"oracle clusters (true labels{mode})"
    return method_label(g)


def _reference_lines(ax, references: list[dict], metric: str, majority: float | None = None) -> None:
    """The references as horizontal lines: the baseline as its mean ± spread over seeds (a band), the untrained
    encoder dotted, the oracle dash-dotted, the supervised runs dotted black. A reference that scores the
    ``majority`` class's share says so in its label: it predicts one class and is no reference to reach."""
    for g in references:
        at_floor = majority is not None and abs(g[metric] - majority) * 100 < SAME_POINTS
        mean, spread = 100 * g[metric], 100 * (g[f"{metric}_std"] or 0)
        if g["method"] == "baseline":
            if g["n"] > 1:
                ax.axhspan(mean - spread, mean + spread, color="gray", alpha=0.25, lw=0)
            seeds = f"mean ± spread over {g['n']} seeds" if g["n"] > 1 else "1 seed"
            ax.axhline(mean, color="gray", linestyle="--", label=f"baseline {pct(g[metric], g[f'{metric}_std'])}% "
                       f"({seeds}){' = ' + MAJORITY_LABEL if at_floor else ''}")
            continue
        color, style = ("C3", ":") if g["method"] == "random-init" else ("C2", "-.") if is_oracle(g) else ("black", ":")
        ax.axhline(mean, color=color, linestyle=style,
                   label=f"{_reference_label(g)}: {mean:.1f}%{' = ' + MAJORITY_LABEL if at_floor else ''}")


def _x_positions(ax, values: list, param: str) -> dict:
    """Where each swept value sits on the x axis: few values (or text) evenly spaced, one tick label each (a single K
    is one tick, not an axis of fractions); many numbers on a numeric axis, with integer ticks for integer values."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel(PARAM_LABELS.get(param, param))
    if len(values) <= CATEGORICAL_UP_TO or not all(isinstance(v, (int, float)) for v in values):
        ax.set_xticks(range(len(values)), [f"{v:g}" if isinstance(v, (int, float)) else str(v) for v in values])
        ax.set_xlim(-0.6, len(values) - 0.4)
        return {v: i for i, v in enumerate(values)}
    if all(isinstance(v, int) for v in values):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return {v: v for v in values}


def plot_vs_param(groups: list[dict], benchmark: str, param: str, path: str | Path, title: str,
                  swept=("cluster",), published: bool = False, balanced: bool = False) -> str:
    """Fig. 5 style: accuracy (``balanced``: class-balanced accuracy) vs ``param``, one line per ``swept`` method
    (see :func:`_x_positions` for the axis), with error bars where every point has two seeds or more; every other
    method is a reference line (:func:`_reference_lines`: the baseline a band), and so are the majority class and
    chance, and the published numbers when ``published`` (the benchmark is the real dataset; plain accuracy only).
    Returns the figure's reading (:func:`comparison_reading`), also stored in the PNG."""
    plt = pyplot()
    metric = accuracy_metric(benchmark, balanced)
    measured = [g for g in groups if g.get(metric) is not None]
    lines = {m: [g for g in measured if g["method"] == m and not is_oracle(g)] for m in swept}
    values = sorted({g[param] for points in lines.values() for g in points}, key=order_key)
    fig, ax = plt.subplots(figsize=(6, 4))
    where = _x_positions(ax, values, param)
    for i, (method, points) in enumerate(lines.items()):
        points = sorted(points, key=lambda g: order_key(g[param]))
        if points:
            ax.errorbar([where[g[param]] for g in points], [100 * g[metric] for g in points], color=f"C{i}",
                        yerr=[100 * g[f"{metric}_std"] for g in points] if _spread(points) else None, marker="o",
                        capsize=4, label=f"{method} ({_seeds_claim(points)})")
    _reference_lines(ax, [g for g in measured if g["method"] not in swept or is_oracle(g)], metric,
                     _majority(groups, metric))
    if published and not balanced:
        _published_lines(ax, benchmark)
    _floor_lines(ax, groups, metric)
    ax.set_ylabel(accuracy_label(benchmark, balanced))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_below(ax)
    reading = comparison_reading(groups, metric, _metric_name(benchmark, balanced), swept)
    save_figure(fig, path, reading)
    return reading


def plot_methods(groups: list[dict], benchmark: str, path: str | Path, title: str, metric: str | None = None,
                 ylabel: str | None = None, published: bool = False, balanced: bool = False) -> str:
    """Fig. 3 style: one bar per method (mean over seeds; where every method has two seeds or more, the standard
    deviation as error bar, and the baseline's mean ± spread as a band behind) of ``metric`` (default
    ``<benchmark>_acc``, ``balanced``: ``<benchmark>_balanced_acc``), in %, with the majority class and chance as
    lines, and the published numbers when ``published`` (plain accuracy only). Returns the figure's reading, also
    stored in the PNG."""
    plt = pyplot()
    metric = metric or accuracy_metric(benchmark, balanced)
    shown = [g for g in groups if g.get(metric) is not None]
    fig, ax = plt.subplots(figsize=(6, 4))
    base, spread = _baseline(shown, metric), _spread(shown)
    if base and spread:
        mean, std = 100 * base[metric], 100 * base[f"{metric}_std"]
        ax.axhspan(mean - std, mean + std, color="gray", alpha=0.25, lw=0, zorder=0,
                   label=f"baseline mean ± std over {_seeds([base])}")
    heights = [100 * g[metric] for g in shown]
    bars = ax.bar(range(len(shown)), heights, yerr=[100 * g[f"{metric}_std"] for g in shown] if spread else None,
                  capsize=4, color=[f"C{i}" for i in range(len(shown))])
    majority = _majority(groups, metric)
    ax.bar_label(bars, labels=[f"{h:.1f}" + (f" = {MAJORITY_LABEL}" if majority is not None
                                             and abs(h - 100 * majority) < SAME_POINTS else "") for h in heights],
                 padding=2, fontsize=8)
    ax.set_xticks(range(len(shown)), [method_label(g) for g in shown], rotation=15)
    ax.set_xlabel(f"method ({_seeds_claim(shown)})" if shown else "method")
    ax.set_ylabel(ylabel or accuracy_label(benchmark, balanced))
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    if published and not balanced:
        _published_lines(ax, benchmark)
    _floor_lines(ax, groups, metric)
    _legend_below(ax)
    name = _metric_name(benchmark, balanced) if metric == accuracy_metric(benchmark, balanced) else metric.replace("_", " ")
    reading = comparison_reading(groups, metric, name)
    save_figure(fig, path, reading)
    return reading


def _metric_name(benchmark: str, balanced: bool) -> str:
    """How a reading names what it compares: ``HiRISE``, ``HiRISE balanced accuracy``."""
    return f"{bench_name(benchmark)} balanced accuracy" if balanced else bench_name(benchmark)


def _seeds(groups: list[dict]) -> str:
    counts = sorted({g["n"] for g in groups})
    return f"{counts[0]}–{counts[-1]} seeds" if len(counts) > 1 else f"{counts[0]} seed{'s' * (counts[0] > 1)}"


def _clear_of(g: dict, ref: dict, metric: str) -> int:
    """+1 when ``g``'s mean ± std lies wholly above ``ref``'s, -1 wholly below, 0 when the two overlap."""
    low, high = g[metric] - (g[f"{metric}_std"] or 0), g[metric] + (g[f"{metric}_std"] or 0)
    ref_low, ref_high = ref[metric] - (ref[f"{metric}_std"] or 0), ref[metric] + (ref[f"{metric}_std"] or 0)
    return 1 if low > ref_high else -1 if high < ref_low else 0


def _scored(g: dict, metric: str) -> str:
    return f"{method_label(g)} {pct(g[metric], g[f'{metric}_std'])} %"


def comparison_reading(groups: list[dict], metric: str, name: str, swept=()) -> str:
    """One line: which methods separate from the baseline by more than the seeds' spread (mean ± std intervals
    that do not overlap), or that none does, with the untrained encoder's and the oracle's scores beside. Without a
    baseline reference (or when the baseline is the swept method), the best and the worst setting are compared."""
    measured = [g for g in groups if g.get(metric) is not None]
    base = _baseline(measured, metric) if "baseline" not in swept else None
    methods = [g for g in measured if not _is_reference(g) or (g["method"] in swept and not is_oracle(g))]
    if not methods:
        return f"{name}: no method to compare{'' if base else ' and no baseline'}."
    compared = methods + ([base] if base else [])
    if any(g["n"] < 2 for g in compared):
        best = max(methods, key=lambda g: g[metric])
        than = f" vs the {_scored(base, metric)}" if base else ""
        return (f"{name}: one seed per configuration gives no spread to compare with (run --seeds 3 or more); "
                f"best {_scored(best, metric)}{than}{_references_note(measured, metric)}.")
    if base is None:
        best, worst = max(methods, key=lambda g: g[metric]), min(methods, key=lambda g: g[metric])
        verdict = "separates from" if _clear_of(best, worst, metric) else "does not separate from"
        return (f"{name}: the best, {_scored(best, metric)}, {verdict} the worst, {_scored(worst, metric)}, by more "
                f"than the seeds' spread ({_seeds(compared)}){_references_note(measured, metric)}.")
    above = [g for g in methods if _clear_of(g, base, metric) > 0]
    below = [g for g in methods if _clear_of(g, base, metric) < 0]
    against = f"the {_scored(base, metric)}"
    if not above and not below:
        verdict = f"no method separates from {against} by more than the seeds' spread ({_seeds(compared)})"
    else:
        parts = ([f"{', '.join(_scored(g, metric) for g in above)} above"] if above else []) + \
                ([f"{', '.join(_scored(g, metric) for g in below)} below"] if below else [])
        verdict = f"{' and '.join(parts)} {against} by more than the seeds' spread ({_seeds(compared)})"
    return f"{name}: {verdict}{_references_note(measured, metric)}."


def _references_note(groups: list[dict], metric: str) -> str:
    """The untrained encoder's and the oracle's scores, where they ran: what pretraining and clustering can reach;
    then the majority class and chance, and whether any result lies above the majority class at all."""
    shown = sorted((g for g in groups if g["method"] == "random-init" or is_oracle(g)), key=is_oracle)
    note = "".join(f"; {_reference_label(g)}: {pct(g[metric], g[f'{metric}_std'])} %" for g in shown)
    known = floor(groups, metric)
    if known is None:
        return note
    majority, chance = known
    above = any(g[metric] > majority for g in groups if g.get(metric) is not None)
    floors = f"majority class = chance {pct(chance)} %" if pct(majority) == pct(chance) else \
        f"majority class {pct(majority)} %, chance {pct(chance)} %"
    return f"{note}; {floors}" + ("" if above else "; no result lies above the majority class")


def save_figure(fig, path, reading: str | None = None) -> None:
    """Write ``fig`` as a PNG (to a path or a binary file) with its one-line ``reading`` in the PNG's text, where
    report.html finds it for the caption (:func:`figure_reading`)."""
    fig.savefig(path, format="png", dpi=120, bbox_inches="tight", metadata={READING_KEY: reading} if reading else None)
    pyplot().close(fig)


def figure_reading(png: str | Path | bytes) -> str | None:
    """The reading :func:`save_figure` stored in a PNG (a path or its bytes); None when it has none."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(png) if isinstance(png, bytes) else png) as image:
            return getattr(image, "text", {}).get(READING_KEY)
    except (OSError, ValueError):
        return None


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
                      ylabel: str | None = None, name: str | None = None, balanced: bool = False) -> str:
    """Accuracy (``balanced``: class-balanced accuracy) against removed-pair precision, one line per mode (error
    bars where every point has two seeds or more: spread over seeds in both directions; each point annotated
    with its noise and removed-pair recall), the baseline's mean ± spread as a band, the untrained encoder, the
    majority class and chance as lines where known. Returns the reading (:func:`precision_reading`, under
    ``name``, by default the ``ylabel`` without its unit), also stored in the PNG."""
    plt = pyplot()
    metric = accuracy_metric(benchmark, balanced)
    fig, ax = plt.subplots(figsize=(6, 4))
    base = _baseline(groups, metric)
    _reference_lines(ax, [base] * (base is not None) + [g for g in groups if g["method"] == "random-init"
                                                        and g.get(metric) is not None], metric,
                     _majority(groups, metric))
    for mode, points in _curves(groups, metric).items():
        spread = _spread(points)
        ax.errorbar([g["removed_precision"] for g in points], [100 * g[metric] for g in points],
                    xerr=[g["removed_precision_std"] or 0 for g in points] if spread else None,
                    yerr=[100 * g[f"{metric}_std"] for g in points] if spread else None, marker="o", capsize=4,
                    label=f"{mode} ({_seeds_claim(points)})")
        for g in points:
            recall = f", recall {g['removed_recall']:.2f}" if g.get("removed_recall") is not None else ""
            ax.annotate(f"noise {g['noise']:g}{recall}", (g["removed_precision"], 100 * g[metric]), fontsize=7,
                        textcoords="offset points", xytext=(4, 4))
    _floor_lines(ax, groups, metric)
    ax.set_xlabel("removed-pair precision (share that are true false negatives)")
    ax.set_ylabel(ylabel or accuracy_label(benchmark, balanced))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    _legend_below(ax)
    reading = precision_reading(groups, benchmark, name or (ylabel or "").removesuffix(" (%)") or None, balanced)
    save_figure(fig, path, reading)
    return reading


def precision_reading(groups: list[dict], benchmark: str, name: str | None = None, balanced: bool = False) -> str:
    """One sentence per mode: the removed-pair precision (and its recall) from which on every measured level of
    the mode beats the baseline by more than both spreads (its mean - std above the baseline's mean + std), or
    that none does."""
    metric = accuracy_metric(benchmark, balanced)
    name = name or _metric_name(benchmark, balanced)
    base = _baseline(groups, metric)
    if base is None:
        return f"{name}: no baseline result to compare with."
    curves = _curves(groups, metric)
    if base["n"] < 2 or any(g["n"] < 2 for points in curves.values() for g in points):
        return f"{name}: one seed per configuration gives no spread to compare with; run --seeds 3 or more."
    bar = base[metric] + (base[f"{metric}_std"] or 0)
    baseline = f"baseline {pct(base[metric], base[f'{metric}_std'])} %"
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
                             f"{pct(g[metric], g[f'{metric}_std'])} %)")
        else:
            best = max(points, key=lambda g: g[metric])
            sentences.append(f"{mode} does not beat the {baseline} by more than the seeds' spread even at "
                             f"precision {points[-1]['removed_precision']:.2f} (its best: precision "
                             f"{best['removed_precision']:.2f}, {pct(best[metric], best[f'{metric}_std'])} %)")
    return f"{name}: " + ("; ".join(sentences) if sentences else "no cluster-aware result") + "."
