"""The false-negative study end to end at smoke scale (paired arms on Ray Tune), and its step budget."""

import json
import runpy
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import REPO

from raysys.config import PretrainConfig, make_config
from raysys.config.schedule import Schedule
from raysys.distributed.sweep import main
from raysys.distributed.trainer import with_step_budget
from raysys.distributed.worker import lr_lambda
from raysys.reporting import results as report


def _scalars(tb_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_fn_study_smoke_pairs_its_arms(ray_session, tmp_path):
    """One row per arm, seed and evaluation step; the arms of a seed share initial weights, first batch and
    hence the step-0 score; the oracle's removed pairs are all true false negatives; the label-free detectors
    (ifnd, fnc) log their removed-pair precision and recall at every evaluation step, and ifnd exports the
    clusters it made, the confident half of the pool by its one clustering halfway through; the final probe is
    on the last step's row; the summary, plots, report and TensorBoard curves are written."""
    out = tmp_path / "study"
    script = runpy.run_path(str(REPO / "experiments" / "fn_study.py"), run_name="test")
    assert main("fn_study", "test", script["configure"],
                ["--preset", "smoke", "--out", str(out), "--arms", "eq2-printed", "ifnd", "fnc-attract"]) == 0
    rows = report.read_results_csv(out / "results.csv")
    arms, steps = ["eq2-printed", "fnc-attract", "ifnd", "simclr"], [0, 4, 8, 12]
    assert sorted((r["arm"], r["seed"], r["step"]) for r in rows) == [(a, 0, s) for a in arms for s in steps]
    assert all(0 <= r["knn_acc"] <= 1 and 0 <= r["knn_balanced_acc"] <= 1 for r in rows)
    for r in rows:
        assert (r["msl_acc"] is not None and r["msl_balanced_acc"] is not None) == (r["step"] == 12)
    by = {(r["arm"], r["step"]): r for r in rows}
    assert len({by[(a, 0)]["knn_acc"] for a in arms}) == 1, "same weights, same images: same step-0 score"
    assert by[("eq2-printed", 4)]["removed_pair_precision"] == 1.0 and by[("eq2-printed", 4)]["decoupled"] == "True"
    for step in (4, 8, 12):  # fnc detects from the first step; ifnd after its warm-up epoch (8 steps)
        for arm in ("fnc-attract",) + (("ifnd",) if step == 12 else ()):
            assert 0 <= by[(arm, step)]["removed_pair_precision"] <= 1 and 0 <= by[(arm, step)]["removed_pair_recall"] <= 1
    assert by[("simclr", 4)]["removed_pair_precision"] is None and by[("simclr", 4)]["loss"] > 0

    clusters = pq.read_table(out / "trials" / "ifnd-s0" / "clusters.parquet").column("cluster_id").to_numpy()
    assert abs((clusters >= 0).sum() - len(clusters) / 2) <= 1 and clusters.max() <= 3  # half of the pool, K=4
    curves = {a: json.loads((out / "trials" / f"{a}-s0" / "curve.json").read_text()) for a in arms}
    assert len({c["init_weights_sha256"] for c in curves.values()}) == 1
    first = {tuple(c["first_batch_image_ids"]) for c in curves.values()}
    assert len(first) == 1 and len(next(iter(first))) == 64
    assert [s for s, _ in _scalars(out / "trials" / "simclr-s0" / "tb", "study/knn_acc")] == steps

    summary = (out / "summary.md").read_text()
    assert "| eq2-printed | cluster rule, oracle clusters, decoupled | 1 | 12 |" in summary
    assert "paired gap" in summary and "**ifnd**" in summary
    assert "| fnc-attract | fnc rule: each anchor's most similar images of the batch, attracted as positives," in summary
    for name in ("fn_study-knn_acc.png", "fn_study-knn_balanced_acc.png", "fn_study-removed-pairs.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "Every arm, seed and evaluation step" in (out / "report.html").read_text()


def test_step_budget_sets_the_epochs_and_the_schedule_length():
    """600 steps of a 2,048-image pool at batch 128 (16 steps an epoch) need 38 epochs; cosine ends at step 600."""
    cfg = with_step_budget(make_config("demo", max_steps=600, batch_size=128, schedule="cosine", warmup_epochs=0), 2048)
    assert cfg.epochs == 38
    factor = lr_lambda(cfg, Schedule.of(cfg, 2048))
    assert factor(0) == 1.0 and factor(300) == pytest.approx(0.5) and factor(600) == pytest.approx(0.0, abs=1e-12)
    assert with_step_budget(make_config("demo"), 2048).epochs == 15  # no budget: the epochs decide


@pytest.mark.parametrize("script", ["sweep_k", "fn_precision"])
def test_decoupled_reading_reaches_every_trial_and_its_name(script, tmp_path):
    """--decoupled (the printed Eq. 2 / DCL reading) is a sweep option: in every trial's config and name."""
    import argparse

    from raysys.config.presets import SWEEP_PRESETS
    from raysys.distributed.sweep import add_sweep_arguments, spec_from_args, trial_config, trial_name

    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    build = runpy.run_path(str(REPO / "experiments" / f"{script}.py"), run_name="test")["configure"](parser)
    args = parser.parse_args(["--preset", "smoke", "--out", str(tmp_path), "--decoupled", "--no-supervised"])
    spec = spec_from_args(script, args, **build(args, SWEEP_PRESETS["smoke"]))
    for params in spec.grid():
        assert trial_config(spec, {**params, "seed": 0}).decoupled is True
        assert "-dcl-" in trial_name({**params, "seed": 0})


@pytest.mark.parametrize("given,expected", [([], 600), (["--epochs", "2"], None)])
def test_k_sweep_runs_at_the_studys_budget_unless_given_epochs(given, expected, tmp_path):
    """The K sweep's demo default is the study's 600 steps, where oracle elimination separated; --epochs (the
    Quickstart's 2) keeps an epoch count instead. The other sweeps keep the preset's epochs."""
    import argparse

    from raysys.config.presets import FN_STUDY_PRESETS, SWEEP_PRESETS
    from raysys.distributed.sweep import add_sweep_arguments, spec_from_args, trial_config

    def spec(script, argv):
        parser = argparse.ArgumentParser()
        add_sweep_arguments(parser)
        build = runpy.run_path(str(REPO / "experiments" / f"{script}.py"), run_name="test")["configure"](parser)
        args = parser.parse_args(["--out", str(tmp_path), *argv])
        return spec_from_args(script, args, **build(args, SWEEP_PRESETS["demo"]))

    k_sweep = spec("sweep_k", given)
    assert SWEEP_PRESETS["demo"]["k_steps"] == FN_STUDY_PRESETS["demo"]["steps"] == 600
    assert {trial_config(k_sweep, {**v, "seed": 0}).max_steps for v in k_sweep.grid()} == {expected}
    assert PretrainConfig.from_dict(spec("sweep_temperature", []).base).max_steps is None
    # The untrained encoder is the demo K sweep's reference line unless declined.
    assert [v["method"] for v in k_sweep.variants] == ["baseline", "cluster", "random-init"]
    assert "random-init" not in [v["method"] for v in spec("sweep_k", [*given, "--no-random-init"]).variants]
