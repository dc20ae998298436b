"""A finished sweep's ``summary.md`` and plots."""

from __future__ import annotations

import json
from pathlib import Path

from raysys import storage
from raysys.config import PretrainConfig
from raysys.data.formats import discover
from raysys.data.sources import is_simulated
from raysys.distributed.console import say
from raysys.distributed.sweep_spec import BENCHMARKS, SweepSpec
from raysys.distributed.trainer import CURVE_FILE
from raysys.reporting import fn_study
from raysys.reporting import plots as draw
from raysys.reporting import results as report
from raysys.reporting.html import best_trial


def real_benchmarks(spec: SweepSpec) -> set[str]:
    """The benchmarks a sweep evaluated on real datasets (not the simulator's), where published numbers apply."""
    data = PretrainConfig.from_dict(spec.base).data
    if data is None:
        return set()
    return {name for name, root in discover(data).items() if name in BENCHMARKS and not is_simulated(root)}


def study_curves(spec: SweepSpec, trials: list[str]) -> dict[str, dict]:
    """The ``curve.json`` of each finished trial that has one, by trial name (from shared storage when set)."""
    uris = {trial: storage.join(spec.storage_root, "trials", trial, CURVE_FILE) for trial in trials}
    return {trial: json.loads(storage.read_text(uri)) for trial, uri in uris.items() if storage.exists(uri)}


def write_summary(spec: SweepSpec, rows: list[dict], errors: list[str]) -> list[str]:
    """``summary.md`` (the reproduce command, the grouped table, each plot's one-line reading, the best trial) and
    one plot per benchmark; returns the names of the files written."""
    out = Path(spec.out)
    groups = report.group(rows)
    table = report.grouped_table(groups, spec.plot, spec.param, spec.swept, spec.place_recognition, rows)
    plots, readings, real = [], [], real_benchmarks(spec)
    for bench in BENCHMARKS:
        if not any(g.get(f"{bench}_acc") is not None for g in groups):
            continue
        for balanced in draw.accuracy_figures(groups, bench):  # an imbalanced benchmark: balanced accuracy first
            path = out / f"{spec.name}-{bench}{'-balanced' if balanced else ''}.png"
            what = f"{draw.bench_name(bench)}{' balanced' if balanced else ''}"
            if spec.plot == "bars":
                readings.append(draw.plot_methods(groups, bench, path, f"{what} accuracy: methods compared ({spec.name})",
                                                  published=bench in real, balanced=balanced))
            elif spec.plot == "precision":
                readings.append(draw.plot_vs_precision(groups, bench, path, f"{what} accuracy vs removed-pair precision",
                                                       balanced=balanced))
            else:
                readings.append(draw.plot_vs_param(groups, bench, spec.param, path,
                                                   f"{what} accuracy vs {spec.param} ({spec.name})", spec.swept,
                                                   published=bench in real, balanced=balanced))
            plots.append(path.name)
    if spec.plot == "precision" and any(g.get("pool_knn_acc") is not None for g in groups):
        path, name = out / f"{spec.name}-pool-knn.png", "kNN on unseen pool images"
        readings.append(draw.plot_vs_precision(groups, "pool_knn", path, f"{name} at the step budget vs "
                                                 "removed-pair precision", ylabel=f"{name} (%)", name=name))
        plots.append(path.name)
    if spec.place_recognition and any(g.get("place_recall1") is not None for g in groups):
        path = out / f"{spec.name}-place.png"
        readings.append(draw.plot_methods(groups, "place", path, f"Place recognition on held-out traverses "
                                            f"({spec.name})", metric="place_recall1",
                                            ylabel="recall@1 within the radius (%)"))
        plots.append(path.name)
    best = best_trial(rows)
    floors = draw.floor_note(groups)
    lines = ([f"# {spec.name}", "", f"Reproduce: `{spec.command}`", "", table, ""] + ([floors, ""] if floors else [])
             + [f"{r}\n" for r in readings])
    if real:
        lines += [draw.published_note(sorted(real)), ""]
    if best:
        metric = draw.lead_metric(rows, "msl")
        lines += [f"Best trial on {draw.accuracy_label('msl', metric != 'msl_acc').removesuffix(' (%)')}: "
                  f"**{best['trial']}** ({report.pct(best[metric])} %).", ""]
    return _write_summary_file(out, lines, plots, errors, [table, *readings])


def _write_summary_file(out: Path, lines: list[str], plots: list[str], errors: list[str],
                        shown: list[str]) -> list[str]:
    """``summary.md`` from its ``lines`` plus the plots and any failed trials; print ``shown`` and where things
    are; return the names of the files written."""
    lines = [*lines, *[f"![{p}]({p})" for p in plots]]
    if errors:
        lines += ["", f"{len(errors)} trial(s) failed:"] + [f"- {e}" for e in errors]
    report.write_atomic(out / "summary.md", "\n".join(lines) + "\n")
    say("\n".join(shown + ([f"{len(errors)} trial(s) failed:", *errors] if errors else [])))
    say(f"\nresults: {out / 'results.csv'}\nsummary: {out / 'summary.md'}\nTensorBoard: tensorboard --logdir {out}")
    return ["summary.md", *plots]


def write_study_summary(spec: SweepSpec, rows: list[dict], errors: list[str]) -> list[str]:
    """A study of steps (the false-negative study): ``summary.md`` with the final-step table and its reading,
    the accuracy and paired-gap plots, and the removed-pair precision/recall plot of label-free arms."""
    out = Path(spec.out)
    long = report.read_results_csv(out / "results.csv")
    arms = [v["arm"] for v in spec.variants]
    describe = {v["arm"]: fn_study.describe(v) for v in spec.variants}
    table, reading = fn_study.study_table(long, arms, describe), fn_study.study_reading(long, arms)
    plots = []
    for metric, label in (("knn_acc", "kNN accuracy"), ("knn_balanced_acc", "kNN balanced accuracy")):
        if any(r.get(metric) is not None for r in long):
            plots.append(f"{spec.name}-{metric}.png")
            fn_study.plot_study(long, arms, out / plots[-1], metric, label)
    if fn_study.plot_removed_pairs(long, out / f"{spec.name}-removed-pairs.png"):
        plots.append(f"{spec.name}-removed-pairs.png")
    lines = [f"# {spec.name}", "", f"Reproduce: `{spec.command}`", "", table, "", *reading, "",
             "Gaps are paired: each seed's arm minus the same seed's baseline, which started from the same weights "
             "and saw the same batches and views; the interval is Student's t over seeds.", "",
             "Paired kNN-accuracy gap to the baseline at every evaluation step (points, [95 % interval]):", "",
             fn_study.gap_table(long, arms), ""]
    arm_seed = {r["trial"]: (r["arm"], r["seed"]) for r in long}
    lines += [fn_study.pairing_check(study_curves(spec, list(arm_seed)), arm_seed), ""]
    return _write_summary_file(out, lines, plots, errors, [table, *reading])
