"""Label-fraction experiment: stratified subsets hold the requested fraction per class (within one image) and
keep augmentation groups whole (hand-built labels and groups); the 100 % point equals a directly trained
probe; features are extracted once per encoder and benchmark; the smoke experiment writes a CSV that
matches probes recomputed from the cached features, a table and plots; bad input is one line."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO

from raysys.config import ConfigError
from raysys.data import sampling
from raysys.distributed import label_fraction as lf_experiment
from raysys.eval import label_fraction as lf
from raysys.eval import linear as ev
from raysys.eval.features import manifest_digest
from raysys.models import ContrastiveModel
from raysys.models.io import load_model, model_digest
from raysys.reporting import label_fraction as lf_files

torch.set_num_threads(1)

BUILTIN_SMOKE = REPO / "data" / "builtin" / "smoke"
GRID = [round(0.05 * i, 2) for i in range(1, 21)]


def singleton_groups(counts):
    labels = np.repeat(np.arange(len(counts)), counts)
    return labels, np.array([f"img{i}" for i in range(len(labels))])


def mixed_groups():
    """Class 0: 10 single images and 10 groups of 3 (40 images); class 1: 5 groups of 7 (an original and 6
    copies, HiRISE-style); class 2: 4 groups of 2."""
    labels, groups = [], []
    for label, sizes in ((0, [1] * 10 + [3] * 10), (1, [7] * 5), (2, [2] * 4)):
        for g, size in enumerate(sizes):
            labels += [label] * size
            groups += [f"c{label}g{g}"] * size
    order = np.random.default_rng(0).permutation(len(labels))  # rows of a group need not be adjacent
    return np.array(labels)[order], np.array(groups)[order]


@pytest.mark.parametrize("fraction", GRID)
def test_singleton_subsets_hold_the_fraction_per_class_within_one_image(fraction):
    counts = [40, 17, 3, 1]
    labels, groups = singleton_groups(counts)
    rows = sampling.stratified_subset(labels, groups, fraction, seed=7)
    assert len(set(rows.tolist())) == len(rows) and np.all(np.diff(rows) > 0)
    got = np.bincount(labels[rows], minlength=4)
    for c, n in enumerate(counts):
        assert abs(got[c] - fraction * n) <= 1, (c, got[c], fraction * n)
        assert got[c] >= 1, "every class keeps at least one image"
        if fraction * n >= 1:  # where the one-image minimum does not bind: the nearest whole count
            assert abs(got[c] - fraction * n) <= 0.5


@pytest.mark.parametrize("fraction", GRID)
@pytest.mark.parametrize("seed", [0, 1])
def test_groups_are_never_split_and_counts_are_the_nearest_the_sizes_allow(fraction, seed):
    labels, groups = mixed_groups()
    rows = sampling.stratified_subset(labels, groups, fraction, seed)
    chosen = set(rows.tolist())
    for g in set(groups.tolist()):
        members = set(np.flatnonzero(groups == g).tolist())
        assert members <= chosen or not members & chosen, f"group {g} split"
    got = np.bincount(labels[rows], minlength=3)
    assert abs(got[0] - fraction * 40) <= 0.5  # singletons left to fill: exact
    # only whole groups of 7 (and of 2): the nearest multiple, or one group where that would be none
    for c, size, n in ((1, 7, 35), (2, 2, 8)):
        assert got[c] % size == 0
        if fraction * n <= size / 2:
            assert got[c] == size, "every class keeps at least one group"
        else:
            assert abs(got[c] - fraction * n) <= size / 2


@pytest.mark.parametrize("fraction", GRID)
def test_count_is_the_nearest_any_choice_of_whole_groups_can_make(fraction):
    """Sizes 3 and 5 only (27 images): a greedy fill misses totals such as 8 = 3 + 5 after taking 3 + 3."""
    sizes = [3, 3, 3, 3, 5, 5, 5]
    labels = np.zeros(sum(sizes), np.int64)
    groups = np.repeat([f"g{i}" for i in range(len(sizes))], sizes)
    reachable = {3 * a + 5 * b for a, b in itertools.product(range(5), range(4))} - {0}
    target = fraction * 27
    expected = min(sorted(reachable), key=lambda t: abs(t - target))  # sorted: the smaller total on a tie
    assert len(sampling.stratified_subset(labels, groups, fraction, seed=2)) == expected


def test_subsets_depend_on_the_seed_only_and_full_fraction_is_everything():
    labels, groups = mixed_groups()
    a = sampling.stratified_subset(labels, groups, 0.5, seed=3)
    assert np.array_equal(a, sampling.stratified_subset(labels, groups, 0.5, seed=3))
    assert not np.array_equal(a, sampling.stratified_subset(labels, groups, 0.5, seed=4))
    assert sampling.stratified_subset(labels, groups, 1.0, seed=3).tolist() == list(range(len(labels)))


def test_a_group_with_two_classes_is_refused():
    with pytest.raises(ValueError, match="several classes"):
        sampling.stratified_subset(np.array([0, 1, 1]), np.array(["a", "a", "b"]), 0.5, 0)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5])
def test_fractions_outside_zero_one_and_missing_seeds_are_config_errors(bad):
    with pytest.raises(ConfigError, match="outside"):
        sampling.check_fractions([0.5, bad])
    with pytest.raises(ConfigError, match="at least 1 seed"):
        sampling.check_seeds(0)
    with pytest.raises(ConfigError, match="at least 1 seed"):
        sampling.check_seeds([])
    assert sampling.check_fractions([1, 0.5, 0.5]) == [0.5, 1.0]


def test_full_fraction_equals_a_directly_trained_probe_and_rows_count_subsets():
    rng = np.random.default_rng(0)
    labels, groups = mixed_groups()
    centres = rng.normal(size=(3, 5)) * 2
    train_x = (centres[labels] + rng.normal(size=(len(labels), 5))).astype(np.float32)
    test_y = rng.integers(0, 3, 40)
    test_x = (centres[test_y] + rng.normal(size=(40, 5))).astype(np.float32)
    rows = lf.fraction_curve(train_x, labels, groups, test_x, test_y, 3, fractions=[0.2, 1.0], seeds=[0, 5],
                             probe_epochs=15, progress=False)
    assert [(r["fraction"], r["seed"]) for r in rows] == [(0.2, 0), (0.2, 5), (1.0, 0), (1.0, 5)]
    for r in rows:
        assert r["n_train"] == len(sampling.stratified_subset(labels, groups, r["fraction"], r["seed"]))
    direct = ev.linear_probe(train_x, labels, test_x, test_y, 3, epochs=15, seed=5)
    assert rows[3]["accuracy"] == direct["accuracy"]
    assert rows[3]["balanced_accuracy"] == direct["balanced_accuracy"]


def test_plateau_is_where_the_mean_stays_within_one_point_of_full():
    curve = lambda accs: [{"fraction": f, "accuracy": a} for f, a in zip([0.2, 0.4, 0.6, 0.8, 1.0], accs)]
    assert lf_files.plateau_fraction(curve([0.5, 0.78, 0.795, 0.79, 0.80])) == 0.6
    assert lf_files.plateau_fraction(curve([0.80, 0.70, 0.80, 0.81, 0.80])) == 0.6  # the dip at 40 % counts
    assert lf_files.plateau_fraction(curve([0.9, 0.9, 0.9, 0.9, 0.8])) == 0.2  # above full counts as within
    assert lf_files.plateau_fraction(curve([0.1, 0.2, 0.3, 0.4, 0.8])) == 1.0


# ----------------------------------------------------------------------------- the experiment


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory) -> Path:
    if (BUILTIN_SMOKE / "msl-labeled-data-set-v2.1").is_dir():
        return BUILTIN_SMOKE  # read only: features are cached under the experiment's --out
    from raysys.data.simulate import simulate

    root = tmp_path_factory.mktemp("builtin")
    simulate(root, preset="smoke", progress=False)
    return root


def save_tiny_model(folder: Path) -> Path:
    """A tiny encoder in the trainer's model.pt format (model, model_spec, config)."""
    torch.manual_seed(1)
    model = ContrastiveModel("resnet18", 0.125, small_stem=True)
    folder.mkdir(parents=True)
    torch.save({"model": model.state_dict(), "model_spec": model.spec, "config": {"image_size": 16}},
               folder / "model.pt")
    return folder


