"""The false-negative study's results: accuracy against optimizer steps, arm by arm, seed by seed.

``results.csv`` holds one row per arm, seed and evaluation step (:func:`study_rows`); the summary draws each
arm's curve (mean ± standard deviation over seeds), the **paired gap** of each arm minus the baseline at every
step (mean over seeds of the per-seed difference, with a 95 % Student-t interval: the arms of a seed share
initial weights and batches, so the difference removes what the seeds share), and a final-step table.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from collections import defaultdict
from pathlib import Path

from scipy import stats

from raysys.reporting.plots import pyplot, save_figure
from raysys.reporting.results import _missing, write_atomic

BASELINE_ARM = "simclr"
# Per evaluation step (curve.json), then the trial's final evaluation on the last step's row only.
CURVE_METRICS = ["knn_acc", "knn_balanced_acc", "loss", "removed_pair_precision", "removed_pair_recall",
                 "false_negative_fraction"]
FINAL_METRICS = ["msl_acc", "msl_balanced_acc", "hirise_acc", "hirise_balanced_acc", "msl_knn_acc",
                 "msl_knn_balanced_acc"]
STUDY_COLUMNS = ["arm", "seed", "step", *CURVE_METRICS, *FINAL_METRICS, "trial", "method", "pair_rule",
                 "decoupled", "encoder", "k"]


def study_rows(trial: dict, curve: dict) -> list[dict]:
    """The results.csv rows of one finished trial (its final report) and its ``curve.json``."""
    points = sorted(curve.get("points", []), key=lambda p: p["step"])
    keep = {key: trial.get(key) for key in ("trial", "arm", "seed", "method", "pair_rule", "decoupled", "encoder", "k")}
    rows = [{**keep, **{m: p.get(m) for m in CURVE_METRICS}, "step": p["step"]} for p in points]
    if rows:
        rows[-1].update({m: trial.get(m) for m in FINAL_METRICS})
    return rows


def pairing_check(curves: dict[str, dict], arm_seed: dict[str, tuple[str, int]]) -> str:
    """One line: whether every arm of each seed started from the same initial weights and first batch (the
    ``curve.json`` of each trial, by trial name; ``arm_seed``: trial -> (arm, seed))."""
    by_seed = defaultdict(dict)
    for trial, curve in curves.items():
        by_seed[arm_seed[trial][1]][arm_seed[trial][0]] = (curve.get("init_weights_sha256"),
                                                           tuple(curve.get("first_batch_image_ids") or ()))
    broken = [f"seed {seed}: {sorted(arms)}" for seed, arms in sorted(by_seed.items()) if len(set(arms.values())) > 1]
    if broken:
        return "**Pairing broken** (arms of one seed differ in initial weights or first batch): " + "; ".join(broken)
    return (f"Pairing checked: within each of the {len(by_seed)} seed(s), every arm started from the same initial "
            "weights (SHA-256) and the same first batch.")


def write_study_csv(rows: list[dict], path: str | Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=STUDY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (str(r["arm"]), r["seed"], r["step"])):
        writer.writerow({k: ("" if _missing(row.get(k)) else row.get(k)) for k in STUDY_COLUMNS})
    write_atomic(path, buf.getvalue())


def _by(rows: list[dict], metric: str) -> dict[str, dict[int, dict[int, float]]]:
    """arm -> step -> seed -> value."""
    table = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        if not _missing(r.get(metric)):
            table[r["arm"]][r["step"]][r["seed"]] = r[metric]
    return table


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval of ``values`` (NaN bounds for fewer than two)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def curves(rows: list[dict], metric: str) -> dict[str, list[tuple[int, float, float, int]]]:
    """arm -> [(step, mean, standard deviation, seeds)] of ``metric``."""
    out = {}
    for arm, steps in _by(rows, metric).items():
        out[arm] = [(step, statistics.fmean(v.values()), statistics.stdev(v.values()) if len(v) > 1 else 0.0, len(v))
                    for step, v in sorted(steps.items())]
    return out


def paired_gaps(rows: list[dict], metric: str, baseline: str = BASELINE_ARM) -> dict[str, list[tuple]]:
    """arm -> [(step, mean gap, 95 % low, 95 % high, seeds)] of ``metric`` minus the baseline's, seed by seed
    (only seeds both have at that step)."""
    table = _by(rows, metric)
    base = table.get(baseline, {})
    out = {}
    for arm, steps in table.items():
        if arm == baseline:
            continue
        points = []
        for step, seeds in sorted(steps.items()):
            diffs = [v - base[step][s] for s, v in seeds.items() if s in base.get(step, {})]
            if diffs:
                points.append((step, *interval(diffs), len(diffs)))
        out[arm] = points
    return out


def separation(gaps: list[tuple]) -> tuple[int, int, int] | None:
    """``(first step, evaluations with the interval above 0 from it, evaluations from it)`` of a paired-gap
    curve: where its 95 % interval first lies above 0 and how often it stays there; None if it never does."""
    above = [low > 0 for _, _, low, _, _ in gaps]
    if True not in above:
        return None
    first = above.index(True)
    return gaps[first][0], sum(above[first:]), len(above) - first


def _separation_text(gaps: list[tuple]) -> str:
    found = separation(gaps)
    return "never" if found is None else f"{found[0]} ({found[1]}/{found[2]})"


def _pts(x) -> str:
    return "–" if x is None or _missing(x) else f"{100 * x:+.1f}"


def _pct(mean, std=None) -> str:
    if mean is None or _missing(mean):
        return "–"
    return f"{100 * mean:.1f}" + ("" if std is None else f" ± {100 * std:.1f}")


def _final_stats(rows: list[dict], arm: str, metric: str) -> tuple[float | None, float | None]:
    values = [r[metric] for r in rows if r["arm"] == arm and not _missing(r.get(metric))]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _last_gap(gaps: dict, arm: str) -> str:
    points = gaps.get(arm) or []
    if not points:
        return "–"
    _, mean, low, high, _ = points[-1]
    return f"{_pts(mean)} [{_pts(low)}, {_pts(high)}]"


def study_table(rows: list[dict], arms: list[str], describe: dict[str, str]) -> str:
    """Markdown: per arm, the last evaluation step's kNN accuracy and balanced accuracy (mean ± sd), the paired
    gap to the baseline with its 95 % interval, the step from which it separates, the final linear probes and
    their paired gaps."""
    gaps, bal_gaps = paired_gaps(rows, "knn_acc"), paired_gaps(rows, "knn_balanced_acc")
    knn, bal = curves(rows, "knn_acc"), curves(rows, "knn_balanced_acc")
    probes = ("msl_acc", "msl_balanced_acc", "hirise_balanced_acc")
    probe_gaps = {m: paired_gaps(rows, m) for m in probes}
    header = ["arm", "what", "seeds", "last step", "kNN acc %", "kNN balanced %", "paired gap, acc [95 %]",
              "paired gap, balanced [95 %]", "interval > 0 from step (evaluations)", "probe MSL %", "probe MSL balanced %",
              "probe HiRISE balanced %", "probe gap MSL", "probe gap MSL balanced", "probe gap HiRISE balanced"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for arm in [a for a in arms if a in knn]:
        step, mean, sd, n = knn[arm][-1]
        b = bal.get(arm, [(step, None, None, n)])[-1]
        sep = "baseline" if arm == BASELINE_ARM else _separation_text(gaps.get(arm, []))
        cells = [arm, describe.get(arm, ""), str(n), str(step), _pct(mean, sd), _pct(b[1], b[2]),
                 "–" if arm == BASELINE_ARM else _last_gap(gaps, arm),
                 "–" if arm == BASELINE_ARM else _last_gap(bal_gaps, arm), str(sep)]
        cells += [_pct(*_final_stats(rows, arm, m)) for m in probes]
        cells += ["–" if arm == BASELINE_ARM else _last_gap(probe_gaps[m], arm) for m in probes]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def gap_table(rows: list[dict], arms: list[str], metric: str = "knn_acc") -> str:
    """Markdown: the paired gap of every arm to the baseline at every evaluation step, with its 95 % interval."""
    gaps = paired_gaps(rows, metric)
    shown = [a for a in arms if gaps.get(a)]
    cells = {(a, step): f"{_pts(m)} [{_pts(lo)}, {_pts(hi)}]" for a in shown for step, m, lo, hi, _ in gaps[a]}
    steps = sorted({step for a in shown for step, *_ in gaps[a]})
    lines = ["| step | " + " | ".join(shown) + " |", "|---|" + "---|" * len(shown)]
    lines += [f"| {step} | " + " | ".join(cells.get((a, step), "–") for a in shown) + " |" for step in steps]
    return "\n".join(lines)


def study_reading(rows: list[dict], arms: list[str]) -> list[str]:
    """Plain sentences: from which step each arm's paired kNN gap to the baseline has its 95 % interval above
    (or below) 0, how often it stays there, and the gap at the last step."""
    gaps = paired_gaps(rows, "knn_acc")
    out = []
    for arm in [a for a in arms if gaps.get(a)]:
        points = gaps[arm]
        step, mean, low, high, n = points[-1]
        ahead = separation(points)
        behind = separation([(s, -m, -h, -lo, k) for s, m, lo, h, k in points])
        if ahead is not None and 2 * ahead[1] > ahead[2]:
            verdict = (f"is ahead of {BASELINE_ARM} from step {ahead[0]}: the paired 95 % interval lies above 0 at "
                       f"{ahead[1]} of the {ahead[2]} evaluations from there")
        elif behind is not None and 2 * behind[1] > behind[2]:
            verdict = (f"falls behind {BASELINE_ARM} from step {behind[0]}: the interval lies below 0 at "
                       f"{behind[1]} of the {behind[2]} evaluations from there")
        else:
            above, below = (sum(1 for p in points if test(p)) for test in (lambda p: p[2] > 0, lambda p: p[3] < 0))
            verdict = (f"does not separate from {BASELINE_ARM}: its interval lies above 0 at {above} and below 0 at "
                       f"{below} of {len(points)} evaluations")
        out.append(f"- **{arm}** {verdict}; at step {step} the paired kNN gap is {_pts(mean)} points "
                   f"(95 % interval {_pts(low)} to {_pts(high)}, {n} seeds).")
    return out


def plot_study(rows: list[dict], arms: list[str], path: str | Path, metric: str = "knn_acc",
               label: str = "kNN accuracy") -> None:
    """Two panels: ``metric`` against steps per arm (mean ± sd band), and each arm's paired gap to the baseline
    (mean, 95 % interval band, the zero line). Bands, and the titles' claims of them, only where every point has
    two seeds or more."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
    colours = {arm: plt.cm.tab10(i % 10) for i, arm in enumerate(arms)}
    arm_curves = curves(rows, metric)
    spread = all(n >= 2 for points in arm_curves.values() for *_, n in points)
    for arm, points in sorted(arm_curves.items(), key=lambda kv: arms.index(kv[0]) if kv[0] in arms else 99):
        steps, mean, sd = zip(*[(s, 100 * m, 100 * d) for s, m, d, _ in points])
        left.plot(steps, mean, marker="o", ms=3, label=arm, color=colours.get(arm),
                  lw=2.5 if arm == BASELINE_ARM else 1.5, ls="--" if arm == BASELINE_ARM else "-")
        if spread:
            left.fill_between(steps, [m - d for m, d in zip(mean, sd)], [m + d for m, d in zip(mean, sd)],
                              alpha=0.12, color=colours.get(arm))
    left.set(xlabel="optimizer step", ylabel=f"{label} (%)",
             title=f"{label}: {'mean ± sd over seeds' if spread else 'no spread (under 2 seeds at a step)'}")
    right.axhline(0, color="black", lw=1)
    for arm, points in paired_gaps(rows, metric).items():
        steps, mean, low, high = zip(*[(s, 100 * m, 100 * lo, 100 * hi) for s, m, lo, hi, _ in points])
        right.plot(steps, mean, marker="o", ms=3, label=arm, color=colours.get(arm))
        right.fill_between(steps, low, high, alpha=0.15, color=colours.get(arm))
    right.set(xlabel="optimizer step", ylabel="gap (percentage points)",
              title=f"paired gap to {BASELINE_ARM} (mean{', 95 % interval' if spread else ''})")
    for ax in (left, right):
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, gap_reading(rows, metric, label))


