"""Label efficiency (the paper's Fig. 4): linear-probe accuracy vs the fraction of labeled train data used.

For each encoder and benchmark the frozen features of every split are extracted once
(:func:`raysys.eval.linear.benchmark_features`, cached) and reused for every fraction and seed; only the
probe is refitted, on a stratified subset of the train split, and scored on the full test split.

How a subset is drawn (:func:`stratified_subset`):

* Augmented copies stay with their original: the unit of sampling is the manifest's ``group_id`` (an MSL
  image and its ``-fh``/``-fv``/``-r90``... copies), so a subset never holds a copy without the rest of
  its group -- otherwise "5 % of the labels" would quietly be 5 % of the views of more originals.
* Per class ``c`` with ``n_c`` train images the target is ``f * n_c`` images. The count taken is the one
  nearest the target among all counts whole groups can make (a subset-sum over the class's group sizes;
  the smaller count on a tie): exactly ``round(f * n_c)`` when single images can make up the rest, the
  nearest multiple when all groups are the same size. Among the ways to make that count, the number of
  groups of each size stays as near proportional (``f`` times the groups of that size) as it allows,
  largest sizes first, so originals with many copies are neither favoured nor avoided.
* Which groups of each size: the first ones of a seeded shuffle of the class's groups. A seed shuffles
  the same way at every fraction, so one seed's subsets grow (almost) nested: the curve's steps reflect
  added labels rather than a fresh draw.
* Every class keeps at least one group, so the probe can still predict it at 5 % (at most one image off
  the target where that class has single-image groups).

Every probe gets about the same number of optimisation steps: ``probe_epochs`` counts passes over the
full train split and a subset trains as many epochs as take the same number of batches, so small
fractions are not also under-trained. The plateau marked in the plots is the smallest fraction from which the mean
accuracy stays within one point of the full-label (largest-fraction) mean.

Outputs (:func:`write_results`): ``label-fraction.csv`` (one row per encoder, benchmark, fraction and
seed), ``label-fraction.md`` (mean ± std over seeds and the plateau per encoder) and
``label-fraction-<benchmark>.png``. The command line is ``experiments/label_fraction.py`` (:func:`main`).
"""

from __future__ import annotations

import argparse
import csv
import io
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from raysys.config import ConfigError, make_config
from raysys.data.formats import DataError, discover
from raysys.eval.linear import (
    _load_saved,
    benchmark_features,
    classification_metrics,
    load_benchmark,
    majority_baseline,
    resolve_model_file,
    train_probe,
)
from raysys.reporting.results import write_atomic

DEFAULT_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 5 %, 10 %, ..., 100 %
# Probe epochs default to the pretraining preset's ``eval_epochs`` (smoke 30, demo 100), so the 100 % point
# is the pipeline's own linear evaluation.
PRESETS = {
    "smoke": dict(fractions=(0.1, 0.5, 1.0), seeds=2),
    "demo": dict(fractions=DEFAULT_FRACTIONS, seeds=3),
}
BENCHMARKS = ("msl", "hirise")
CSV_FILE, TABLE_FILE = "label-fraction.csv", "label-fraction.md"
CSV_COLUMNS = ["encoder", "benchmark", "fraction", "seed", "n_train", "accuracy", "balanced_accuracy"]
PLATEAU_POINTS = 0.01  # "within one accuracy point of the full-label score"


# ----------------------------------------------------------------------------- subsets


def check_fractions(fractions) -> list[float]:
    """Sorted, de-duplicated fractions; :class:`ConfigError` unless each lies in (0, 1]."""
    fractions = sorted({float(f) for f in fractions})
    if not fractions:
        raise ConfigError("no label fractions given; pass values in (0, 1], e.g. --fractions 0.1 0.5 1")
    bad = [f for f in fractions if not 0 < f <= 1]
    if bad:
        raise ConfigError(f"label fraction {bad[0]} is outside (0, 1]; pass fractions such as 0.05 or 1")
    return fractions


def check_seeds(seeds) -> list[int]:
    """The probe/subset seeds as a list; :class:`ConfigError` when there are none."""
    count = seeds if isinstance(seeds, (int, np.integer)) else len(seeds)
    if count < 1:
        raise ConfigError(f"need at least 1 seed per fraction (got {count}); use --seeds 3 for error bars")
    return list(range(seeds)) if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]


