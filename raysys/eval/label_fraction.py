"""Label efficiency (the paper's Fig. 4): linear-probe accuracy vs the fraction of labeled train data used.

For each encoder and benchmark the frozen features of every split are extracted once
(:func:`raysys.eval.features.benchmark_features`, cached) and reused for every fraction and seed; only the
probe is refitted, on a stratified subset of the train split, and scored on the full test split.

How a subset is drawn: :mod:`raysys.data.sampling`.

Every probe gets about the same number of optimisation steps: ``probe_epochs`` counts passes over the
full train split and a subset trains as many epochs as take the same number of batches, so small
fractions are not also under-trained. The plateau marked in the plots is the smallest fraction from which the mean
accuracy stays within one point of the full-label (largest-fraction) mean.

Files: :mod:`raysys.reporting.label_fraction`; the experiment (``experiments/label_fraction.py``):
:mod:`raysys.distributed.label_fraction`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from raysys.config.presets import DEFAULT_FRACTIONS
from raysys.data.sampling import check_fractions, check_seeds, stratified_subset
from raysys.errors import ConfigError, DataError, ModelFileError
from raysys.eval.features import benchmark_features
from raysys.eval.linear import (
    PROBE_BATCH_SIZE,
    PROBE_LR,
    linear_probe,
    load_benchmark,
    majority_baseline,
)
from raysys.models import ContrastiveModel
from raysys.models.io import load_saved

# ----------------------------------------------------------------------------- probes


def fraction_curve(
    train_x, train_y, train_groups, test_x, test_y, num_classes: int, fractions=DEFAULT_FRACTIONS, seeds=3,
    probe_epochs: int = 100, hidden: int = 0, lr: float = PROBE_LR, batch_size: int = PROBE_BATCH_SIZE,
    progress: bool = True, desc: str = "fractions",
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
            metrics = linear_probe(train_x[subset], train_y[subset], test_x, test_y, num_classes, hidden=hidden,
                                   epochs=epochs, lr=lr, batch_size=batch_size, seed=seed)
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
        raise DataError(f"benchmark {benchmark_root}: no train or no test image could be decoded")
    group_of = dict(zip(manifest.column("image_id").to_pylist(), manifest.column("group_id").to_pylist()))
    groups = np.asarray([group_of[i] for i in train["image_id"].tolist()])
    rows = fraction_curve(train["x"], train["y"], groups, test["x"], test["y"], len(names), fractions, seeds,
                          probe_epochs, hidden, progress=progress, desc=desc)
    return {"rows": rows, "majority": majority_baseline(train["y"], test["y"], len(names)),
            "n_train_full": int(len(train["y"])), "skipped": data["skipped"]}


# ----------------------------------------------------------------------------- encoders


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


def load_encoders(model_paths: list[str], default_size: int) -> list[tuple[str, object, int]]:
    """``(name, model, image_size)`` for each saved model, then a random-init model per distinct spec."""
    encoders = []
    for name, path in zip(encoder_names(model_paths), model_paths):
        try:
            model, config = load_saved(path)
        except ModelFileError as exc:
            raise ConfigError(f"--model: {exc}") from None
        encoders.append((name, model, int(config.get("image_size") or default_size)))
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