def gap_reading(rows: list[dict], metric: str = "knn_acc", label: str = "kNN accuracy") -> str:
    """One line: each arm's paired gap to the baseline at its last evaluation step, with its 95 % interval, and
    which arms' intervals lie wholly above or below 0 there."""
    last = {arm: points[-1] for arm, points in paired_gaps(rows, metric).items() if points}
    if not last:
        return f"{label}: no arm paired with {BASELINE_ARM} (a seed of both at one step)."
    gaps = ", ".join(f"{arm} {_pts(m)} [{_pts(lo)}, {_pts(hi)}]" for arm, (_, m, lo, hi, _) in last.items())
    above = [arm for arm, (_, _, lo, _, _) in last.items() if lo > 0]
    below = [arm for arm, (_, _, _, hi, _) in last.items() if hi < 0]
    verdict = "; ".join([f"above 0: {', '.join(above)}"] * bool(above) + [f"below 0: {', '.join(below)}"] * bool(below))
    steps = sorted({step for step, *_ in last.values()})
    seeds = sorted({n for *_, n in last.values()})
    return (f"{label}, paired gap to {BASELINE_ARM} at step {'/'.join(map(str, steps))} (points, 95 % interval, "
            f"{'/'.join(map(str, seeds))} seeds): {gaps}; " + (verdict or "no interval clear of 0") + ".")