def _group_table(labels: np.ndarray, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(inverse, sizes, group_label)``: each row's group index, each group's size and class; a group
    holding several classes is a broken manifest."""
    _, inverse, sizes = np.unique(np.asarray(groups), return_inverse=True, return_counts=True)
    group_label = np.empty(len(sizes), np.int64)
    group_label[inverse] = labels
    mixed = np.flatnonzero(group_label[inverse] != labels)
    if len(mixed):
        raise ValueError(f"augmentation group {np.asarray(groups)[mixed[0]]!r} holds images of several classes; "
                         "augmented copies must carry their original's label")
    return inverse, sizes, group_label


def _reachable(sizes: np.ndarray, available: np.ndarray) -> list[np.ndarray]:
    """``reach[j][t]``: can ``t`` images be made from whole groups of the first ``j`` sizes (bounded
    subset-sum; one sliding-window pass per residue of the size)."""
    reach = [np.zeros(int(sizes @ available) + 1, bool)]
    reach[0][0] = True
    for size, count in zip(sizes.tolist(), available.tolist()):
        prev, new = reach[-1], np.zeros_like(reach[-1])
        for r in range(size):
            sums = np.concatenate([[0], np.cumsum(prev[r::size])])
            i = np.arange(len(sums) - 1)
            new[r::size] = sums[i + 1] - sums[np.maximum(i - count, 0)] > 0  # any of the last count+1 steps
        reach.append(new)
    return reach


def _groups_per_size(sizes: np.ndarray, available: np.ndarray, target: float, at_least_one: bool) -> np.ndarray:
    """How many of the ``available`` groups of each (ascending) size to take: the reachable total nearest
    ``target``, made with per-size counts as near proportional as it allows (module docstring)."""
    reach = _reachable(sizes, available)
    totals = np.flatnonzero(reach[-1])
    if at_least_one:
        totals = totals[totals > 0]
    total = int(totals[np.argmin(np.abs(totals - target))])  # first minimum: the smaller total on a tie
    fraction = target / float(sizes @ available)
    take = np.zeros(len(sizes), np.int64)
    for j in reversed(range(len(sizes))):  # largest size first; smaller sizes make up the rest
        counts = np.arange(min(int(available[j]), total // int(sizes[j])) + 1)
        counts = counts[reach[j][total - counts * sizes[j]]]  # the rest must stay makeable
        take[j] = counts[np.argmin(np.abs(counts - fraction * available[j]))]
        total -= int(take[j] * sizes[j])
    return take


def sample_groups(labels, groups, targets: dict, rng: np.random.Generator, at_least_one: bool = False) -> np.ndarray:
    """Sorted row indices of whole groups per class, about ``targets[c]`` rows of class ``c`` (classes not in
    ``targets`` get none). ``groups`` gives each row's group (e.g. the manifest's ``group_id``); the classes
    are visited in ascending order, each shuffling its groups with ``rng``. See the module docstring."""
    labels = np.asarray(labels, dtype=np.int64)
    inverse, sizes, group_label = _group_table(labels, groups)
    chosen = []
    for c in sorted(targets):
        members = rng.permutation(np.flatnonzero(group_label == c))
        if len(members) == 0:
            continue
        size_values, available = np.unique(sizes[members], return_counts=True)
        take = _groups_per_size(size_values, available, float(targets[c]), at_least_one)
        for size, count in zip(size_values, take):
            chosen += members[sizes[members] == size][:count].tolist()
    return np.flatnonzero(np.isin(inverse, chosen))


def stratified_subset(labels, groups, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a class-stratified, group-preserving ``fraction`` of the rows (see the module
    docstring for the rule and its precision)."""
    (fraction,) = check_fractions([fraction])
    labels = np.asarray(labels, dtype=np.int64)
    classes, counts = np.unique(labels, return_counts=True)
    targets = {int(c): fraction * int(n) for c, n in zip(classes, counts)}
    return sample_groups(labels, groups, targets, np.random.default_rng(seed), at_least_one=True)


# ----------------------------------------------------------------------------- probes


def fraction_curve(
    train_x, train_y, train_groups, test_x, test_y, num_classes: int, fractions=DEFAULT_FRACTIONS, seeds=3,
    probe_epochs: int = 100, hidden: int = 0, lr: float = 1e-3, batch_size: int = 256, progress: bool = True,
    desc: str = "fractions",
) -> list[dict]:
    """Fit a probe per (fraction, seed) on a :func:`stratified_subset` of the given train features and score
    it on the test features; rows ``{fraction, seed, n_train, accuracy, balanced_accuracy}``."""
    fractions, seeds = check_fractions(fractions), check_seeds(seeds)
    if probe_epochs < 1:
        raise ConfigError(f"probe epochs must be at least 1 (got {probe_epochs})")
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    steps = probe_epochs * math.ceil(len(train_y) / batch_size)  # the full-label probe's step count
    rows = []
    for fraction in tqdm(fractions, desc=desc, unit="fraction", disable=not progress):
        for seed in seeds:
            subset = stratified_subset(train_y, train_groups, fraction, seed)
            epochs = max(1, round(steps / math.ceil(len(subset) / batch_size)))
            probe = train_probe(train_x[subset], train_y[subset], num_classes, hidden=hidden, epochs=epochs, lr=lr,
                                batch_size=batch_size, seed=seed)
            metrics = classification_metrics(test_y, probe.predict(test_x), num_classes)
            rows.append({"fraction": fraction, "seed": seed, "n_train": int(len(subset)),
                         "accuracy": metrics["accuracy"], "balanced_accuracy": metrics["balanced_accuracy"]})
    return rows


