"""Appendix B false-negative simulation: counts against the trainer's pair matrix and brute force, the exact
expectations against full enumeration, simulated means against the paper's settings, the CLI and the
experiment script's smoke preset."""

import argparse
import importlib.util
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO
from PIL import Image

from raysys.config.presets import FN_SIMULATION_PRESETS
from raysys.errors import ConfigError, run_command
from raysys.eval import fnsim
from raysys.methods.pairs import InstanceRule

# MSL v2.1 train column of /work/shared/facts/mars-datasets.md, copied here as an independent reference.
MSL_TRAIN_FACTS = [10, 190, 680, 1554, 1422, 8, 214, 342, 252, 40, 152, 182, 42, 122, 228, 182, 212, 62, 26]


def _brute_count(labels) -> int:
    """Ordered view pairs (i, j), i != j, of different images with equal labels; view v shows image v % B."""
    b = len(labels)
    return sum(1 for i in range(2 * b) for j in range(2 * b)
               if i != j and i % b != j % b and labels[i % b] == labels[j % b])


def _instance_rule_count(labels: torch.Tensor) -> int:
    """The trainer's way: negatives of the SimCLR pair matrix whose labels agree."""
    pm = InstanceRule()({"image_id": torch.arange(len(labels))})
    view_labels = labels.repeat(2)
    return int((pm.neg & (view_labels[:, None] == view_labels[None, :])).sum())


def _counts(fractions: np.ndarray, b: int) -> list[int]:
    return [round(f * 2 * b * (2 * b - 1)) for f in fractions]


# ---------------------------------------------------------------------------------------- counting


@pytest.mark.parametrize("dataset_size", [None, 30])
def test_fast_count_equals_instance_rule_and_brute_force(dataset_size):
    b = 6
    labels = fnsim.sample_labels(fnsim.uniform(3), b, 40, np.random.default_rng(1), dataset_size)
    fast = _counts(fnsim.fn_fractions(labels), b)
    rule = [_instance_rule_count(torch.from_numpy(row)) for row in labels]
    assert fast == rule == [_brute_count(list(row)) for row in labels]
    assert len(set(fast)) > 3  # the batches differ, so the check is not vacuous


def test_whole_dataset_batch_is_deterministic():
    # N = B: every batch is the whole dataset, so every batch has exactly 4 * sum K (K - 1) false negatives.
    dist = fnsim.from_counts([5, 2, 1], "tiny")
    r = fnsim.simulate(dist, batch_size=8, batches=20, seed=3, dataset_size=8)
    assert _counts(r.fractions, 8) == [4 * (5 * 4 + 2 * 1)] * 20
    assert r.simulated_std == pytest.approx(0.0, abs=1e-12)
    assert r.analytic == pytest.approx(4 * 22 / (16 * 15))


def test_without_replacement_never_exceeds_class_sizes():
    dist = fnsim.from_counts([3, 3, 3, 3], "four")
    labels = fnsim.sample_labels(dist, 8, 200, np.random.default_rng(0), dataset_size=12)
    per_class = np.stack([(labels == c).sum(1) for c in range(4)], 1)
    assert per_class.max() == 3 and (per_class.sum(1) == 8).all()


# ----------------------------------------------------------------------------------- expectations


def test_iid_expectation_equals_full_enumeration():
    p = np.array([0.5, 0.3, 0.2])
    b = 3
    exact = sum(np.prod(p[list(lab)]) * _brute_count(lab) for lab in itertools.product(range(3), repeat=b))
    dist = fnsim.ClassDistribution("p", p)
    assert fnsim.expected_fn_fraction(dist, b) == pytest.approx(exact / (2 * b * (2 * b - 1)))
    assert dist.sum_sq == pytest.approx(0.38)


def test_hypergeometric_expectation_equals_full_enumeration():
    dist = fnsim.from_counts([3, 2, 1], "k")
    images = [0, 0, 0, 1, 1, 2]  # the label of each of the N = 6 images
    b = 3
    draws = list(itertools.permutations(range(6), b))
    exact = sum(_brute_count([images[i] for i in d]) for d in draws) / len(draws)
    assert fnsim.expected_fn_fraction(dist, b, dataset_size=6) == pytest.approx(exact / (2 * b * (2 * b - 1)))
    assert fnsim.pair_share(dist, 6) == pytest.approx((3 * 2 + 2 * 1) / 30)


