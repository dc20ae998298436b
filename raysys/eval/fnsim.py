"""False-negative view pairs in random batches: the simulation of the paper's Appendix B (Fig. 6, Table 2 col. 2).

Definition (the paper's Appendix B and Fig. 7, and the trainer's): a batch holds B distinct source images,
each seen as two views, so 2B views and 2B(2B-1) ordered view pairs (a view with itself excluded). Under
the baseline SimCLR rule (:class:`raysys.methods.pairs.InstanceRule`) every pair of views of two *different* images
is a negative; it is a false negative when the two images share a class. A batch's count is
:func:`raysys.methods.pairs.count_false_negative_view_pairs` (4 per ordered pair of same-class images), its
fraction :func:`raysys.methods.pairs.false_negative_fraction_all_pairs`; we report mean, std and standard error
over independent batches, beside the exact expectation.

Exact expectation. Two distinct images of a batch share a class with probability q, so
``E[count] = 4 B (B-1) q`` and ``E[fraction] = 2 (B-1) q / (2B-1)``, where

- i.i.d. sampling from class probabilities p (an infinite dataset): ``q = sum_c p_c^2``;
- B distinct images drawn without replacement from a finite dataset of N images, K_c of class c (every
  B-subset equally likely, as for one batch of a shuffled epoch): two distinct slots hold a uniformly
  random ordered pair of distinct images, so ``q = sum_c K_c (K_c - 1) / (N (N - 1))`` (hypergeometric).
  For a balanced dataset with C classes, ``q = (N - C) / (C (N - 1))``, which tends to 1/C as N grows.

"Dataset size" in Fig. 6: Appendix B says the rate is invariant to the dataset's size "beyond an initial
point", because batches still sample each class with the same frequency. We read it as the number N of
images of a balanced dataset from which each batch is drawn without replacement (N >= B): the
finite-population formula above; its dip for N close to B is the "initial point".

What reproduces (B = 128, this definition, not tuned to the paper):

- uniform C classes: ``2 (B-1) / ((2B-1) C)``: 9.96 % at C = 10, the paper's "decreases from 10 %";
  invariant to batch size beyond B of about 10 and to dataset size once N >> C (balanced: 1/C short by
  the relative (C-1)/(N-1)), as stated.
- MSL v2.1 train distribution (``sum p^2 = 0.1533``): 15.3 %; paper 15.0 %. Reproduces within 0.3 points.
- uniform 1,000 classes: 0.0996 %; paper 0.08 %. Not reproduced: since ``sum p^2 >= 1/C``, no 1,000-class
  distribution goes below 0.0996 % under this definition.
- 50/50 mix of the two, classes disjoint: ``q = (0.1533 + 0.001) / 4``, 3.84 %; paper 0.30 %. Not
  reproduced: the Curiosity half alone contributes ``0.5^2 x 15.3 % = 3.8 %`` whatever the other half is.
  The pooled reading (:func:`pool`, ``--pool``) reproduces it: batches drawn from one pool of MSL v2.1's
  6,820 labelled images and ImageNet's 50,000 validation labels give 0.295 %. The 1,000-class floor
  ``sum p^2 >= 1/C`` holds for i.i.d. draws; without replacement from N images it is lower by (C-1)/(N-1).

``raysys fn-sim`` is :func:`configure_parser` and :func:`run`. The grid of ``experiments/fn_simulation.py``
(the Fig. 6 panels and Table 2 column 2, their plots and summary) is :func:`fig6_main` at the end.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from raysys.data.formats import read_manifest
from raysys.data.simulate import MSL_TRAIN_COUNTS
from raysys.errors import ConfigError, run_command
from raysys.methods.pairs import false_negative_fraction_all_pairs

MAX_CLASSES = 10_000_000  # a probability vector of this many float64 is 80 MB
_CHUNK_LABELS = 1 << 21  # labels per call of the vectorized counter (bounds its memory)
_SPEC_HELP = "msl-v2.1, uniform-1000 (or uniform-C), a class,count CSV file or a dataset folder"


@dataclass(frozen=True)
class ClassDistribution:
    """Class probabilities of a (possibly infinite) dataset; ``counts`` are the class sizes it was read
    from, when it was read from data."""

    name: str
    probs: np.ndarray  # float64 [C], sums to 1
    counts: np.ndarray | None = field(default=None, repr=False)

    @property
    def n_classes(self) -> int:
        """Classes with non-zero probability."""
        return int(np.count_nonzero(self.probs))

    @property
    def sum_sq(self) -> float:
        """``sum_c p_c^2``: the chance that two i.i.d. images share a class."""
        return float(np.sum(self.probs ** 2))

    def population(self, size: int) -> np.ndarray:
        """Class sizes of a finite dataset of ``size`` images with these proportions (largest remainder;
        the source counts themselves when ``size`` is their total)."""
        quota = size * self.probs
        counts = np.floor(quota).astype(np.int64)
        # Vectorized largest-remainder rounding (simulate.apportion loops once per missing unit: O(C^2)).
        short = size - int(counts.sum())
        counts[np.argsort(counts - quota, kind="stable")[:short]] += 1
        return counts


def from_counts(counts, name: str) -> ClassDistribution:
    """The distribution of a dataset with these class sizes."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.ndim != 1 or counts.size == 0 or (counts < 0).any() or counts.sum() == 0:
        raise ConfigError(f"distribution {name}: class counts must be non-negative with a positive total, "
                          f"got {counts.tolist()[:10]}; fix the counts")
    return ClassDistribution(name, counts / counts.sum(), counts)