def evaluate_label_fractions(
    model, benchmark_root, image_size: int, fractions=DEFAULT_FRACTIONS, seeds=3, probe_epochs: int = 100,
    hidden: int = 0, cache_dir=None, device=None, progress: bool = True, desc: str = "fractions",
) -> dict:
    """The label-fraction curve of one frozen encoder on one benchmark, from features extracted once.

    Returns ``{"rows": fraction_curve rows, "majority": majority baseline on the full train split,
    "n_train_full", "skipped"}``.
    """
    fractions, seeds = check_fractions(fractions), check_seeds(seeds)
    manifest, names = load_benchmark(benchmark_root)
    data = benchmark_features(model, manifest, image_size, cache_dir=cache_dir, device=device, progress=progress)
    train, test = data["train"], data["test"]
    if len(train["y"]) == 0 or len(test["y"]) == 0:
        raise ValueError(f"benchmark {benchmark_root}: no train or no test image could be decoded")
    group_of = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("group_id").to_pylist()))
    groups = np.asarray([group_of[i] for i in train["image_id"].tolist()])
    rows = fraction_curve(train["x"], train["y"], groups, test["x"], test["y"], len(names), fractions, seeds,
                          probe_epochs, hidden, progress=progress, desc=desc)
    return {"rows": rows, "majority": majority_baseline(train["y"], test["y"], len(names)),
            "n_train_full": int(len(train["y"])), "skipped": data["skipped"]}