def test_uniform_formula_and_balanced_finite_formula():
    assert fnsim.expected_fn_fraction(fnsim.uniform(10), 128) == pytest.approx(2 * 127 / 255 / 10)
    # A balanced dataset of N images and C classes: q = (N - C) / (C (N - 1)).
    assert fnsim.pair_share(fnsim.uniform(10), 1000) == pytest.approx(990 / (10 * 999))


def test_population_keeps_source_counts_and_rounds_by_largest_remainder():
    msl = fnsim.msl_v21_train()
    assert msl.population(5920).tolist() == MSL_TRAIN_FACTS
    assert fnsim.ClassDistribution("p", np.array([0.45, 0.35, 0.2])).population(10).tolist() == [5, 3, 2]
    assert fnsim.uniform(1000).population(128).sum() == 128


# ------------------------------------------------------------------------------ paper's settings


def test_uniform_10_classes_is_ten_percent():
    r = fnsim.simulate(fnsim.uniform(10), batch_size=128, batches=1000, seed=0)
    assert abs(r.simulated_mean - 0.100) <= 0.003
    assert r.analytic == pytest.approx(0.0996, abs=1e-4)


def test_msl_distribution_matches_facts_and_gives_15_3_percent():
    msl = fnsim.msl_v21_train()
    assert msl.counts.tolist() == MSL_TRAIN_FACTS and msl.n_classes == 19
    assert round(msl.sum_sq, 4) == 0.1533
    r = fnsim.simulate(msl, batch_size=128, batches=1000, seed=0)
    assert abs(r.simulated_mean - 0.153) <= 0.005


def test_mix_is_disjoint_and_weighted():
    msl, imnet = fnsim.msl_v21_train(), fnsim.uniform(1000)
    m = fnsim.mix(msl, imnet, 0.5)
    assert m.n_classes == 1019 and m.probs.sum() == pytest.approx(1.0)
    assert m.sum_sq == pytest.approx(0.25 * msl.sum_sq + 0.25 * 0.001)
    assert fnsim.expected_fn_fraction(m, 128) == pytest.approx(0.0384, abs=1e-4)
    assert fnsim.mix(msl, imnet, 0.0).sum_sq == pytest.approx(msl.sum_sq)


def test_pool_holds_each_part_at_its_size_and_its_expectation_is_hypergeometric():
    pooled = fnsim.pool([(fnsim.msl_v21_train(), 6820), (fnsim.uniform(1000), 50_000)])
    counts = pooled.counts
    assert pooled.name == "msl-v2.1=6820+uniform-1000=50000" and pooled.n_classes == 1019
    assert counts[:19].sum() == 6820 and counts[19:].tolist() == [50] * 1000
    n = 56_820
    q = sum(k * (k - 1) for k in counts.tolist()) / (n * (n - 1))  # two distinct images of the pool share a class
    assert fnsim.expected_fn_fraction(pooled, 128, n) == pytest.approx(2 * 127 * q / 255, rel=1e-12)
    assert 0.0025 <= fnsim.expected_fn_fraction(pooled, 128, n) <= 0.0035  # the paper's 0.30 %


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _image(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), 128).save(path)


def make_tiny_msl(root: Path) -> Path:
    """An MSL v2.1 tree with 3 classes: train 4/2/1 images (one train row repeated), val and test all class 2."""
    ds = root / "msl-labeled-data-set-v2.1"
    ds.mkdir(parents=True)
    (ds / "class_map.csv").write_text("0,Arm cover\n1,Other rover part\n2,Artifact\n")
    splits = {"train": [0, 0, 0, 0, 1, 1, 2], "val": [2] * 5, "test": [2] * 6}
    for split, labels in splits.items():
        lines = []
        for i, label in enumerate(labels):
            name = f"{1000 * (list(splits).index(split) + 1) + i:04d}MR0001830110101823Q01_DRCL.jpg"
            _image(ds / "images" / name)
            lines.append(f"{name} {label}")
        if split == "train":
            lines.append(lines[0])  # a repeated row is one image
        (ds / f"{split}-set-v2.1.txt").write_text("\n".join(lines) + "\n")
    return ds