def test_smoke_experiment_extracts_once_and_writes_results_that_match_recomputed_probes(
        smoke_root, tmp_path, monkeypatch, capsys):
    run_dir = save_tiny_model(tmp_path / "tiny-run")
    calls = []
    real = lf.benchmark_features

    def counting(model, manifest, image_size, **kw):
        calls.append((model_digest(model), manifest_digest(manifest), image_size))
        return real(model, manifest, image_size, **kw)

    monkeypatch.setattr(lf, "benchmark_features", counting)
    out = tmp_path / "out"
    assert lf_experiment.main(["--model", str(run_dir), "--preset", "smoke", "--data", str(smoke_root), "--out", str(out),
                    "--probe-epochs", "5"]) == 0
    assert "within 1 point from" in capsys.readouterr().out
    # two encoders (the model and its random-init twin) x two benchmarks, each embedded exactly once
    assert len(calls) == 4 and len(set(calls)) == 4
    assert len({c[0] for c in calls}) == 2 and {c[2] for c in calls} == {16}

    with open(out / lf_files.CSV_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == lf_files.CSV_COLUMNS
    keys = {(r["encoder"], r["benchmark"], float(r["fraction"]), int(r["seed"])) for r in rows}
    assert keys == {(e, b, f, s) for e in ("tiny-run", "random-init") for b in ("msl", "hirise")
                    for f in (0.1, 0.5, 1.0) for s in (0, 1)}

    # the 100 % rows equal a probe trained directly on the cached features of the whole train split
    model = load_model(run_dir)
    for benchmark, folder in (("msl", "msl-labeled-data-set-v2.1"), ("hirise", "hirise-map-proj-v3_2")):
        manifest, names = ev.load_benchmark(smoke_root / folder)
        data = real(model, manifest, 16, cache_dir=out / "feature-cache", progress=False)
        assert data["cache_hit"]
        direct = ev.linear_probe(data["train"]["x"], data["train"]["y"], data["test"]["x"], data["test"]["y"],
                                 len(names), epochs=5, seed=1)
        row = next(r for r in rows if (r["encoder"], r["benchmark"], r["fraction"], r["seed"])
                   == ("tiny-run", benchmark, "1.0", "1"))
        assert float(row["accuracy"]) == pytest.approx(direct["accuracy"])
        assert int(row["n_train"]) == len(data["train"]["y"])
        assert (out / f"label-fraction-{benchmark}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / lf_files.TABLE_FILE).read_text()
    assert "| msl | tiny-run | 10 % |" in table and "| hirise | majority class |" in table


@pytest.mark.parametrize("argv, word", [
    (["--fractions", "0", "1"], "outside (0, 1]"),
    (["--fractions", "1.2"], "outside (0, 1]"),
    (["--seeds", "0"], "at least 1 seed"),
    (["--model", "/nowhere/run"], "--model"),
])
def test_bad_input_exits_2_with_one_line(argv, word, tmp_path, capsys):
    assert lf_experiment.main([*argv, "--preset", "smoke", "--out", str(tmp_path / "out"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert word in err and "\n" not in err
    assert not (tmp_path / "out").exists()


def test_missing_model_is_a_config_error_naming_the_path(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        lf_experiment.run_experiment([str(tmp_path / "missing")], preset="smoke", data=str(tmp_path))