# ----------------------------------------------------------------------------- summaries and files


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
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
    ax.set_ylabel(f"{benchmark.upper()} test accuracy (%)")
    ax.set_title(f"Label efficiency on {benchmark.upper()} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_results(rows: list[dict], out, majority: dict | None = None) -> dict:
    """Write the CSV, the markdown table and one PNG per benchmark into ``out``; return their paths.
    ``majority`` maps benchmark -> :func:`raysys.eval.linear.majority_baseline` result (optional)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(sorted(rows, key=lambda r: (r["encoder"], r["benchmark"], r["fraction"], r["seed"])))
    write_atomic(out / CSV_FILE, buf.getvalue())
    summary = summarize(rows)
    write_atomic(out / TABLE_FILE, results_table(summary, majority))
    files = {"csv": out / CSV_FILE, "table": out / TABLE_FILE, "plots": {}}
    for benchmark in sorted({r["benchmark"] for r in rows}):
        path = out / f"label-fraction-{benchmark}.png"
        plot_curves(summary, benchmark, path, (majority or {}).get(benchmark, {}).get("accuracy"))
        files["plots"][benchmark] = path
    return {**files, "summary": summary}


# ----------------------------------------------------------------------------- the experiment


def encoder_names(paths: list[str]) -> list[str]:
    """A name per model path: the run folder's name (the parent folder for a ``.pt`` file, the run folder
    for a checkpoint's ``state.pt``), with ``-2``, ``-3``... on repeats."""
    names, seen = [], defaultdict(int)
    for path in paths:
        p = Path(path).resolve()
        if p.is_file():
            p = p.parent.parent if p.name == "state.pt" else p.parent
        seen[p.name] += 1
        names.append(p.name if seen[p.name] == 1 else f"{p.name}-{seen[p.name]}")
    return names


def _load_encoders(model_paths: list[str], default_size: int) -> list[tuple[str, object, int]]:
    """``(name, model, image_size)`` for each saved model, then a random-init model per distinct spec."""
    encoders = []
    for name, path in zip(encoder_names(model_paths), model_paths):
        try:
            model, config = _load_saved(path)
        except ValueError as exc:
            raise ConfigError(f"--model: {exc}") from None
        encoders.append((name, model, int(config.get("image_size") or default_size)))
    from raysys.models import ContrastiveModel

    specs = []
    for _, model, size in list(encoders):
        key = (repr(sorted(model.spec.items())), size)
        if key not in specs:
            specs.append(key)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                encoders.append(("random-init", ContrastiveModel.from_spec(model.spec).eval(), size))
    if len(specs) > 1:  # several architectures or sizes: number the random-init encoders
        numbers = iter(range(1, len(specs) + 1))
        encoders = [(f"random-init-{next(numbers)}" if n == "random-init" else n, m, s) for n, m, s in encoders]
    return encoders


def _benchmarks(data, preset: str) -> dict[str, Path]:
    if data is None:
        from raysys.data.simulate import simulate

        cfg = make_config(preset)
        roots = simulate(cfg.builtin_dir, preset=cfg.sim_preset, seed=cfg.sim_seed)
    else:
        roots = discover(data)
    found = {k: Path(v) for k, v in roots.items() if k in BENCHMARKS}
    if not found:
        raise ConfigError(f"--data {data} holds no MSL or HiRISE benchmark; pass a folder holding them")
    return found


def _pretrain(out: Path, preset: str, data) -> str:
    """Pretrain an encoder with the preset (Ray Train) into ``out/pretrain``; reuse a finished one."""
    run_dir = out / "pretrain"
    if not (run_dir / "model.pt").is_file():
        from raysys.distributed.trainer import pretrain  # imports Ray: only when pretraining is needed

        pretrain(make_config(preset, out=str(run_dir), data=data).validate())
    return str(run_dir)


def run_experiment(
    models: list[str] | None, preset: str = "demo", out="runs/label_fraction", data=None, fractions=None,
    seeds: int | None = None, probe_epochs: int | None = None, device=None, progress: bool = True,
) -> dict:
    """Label-fraction curves of each saved encoder and of a random-init one of the same spec on the MSL
    and HiRISE benchmarks (built-in data of ``preset`` unless ``data``); without ``models`` an encoder is
    pretrained first. Writes :func:`write_results` into ``out``; returns their paths, the rows and summary."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    settings = PRESETS[preset]
    fractions = check_fractions(settings["fractions"] if fractions is None else fractions)
    seeds = check_seeds(settings["seeds"] if seeds is None else seeds)
    probe_epochs = make_config(preset).eval_epochs if probe_epochs is None else probe_epochs
    if probe_epochs < 1:
        raise ConfigError(f"--probe-epochs must be at least 1 (got {probe_epochs})")
    if data is not None and not Path(data).is_dir():
        raise ConfigError(f"--data {data} is not a folder; pass the folder holding the benchmarks")
    for path in models or []:
        try:
            resolve_model_file(path)
        except ValueError as exc:
            raise ConfigError(f"--model: {exc}") from None
    out = Path(out)
    benchmarks = _benchmarks(data, preset)
    models = list(models or [_pretrain(out, preset, data)])
    encoders = _load_encoders(models, make_config(preset).image_size)

    rows, majority = [], {}
    for benchmark, root in sorted(benchmarks.items()):
        for name, model, size in encoders:
            result = evaluate_label_fractions(model, root, size, fractions, seeds, probe_epochs,
                                              cache_dir=out / "feature-cache", device=device, progress=progress,
                                              desc=f"{benchmark} {name}")
            rows += [{**row, "encoder": name, "benchmark": benchmark} for row in result["rows"]]
            majority[benchmark] = result["majority"]
    files = write_results(rows, out, majority)
    return {**files, "rows": rows, "majority": majority, "encoders": [e[0] for e in encoders]}


def main(argv: list[str] | None = None) -> int:
    """``python experiments/label_fraction.py``: see :func:`run_experiment`; bad input exits 2 with one line."""
    p = argparse.ArgumentParser(prog="label_fraction", description=__doc__.splitlines()[0])
    p.add_argument("--model", action="append", help="run folder, checkpoint dir or model.pt of a pretrained "
                   "encoder; repeatable (default: pretrain one with --preset first)")
    p.add_argument("--preset", default="demo", choices=sorted(PRESETS),
                   help="smoke: fractions 10/50/100 %%, 2 seeds; demo: 5..100 %% in steps of 5, 3 seeds "
                        "(default: %(default)s)")
    p.add_argument("--out", default="runs/label_fraction", help="output folder (default: %(default)s)")
    p.add_argument("--data", help="folder holding the MSL/HiRISE benchmarks (default: the preset's built-in data)")
    p.add_argument("--fractions", type=float, nargs="+", help="label fractions in (0, 1] (default: the preset's)")
    p.add_argument("--seeds", type=int, help="seeds per fraction (default: the preset's)")
    p.add_argument("--probe-epochs", type=int, help="probe epochs at 100 %% labels (default: the preset's eval_epochs)")
    p.add_argument("--device", help="torch device for feature extraction (default: cuda if available)")
    args = p.parse_args(argv)
    try:
        result = run_experiment(args.model, args.preset, args.out, args.data, args.fractions, args.seeds,
                                args.probe_epochs, args.device)
    except (ConfigError, DataError) as exc:
        print(f"label_fraction: error: {exc}", file=sys.stderr)
        return 2
    print(Path(result["table"]).read_text())
    print(f"results: {result['csv']}, {result['table']}, "
          + ", ".join(str(p) for p in result["plots"].values()))
    from raysys.reporting.html import write_report

    print(f"report: {write_report(args.out)}")
    return 0