def uniform(n_classes: int) -> ClassDistribution:
    """A perfectly balanced distribution over ``n_classes`` classes (the setting of Fig. 6)."""
    if not 1 <= n_classes <= MAX_CLASSES:
        raise ConfigError(f"number of classes must be between 1 and {MAX_CLASSES:,}, got {n_classes}; "
                          f"pass e.g. --classes 10")
    return ClassDistribution(f"uniform-{n_classes}", np.full(n_classes, 1.0 / n_classes))


def msl_v21_train() -> ClassDistribution:
    """The MSL v2.1 train split's class counts (augmented, 5,920 images, 19 classes): the paper's proxy
    for the Curiosity pretraining images."""
    return from_counts(MSL_TRAIN_COUNTS, "msl-v2.1")


def mix(base: ClassDistribution, other: ClassDistribution, ratio: float) -> ClassDistribution:
    """Fraction ``ratio`` of images from ``other`` and ``1 - ratio`` from ``base``; the two class sets are
    disjoint (e.g. Curiosity and ImageNet)."""
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"mixing ratio must be in [0, 1], got {ratio:g}; pass e.g. --mix uniform-1000:0.5")
    probs = np.concatenate([(1.0 - ratio) * base.probs, ratio * other.probs])
    return ClassDistribution(f"{base.name}+{other.name}:{ratio:g}", probs)


def pool(parts: list[tuple[ClassDistribution, int]]) -> ClassDistribution:
    """One finite pool holding ``count`` images of each distribution, their class sets disjoint, so that batches
    are drawn from the union (e.g. MSL v2.1's 6,820 labels pooled with ImageNet's 50,000 validation labels)."""
    if not parts:
        raise ConfigError("--pool needs at least one NAME=COUNT, e.g. --pool msl-v2.1=6820")
    counts = np.concatenate([dist.population(count) for dist, count in parts])
    return from_counts(counts, "+".join(f"{dist.name}={count}" for dist, count in parts))


def from_csv(path) -> ClassDistribution:
    """Class sizes from a ``class,count`` CSV (one row per class; an optional ``class,count`` header)."""
    path = Path(path)
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if any(cell.strip() for cell in r)]
    if rows and [c.strip().lower() for c in rows[0]] == ["class", "count"]:
        rows = rows[1:]
    names, counts = [], []
    for i, row in enumerate(rows, 1):
        count = row[1].strip() if len(row) == 2 else ""
        if not re.fullmatch(r"\d+", count):
            raise ConfigError(f"{path}: data row {i} {','.join(row)!r} is not 'class,count' with a non-negative "
                              f"integer count; fix that row")
        names.append(row[0].strip())
        counts.append(int(count))
    if not counts or sum(counts) == 0:
        raise ConfigError(f"{path}: no class has a positive count; write one 'class,count' row per class")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise ConfigError(f"{path}: class {dup!r} appears twice; give each class one row")
    return from_counts(counts, str(path))