def test_manifest_distribution_counts_distinct_train_images(tmp_path):
    dist = fnsim.parse_distribution(str(make_tiny_msl(tmp_path)))
    assert dist.counts.tolist() == [4, 2, 1] and "train split" in dist.name


def test_imagefolder_and_unlabelled_folder(tmp_path):
    for cls, n in (("a", 3), ("b", 1)):
        for i in range(n):
            _image(tmp_path / "classes" / cls / f"{i}.png")
    assert fnsim.from_manifest(tmp_path / "classes").counts.tolist() == [3, 1]
    _image(tmp_path / "plain" / "x.png")
    with pytest.raises(ConfigError, match="no labelled images"):
        fnsim.from_manifest(tmp_path / "plain")


def test_csv_distribution_with_and_without_header(tmp_path):
    a = fnsim.parse_distribution(str(_write_csv(tmp_path / "a.csv", "class,count\nrock,30\nsand,10\n\n")))
    b = fnsim.parse_distribution(str(_write_csv(tmp_path / "b.csv", "rock, 30\nsand,10\nsky,0\n")))
    assert a.counts.tolist() == [30, 10] and b.counts.tolist() == [30, 10, 0]
    assert a.sum_sq == b.sum_sq == pytest.approx(0.75 ** 2 + 0.25 ** 2)


def _every_distribution(tmp_path):
    csv_path = _write_csv(tmp_path / "d.csv", "class,count\nrock,50\nsand,30\nsky,15\nwheel,5\n")
    msl_dir = make_tiny_msl(tmp_path)
    msl, imnet = fnsim.msl_v21_train(), fnsim.uniform(1000)
    return [
        (fnsim.uniform(7), None), (msl, None), (imnet, None), (fnsim.mix(msl, imnet, 0.5), None),
        (fnsim.mix(fnsim.uniform(5), msl, 0.2), None), (fnsim.parse_distribution(str(csv_path)), None),
        (fnsim.parse_distribution(str(msl_dir)), None), (msl, 300), (fnsim.mix(msl, imnet, 0.5), 100_000),
        (fnsim.uniform(100), 1000),
    ]


def test_simulated_within_three_standard_errors_of_exact(tmp_path):
    for i, (dist, n) in enumerate(_every_distribution(tmp_path)):
        b = 6 if dist.name.endswith("(train split)") else 128  # the tiny MSL folder has 7 train images
        r = fnsim.simulate(dist, batch_size=b, batches=1000, seed=10 + i, dataset_size=n and max(n, b))
        assert r.simulated_sem > 0
        z = (r.simulated_mean - r.analytic) / r.simulated_sem
        assert abs(z) < 3, (dist.name, n, r.simulated_mean, r.analytic, z)


# ---------------------------------------------------------------------------------- command line


def _args(*argv):
    return fnsim.configure_parser(argparse.ArgumentParser()).parse_args(list(argv))