def plot_removed_pairs(rows: list[dict], path: str | Path) -> bool:
    """Removed-pair precision (solid) and recall (dotted) against steps for the arms that remove pairs by a
    label-free rule (those with precision below 1), one colour an arm, beside the base rate a random removal
    would score (SimCLR's same-class share of negatives); False when there are none."""
    precision, recall = curves(rows, "removed_pair_precision"), curves(rows, "removed_pair_recall")
    label_free = [arm for arm, pts in precision.items() if any(m < 0.999 for _, m, _, _ in pts)]
    if not label_free:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    base_rate = [m for _, m, _, _ in curves(rows, "false_negative_fraction").get(BASELINE_ARM, [])]
    if base_rate:
        ax.axhline(statistics.fmean(base_rate), color="gray", linestyle="--", label="base rate (random removal)")
    for i, arm in enumerate(label_free):
        for name, table, style in (("precision", precision, "-"), ("recall", recall, ":")):
            if arm in table:
                steps, mean = zip(*[(s, m) for s, m, _, _ in table[arm]])
                ax.plot(steps, mean, style, color=f"C{i}", marker="o", ms=3, label=f"{arm}: removed-pair {name}")
    ax.set(xlabel="optimizer step", ylabel="fraction", ylim=(0, 1),
           title="Label-free elimination: removed pairs that are true false negatives")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    last = [f"{arm} precision {precision[arm][-1][1]:.2f}"
            + (f", recall {recall[arm][-1][1]:.2f}" if arm in recall else "") for arm in label_free]
    rate = f" (random removal: {statistics.fmean(base_rate):.2f})" if base_rate else ""
    save_figure(fig, path, f"Removed pairs at the last step: {'; '.join(last)}{rate}.")
    return True


def describe(variant: dict) -> str:
    """What an arm trains with, in words, from its sweep variant."""
    rule = {"baseline": "instance rule (SimCLR)", "label": "label rule: SupCon, uses labels",
            "fnc": "fnc rule: each anchor's most similar images of the batch"}.get(variant["method"], f"{variant['method']} rule")
    if variant.get("cluster_mode") == "attract":
        rule += ", attracted as positives"
    if variant["method"] == "cluster":
        source = variant.get("encoder") or "sweep's"
        rule += f", {'oracle' if source == 'oracle' else source} clusters" + (f" K={variant['k']}" if variant.get("k") else "")
    return rule + (", decoupled" if variant.get("decoupled") else ", positive kept" if variant["method"] != "label" else "")