def from_manifest(root) -> ClassDistribution:
    """Class sizes of a dataset folder (any layout :func:`raysys.data.formats.read_manifest` reads):
    distinct images (by ``image_id``) of the train split if it has labelled train rows, else all labelled rows."""
    table = read_manifest(root)
    ids = np.asarray(table.column("image_id").to_pylist(), dtype=object)
    _, first = np.unique(ids, return_index=True)  # repeated rows are one image (never negatives of each other)
    labels = table.column("label").to_numpy()[first]
    splits = np.asarray(table.column("split").to_pylist(), dtype=object)[first]
    keep = labels >= 0
    if not keep.any():
        raise ConfigError(f"{root}: the dataset has no labelled images; use a labelled dataset or a class,count CSV")
    train = keep & (splits == "train")
    which = "train split" if train.any() else "all labelled rows"
    return from_counts(np.bincount(labels[train if train.any() else keep]), f"{root} ({which})")


def parse_distribution(spec: str) -> ClassDistribution:
    """``msl-v2.1``, ``uniform-C`` (e.g. ``uniform-1000``), a ``class,count`` CSV file or a dataset folder."""
    spec = spec.strip()
    if spec == "msl-v2.1":
        return msl_v21_train()
    m = re.fullmatch(r"uniform-(\d+)", spec)
    if m:
        return uniform(int(m.group(1)))
    path = Path(spec)
    if path.is_file():
        return from_csv(path)
    if path.is_dir():
        return from_manifest(path)
    raise ConfigError(f"unknown distribution {spec!r}: not a name nor an existing path; use {_SPEC_HELP}")


def parse_mix(spec: str) -> tuple[ClassDistribution, float]:
    """``OTHER:RATIO`` (the last colon splits) -> (other distribution, ratio)."""
    other, sep, ratio = spec.rpartition(":")
    try:
        value = float(ratio)
    except ValueError:
        value = None
    if not sep or not other or value is None:
        raise ConfigError(f"--mix {spec!r} is not OTHER:RATIO; pass e.g. --mix uniform-1000:0.5")
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"--mix ratio must be in [0, 1], got {ratio}; pass e.g. --mix uniform-1000:0.5")
    return parse_distribution(other), value


def parse_pool_part(spec: str) -> tuple[ClassDistribution, int]:
    """``NAME=COUNT`` (the last ``=`` splits) -> (distribution, images of it in the pool)."""
    name, sep, count = spec.rpartition("=")
    if not sep or not name or not re.fullmatch(r"\d+", count.strip()) or int(count) < 1:
        raise ConfigError(f"--pool {spec!r} is not NAME=COUNT with a positive image count; pass e.g. "
                          f"--pool msl-v2.1=6820 --pool uniform-1000=50000")
    return parse_distribution(name), int(count)


# ----------------------------------------------------------------------------------------------------
# expectation and simulation


def pair_share(dist: ClassDistribution, dataset_size: int | None = None) -> float:
    """Probability that two distinct images of a batch share a class: ``sum p^2`` (i.i.d.) or, drawing
    without replacement from ``dataset_size`` images, ``sum K (K-1) / (N (N-1))``."""
    if dataset_size is None:
        return dist.sum_sq
    k = dist.population(dataset_size).astype(np.float64)
    return float(np.sum(k * (k - 1)) / (dataset_size * (dataset_size - 1.0)))


def expected_fn_fraction(dist: ClassDistribution, batch_size: int, dataset_size: int | None = None) -> float:
    """Exact expected fraction of false-negative view pairs among the ``2B(2B-1)`` ordered view pairs:
    ``2 (B-1) q / (2B-1)`` with q from :func:`pair_share`."""
    return 2.0 * (batch_size - 1) * pair_share(dist, dataset_size) / (2 * batch_size - 1)