def test_json_output_round_trips(capsys):
    assert fnsim.main(["--distribution", "msl-v2.1", "--mix", "uniform-1000:0.5", "--batches", "200",
                       "--seed", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["distribution"] == "msl-v2.1+uniform-1000:0.5" and out["batches"] == 200 and out["batch_size"] == 128
    for key in ("simulated_mean", "simulated_std", "analytic", "simulated_sem"):
        assert 0.0 <= out[key] <= 1.0
    assert out["analytic"] == pytest.approx(0.0384, abs=1e-4)
    assert out["simulated_sem"] == pytest.approx(out["simulated_std"] / math.sqrt(200))
    assert out["analytic_count"] == pytest.approx(4 * 128 * 127 * out["sum_p2"])


def test_pool_json_draws_from_the_pool_without_replacement(capsys):
    assert fnsim.main(["--pool", "msl-v2.1=6820", "--pool", "uniform-1000=50000", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["sampling"] == "without-replacement" and out["dataset_size"] == 56_820
    assert 0.0025 <= out["simulated_mean"] <= 0.0035 and 0.0025 <= out["analytic"] <= 0.0035
    assert abs(out["simulated_mean"] - out["analytic"]) < 4 * out["simulated_sem"]


def test_run_human_output_in_percent(capsys):
    assert fnsim.run(_args("--classes", "10", "--batches", "50", "--dataset-size", "5000")) == 0
    text = capsys.readouterr().out
    assert "9.9" in text and "%" in text and "5,000 images" in text


@pytest.mark.parametrize("argv, fragment", [
    (["--classes", "0"], "number of classes"),
    (["--classes", "10", "--mix", "uniform-1000:1.5"], "[0, 1]"),
    (["--classes", "10", "--mix", "uniform-1000"], "OTHER:RATIO"),
    (["--classes", "10", "--mix", "uniform-1000:half"], "OTHER:RATIO"),
    (["--distribution", "imagenet"], "unknown distribution"),
    (["--distribution", "msl-v2.1", "--batch-size", "1"], "--batch-size"),
    (["--distribution", "msl-v2.1", "--batches", "1"], "--batches"),
    (["--distribution", "msl-v2.1", "--dataset-size", "100"], "--dataset-size"),
    ([], "pass --classes C"),
    (["--pool", "msl-v2.1"], "NAME=COUNT"),
    (["--pool", "msl-v2.1=0"], "NAME=COUNT"),
    (["--pool", "imagenet=10"], "unknown distribution"),
    (["--pool", "msl-v2.1=6820", "--mix", "uniform-1000:0.5"], "drop --mix"),
    (["--pool", "msl-v2.1=100"], "fewer than one batch"),
])
def test_bad_input_raises_config_error(argv, fragment):
    with pytest.raises(ConfigError) as err:
        fnsim.run(_args(*argv))
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("text", ["rock,-3\n", "rock,2.5\n", "rock,many\n", "rock,3,4\n", "rock,0\n",
                                  "class,count\n", "rock,3\nrock,4\n"])
def test_bad_csv_raises_config_error(tmp_path, text, capsys):
    path = _write_csv(tmp_path / "bad.csv", text)
    with pytest.raises(ConfigError):
        fnsim.run(_args("--distribution", str(path)))
    assert fnsim.main(["--distribution", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysys fn-sim: error:") and err.count("\n") == 1


# ------------------------------------------------------------------------------ experiment script


def _experiment_script():
    """experiments/fn_simulation.py as a module (its ``main`` is :func:`fnsim.fig6_main`)."""
    spec = importlib.util.spec_from_file_location("fn_simulation", REPO / "experiments" / "fn_simulation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_experiment_smoke_preset_writes_its_files(tmp_path):
    module = _experiment_script()
    assert module.main(["--preset", "smoke", "--out", str(tmp_path)]) == 0
    for name in ("fn_vs_classes.png", "fn_vs_batch_size.png", "fn_vs_dataset_size.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((tmp_path / "results.json").read_text())
    smoke = FN_SIMULATION_PRESETS["smoke"]
    assert [r["classes"] for r in results["panels"]["classes"]] == smoke["classes"]
    assert len(results["panels"]["batch_size"]) == len(smoke["batch_sizes"]) * len(smoke["panel_classes"])
    assert len(results["panels"]["dataset_size"]) == len(smoke["dataset_sizes"]) * len(smoke["panel_classes"])
    msl, _imnet, mixed, pooled = results["table2"]
    assert msl["analytic_iid"] == pytest.approx(0.1527, abs=1e-4)
    assert mixed["analytic_iid"] == pytest.approx(0.0384, abs=1e-4)
    assert pooled["dataset_size"] == 56_820 and 0.0025 <= pooled["analytic"] <= 0.0035
    md = (tmp_path / "fn-simulation.md").read_text()
    assert "Table 2, column 2" in md and "What reproduces" in md
    assert f"{100 * msl['simulated_mean']:.3f}" in md and f"{100 * mixed['simulated_mean']:.3f}" in md


def test_experiment_bad_batches_is_one_line_before_any_file(tmp_path, capsys):
    module = _experiment_script()
    assert module.main(["--preset", "smoke", "--batches", "1", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "error: --batches must be at least 2" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_entry_turns_config_error_into_one_line(capsys):
    assert run_command("raysys fn-sim", fnsim.run, _args("--classes", "0")) == 2
    err = capsys.readouterr().err
    assert err.startswith("raysys fn-sim: error: number of classes") and err.count("\n") == 1