def check_params(batch_size: int, batches: int, dataset_size: int | None) -> None:
    """Raise :class:`ConfigError` for a batch size, batch count or dataset size the simulation cannot use."""
    if batch_size < 2:
        raise ConfigError(f"--batch-size must be at least 2 (one image has no negatives), got {batch_size}")
    if batches < 2:
        raise ConfigError(f"--batches must be at least 2 to estimate a standard deviation, got {batches}")
    if dataset_size is not None and dataset_size < batch_size:
        raise ConfigError(f"--dataset-size {dataset_size} is smaller than the batch size {batch_size}; "
                          f"pass a dataset size of at least {batch_size} or leave it unset (infinite dataset)")


def sample_labels(dist: ClassDistribution, batch_size: int, batches: int, rng: np.random.Generator,
                  dataset_size: int | None = None) -> np.ndarray:
    """Labels ``[batches, B]`` of independent batches of B distinct images: i.i.d. from ``dist.probs``
    or, with ``dataset_size``, drawn without replacement from a dataset of that size."""
    if dataset_size is None:
        return rng.choice(len(dist.probs), size=(batches, batch_size), p=dist.probs)
    bounds = np.cumsum(dist.population(dataset_size))  # image i belongs to the class whose range holds it
    images = np.stack([rng.choice(dataset_size, batch_size, replace=False) for _ in range(batches)])
    return np.searchsorted(bounds, images, side="right")


def fn_fractions(labels: np.ndarray) -> np.ndarray:
    """Per-batch false-negative fraction of labels ``[batches, B]`` (the trainer's counting, chunked)."""
    rows = max(1, _CHUNK_LABELS // labels.shape[1])
    parts = [false_negative_fraction_all_pairs(torch.from_numpy(labels[i:i + rows]))
             for i in range(0, len(labels), rows)]
    return torch.cat(parts).numpy()


@dataclass
class FNResult:
    """One simulation: per-batch fractions and the exact expectation they estimate."""

    distribution: str
    n_classes: int
    sum_p2: float
    batch_size: int
    batches: int
    seed: int
    dataset_size: int | None
    analytic: float
    fractions: np.ndarray = field(repr=False)

    @property
    def n_view_pairs(self) -> int:
        return 2 * self.batch_size * (2 * self.batch_size - 1)

    @property
    def simulated_mean(self) -> float:
        return float(self.fractions.mean())

    @property
    def simulated_std(self) -> float:
        return float(self.fractions.std(ddof=1))

    @property
    def simulated_sem(self) -> float:
        return self.simulated_std / self.batches ** 0.5

    def to_dict(self) -> dict:
        """JSON-ready summary (fractions in [0, 1]; counts per batch of ``n_view_pairs`` ordered pairs)."""
        return {
            "distribution": self.distribution,
            "n_classes": self.n_classes,
            "sum_p2": self.sum_p2,
            "batch_size": self.batch_size,
            "batches": self.batches,
            "seed": self.seed,
            "dataset_size": self.dataset_size,
            "sampling": "iid" if self.dataset_size is None else "without-replacement",
            "n_view_pairs": self.n_view_pairs,
            "simulated_mean": self.simulated_mean,
            "simulated_std": self.simulated_std,
            "simulated_sem": self.simulated_sem,
            "analytic": self.analytic,
            "simulated_count_mean": self.simulated_mean * self.n_view_pairs,
            "analytic_count": self.analytic * self.n_view_pairs,
        }


def simulate(dist: ClassDistribution, batch_size: int = 128, batches: int = 1000, seed: int = 0,
             dataset_size: int | None = None) -> FNResult:
    """Sample ``batches`` batches of ``batch_size`` images from ``dist`` and measure their false-negative
    view-pair fractions (Appendix B); ``dataset_size`` draws each batch without replacement from a finite
    dataset of that many images instead of i.i.d."""
    check_params(batch_size, batches, dataset_size)
    labels = sample_labels(dist, batch_size, batches, np.random.default_rng(seed), dataset_size)
    return FNResult(dist.name, dist.n_classes, dist.sum_sq, batch_size, batches, seed, dataset_size,
                    expected_fn_fraction(dist, batch_size, dataset_size), fn_fractions(labels))


# ----------------------------------------------------------------------------------------------------
# command line


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raysys fn-sim``."""
    which = p.add_mutually_exclusive_group()
    which.add_argument("--classes", type=int, help="a balanced dataset with this many classes")
    which.add_argument("--distribution", help=f"class distribution: {_SPEC_HELP}")
    which.add_argument("--pool", action="append", metavar="NAME=COUNT",
                       help="repeatable: one finite pool with COUNT images of distribution NAME per --pool (their "
                            "classes disjoint); batches are drawn from it without replacement, e.g. "
                            "--pool msl-v2.1=6820 --pool uniform-1000=50000")
    p.add_argument("--mix", metavar="OTHER:RATIO",
                   help="take fraction RATIO of the images from distribution OTHER (disjoint classes), "
                        "e.g. uniform-1000:0.5")
    p.add_argument("--batch-size", type=int, default=128, help="images per batch (paper: 128)")
    p.add_argument("--batches", type=int, default=1000, help="batches to sample")
    p.add_argument("--dataset-size", type=int,
                   help="draw batches without replacement from a dataset of this many images "
                        "(default: i.i.d., an infinite dataset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object (fractions in [0, 1])")
    return p


def distribution_from_args(args: argparse.Namespace) -> tuple[ClassDistribution, int | None]:
    """The distribution ``--classes`` / ``--distribution`` / ``--pool`` and ``--mix`` describe, and the dataset
    size batches are drawn from (``--dataset-size``, or a pool's total; None: i.i.d.)."""
    if args.pool:
        if args.mix or args.dataset_size is not None:
            raise ConfigError("--pool sets the pool's sizes itself; drop --mix and --dataset-size, or pass one "
                              "more --pool NAME=COUNT instead of --mix")
        dist = pool([parse_pool_part(part) for part in args.pool])
        size = int(dist.counts.sum())
        if size < args.batch_size:
            raise ConfigError(f"the pool holds {size} images, fewer than one batch of {args.batch_size}; pass "
                              f"larger --pool counts or a smaller --batch-size")
        return dist, size
    if args.classes is None and args.distribution is None:
        raise ConfigError(f"pass --classes C, --distribution ({_SPEC_HELP}) or --pool NAME=COUNT")
    dist = uniform(args.classes) if args.classes is not None else parse_distribution(args.distribution)
    if args.mix:
        other, ratio = parse_mix(args.mix)
        dist = mix(dist, other, ratio)
    return dist, args.dataset_size


def _human(r: FNResult) -> str:
    sampling = ("i.i.d. (infinite dataset)" if r.dataset_size is None
                else f"without replacement from {r.dataset_size:,} images")
    return "\n".join([
        f"distribution   {r.distribution}: {r.n_classes} classes, sum p^2 = {r.sum_p2:.4f}",
        (f"batches        {r.batches} x {r.batch_size} images ({r.n_view_pairs:,} ordered view pairs each), "
         f"{sampling}, seed {r.seed}"),
        (f"false-negative view pairs: {100 * r.simulated_mean:.3f} % (std {100 * r.simulated_std:.3f} %, "
         f"s.e. {100 * r.simulated_sem:.3f} %)"),
        f"exact expectation:         {100 * r.analytic:.3f} %",
    ])


def run(args: argparse.Namespace) -> int:
    """``raysys fn-sim``: simulate and print the result (``--json``: one JSON object). Bad input raises
    :class:`ConfigError` (or :class:`raysys.errors.DataError` for an unreadable dataset folder) before
    sampling; :func:`raysys.errors.run_command` turns either into one line and exit code 2."""
    check_params(args.batch_size, args.batches, args.dataset_size)  # before any dataset folder is read
    dist, dataset_size = distribution_from_args(args)
    result = simulate(dist, args.batch_size, args.batches, args.seed, dataset_size)
    print(json.dumps(result.to_dict()) if args.json else _human(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m raysys.eval.fnsim ...``: the same as ``raysys fn-sim``; bad input prints one line, exit code 2."""
    parser = configure_parser(argparse.ArgumentParser(prog="raysys fn-sim", description=__doc__.splitlines()[0]))
    return run_command("raysys fn-sim", run, parser.parse_args(argv))


# ----------------------------------------------------------------------------------------------------
# the Fig. 6 grid and Table 2 column 2 (``experiments/fn_simulation.py``)

FIG6_DESCRIPTION = ("False-negative view pairs vs classes, batch size and dataset size (paper Appendix B, "
                    "Fig. 6), and Table 2's column 2.")
PAPER_BATCH_SIZE = 128  # the paper's (Appendix A); the batch size of every point that does not sweep it
TABLE2_DATASET_SIZE = 100_000  # "100K Curiosity", "100K ImageNet", "50K + 50K"
# (training set, distribution, mixed-in distribution and ratio, the paper's FN per batch in %)
TABLE2_ROWS = [
    ("100K Curiosity", "msl-v2.1", None, 15.0),
    ("100K ImageNet", "uniform-1000", None, 0.08),
    ("50K Curiosity + 50K ImageNet", "msl-v2.1", ("uniform-1000", 0.5), 0.30),
]
# The pooled reading of the 50/50 row: one pool of MSL v2.1's 6,820 labelled images and ImageNet's 50,000
# validation labels (50 per class), every batch drawn from it without replacement.
TABLE2_POOLED = ("Pooled labels: 6,820 MSL v2.1 + 50,000 ImageNet val", (("msl-v2.1", 6820), ("uniform-1000", 50_000)),
                 0.30)
REPRODUCES_WITHIN = 0.05  # relative difference to the paper's value that we call "reproduces"
_SEED_STRIDE = 100_000  # seeds of one run's points: seed * stride + point index (Table 2: + 90,000 + row)


def _row(result: FNResult, **extra) -> dict:
    return {**extra, **result.to_dict()}


def fig6_points(preset: dict) -> list[tuple[str, int, int, int | None]]:
    """The Fig. 6 points of a preset, in seed order: (panel, classes, batch size, dataset size or None)."""
    points = [("classes", c, PAPER_BATCH_SIZE, None) for c in preset["classes"]]
    points += [("batch_size", c, b, None) for c in preset["panel_classes"] for b in preset["batch_sizes"]]
    points += [("dataset_size", c, PAPER_BATCH_SIZE, d)
               for c in preset["panel_classes"] for d in preset["dataset_sizes"]]
    return points


def simulate_fig6(preset: dict, seed: int) -> dict[str, list[dict]]:
    """The three Fig. 6 panels (balanced datasets); every point has its own seed so their noise is independent."""
    panels: dict[str, list[dict]] = {"classes": [], "batch_size": [], "dataset_size": []}
    points = fig6_points(preset)
    for i, (panel, classes, batch_size, dataset_size) in enumerate(tqdm(points, desc="Fig. 6 points", unit="point")):
        result = simulate(uniform(classes), batch_size, preset["batches"], seed * _SEED_STRIDE + i, dataset_size)
        panels[panel].append(_row(result, classes=classes))
    return panels


def simulate_table2(batches: int, seed: int) -> list[dict]:
    """Table 2, column 2, each row drawn without replacement from a 100K-image training set, then the pooled
    reading of the mixed row (:data:`TABLE2_POOLED`), drawn from its own 56,820-image pool."""
    rows = []
    for i, (label, spec, mixed, paper) in enumerate(tqdm(TABLE2_ROWS, desc="Table 2 rows", unit="row")):
        dist = parse_distribution(spec)
        if mixed:
            dist = mix(dist, parse_distribution(mixed[0]), mixed[1])
        result = simulate(dist, PAPER_BATCH_SIZE, batches, seed * _SEED_STRIDE + 90_000 + i, TABLE2_DATASET_SIZE)
        rows.append(_row(result, training_set=label, paper_percent=paper,
                         analytic_iid=expected_fn_fraction(dist, PAPER_BATCH_SIZE)))
    label, parts, paper = TABLE2_POOLED
    dist = pool([(parse_distribution(spec), count) for spec, count in parts])
    size = int(dist.counts.sum())
    result = simulate(dist, PAPER_BATCH_SIZE, batches, seed * _SEED_STRIDE + 90_000 + len(rows), size)
    rows.append(_row(result, training_set=label, paper_percent=paper,
                     analytic_iid=expected_fn_fraction(dist, PAPER_BATCH_SIZE)))
    return rows


if __name__ == "__main__":
    sys.exit(main())
