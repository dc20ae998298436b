"""The mixed-domain, temperature and method-comparison sweep scripts at smoke scale, in this process's Ray."""

import json
import os
import runpy
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import REPO

from raysys.distributed.sweep import PRETEXT_METHODS, main
from raysys.models.io import load_saved
from raysys.reporting import results as report


def _run_script(name: str, out: Path, *args: str) -> int:
    script = runpy.run_path(str(REPO / "experiments" / f"{name}.py"), run_name="test")
    return main(name, "test", script["configure"], ["--preset", "smoke", "--out", str(out), *args])


def _run_as_job(ray_session, name: str, out: Path, *args: str) -> str:
    """Run a sweep script as ``ray job submit`` runs it: its own process, joining this session's Ray; return what
    it printed (stdout and stderr together)."""
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "experiments" / f"{name}.py"), "--preset", "smoke", "--out", str(out),
                           *args], env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout
    return proc.stdout


def _rows(out: Path) -> dict:
    return {r["trial"]: r for r in report.read_results_csv(out / "results.csv")}


def _knn_by_epoch(tb_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [event.value for event in acc.Scalars("train/knn_acc")]


def _assert_plots(out: Path, name: str) -> None:
    for bench in ("msl", "hirise"):
        assert (out / f"{name}-{bench}.png").read_bytes()[:4] == b"\x89PNG"


def _spec(script: str, tmp_path: Path, *argv: str):
    """The sweep a script declares for ``argv`` at smoke scale, built as its ``main`` builds it, run nowhere."""
    import argparse

    from raysys.config.presets import SWEEP_PRESETS
    from raysys.distributed.sweep import add_sweep_arguments, spec_from_args

    parser = argparse.ArgumentParser()
    add_sweep_arguments(parser)
    build = runpy.run_path(str(REPO / "experiments" / f"{script}.py"), run_name="test")["configure"](parser)
    args = parser.parse_args(["--preset", "smoke", "--out", str(tmp_path / script), *argv])
    return spec_from_args(script, args, **build(args, SWEEP_PRESETS["smoke"]))


def _configs(spec) -> dict:
    from raysys.distributed.sweep import trial_config, trial_name

    return {trial_name({**p, "seed": 0}): trial_config(spec, {**p, "seed": 0}) for p in spec.grid()}


COMPARED = ["baseline", "mixed", "cluster", "fnc", "rotation", "random-init"]


@pytest.fixture(scope="module")
def comparison(ray_session, tmp_path_factory):
    """One comparison of a method of every kind the script compares: the paper's three (cluster-aware with oracle
    clusters), fnc, a pretext task (the others differ only in their objective and head, each trained one step and
    saved in tests/methods/test_pretext.py), the untrained encoder and supervised training from scratch."""
    out = tmp_path_factory.mktemp("compare") / "compare"
    assert _run_script("compare_methods", out, "--methods", *COMPARED, "--encoder", "oracle", "--k", "5",
                       "--fine-tune-epochs", "1") == 0
    return out


def test_compare_methods_table_and_bars(comparison):
    out = comparison
    rows = {r["method"]: r for r in _rows(out).values()}
    assert sorted(rows) == sorted([*COMPARED, "supervised"])
    summary = (out / "summary.md").read_text()
    for label in ("| baseline | SimCLR | instance |", "| mixed r=0.5 | SimCLR | instance |",
                  "| cluster K=5 | SimCLR | cluster |", "| fnc | SimCLR | fnc |", "| supervised, from scratch | – | – |"):
        assert label in summary
    assert "FN pairs per batch %" in summary and "MSL fine-tuned %" in summary and "pretext task acc %" in summary
    for method, row in rows.items():  # every encoder linear-evaluated on both benchmarks; fine-tuned if pretrained
        assert row["msl_acc"] is not None and row["hirise_balanced_acc"] is not None
        tuned = method not in ("supervised", "random-init")
        assert (row["msl_ft_acc"] is not None) == tuned and (row["hirise_ft_acc"] is not None) == tuned, method
        assert (row["pretext_accuracy"] is not None) == (method == "rotation")
        if method in ("supervised", "random-init"):
            continue
        config = json.loads((out / "trials" / row["trial"] / "config.json").read_text())
        framework, rule = ("rotation", "instance") if method == "rotation" else ("simclr", {"cluster": "cluster", "fnc": "fnc"}.get(method, "instance"))
        assert (config["framework"], config["pair_rule"]) == (framework, rule)
        spec = load_saved(out / "trials" / row["trial"])[0].spec  # the task head saved with the model
        assert (spec.get("head") is not None) == (method == "rotation")
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 2
    _assert_plots(out, "compare_methods")


def test_mixed_domain_lowers_false_negatives_as_its_pool_predicts(comparison):
    """Out-of-domain images share no class with the rover's: the mixed trial's false-negative fraction is the
    same-class share of its own mixed pool (read back, out-of-domain classes offset), within four standard
    errors of a mean over the last epoch's batches, and below the baseline's."""
    from helpers import batch_mean_tolerance, same_class_share

    from raysys.config import PretrainConfig
    from raysys.data.sources import resolve_data

    rows = {r["method"]: r for r in _rows(comparison).values()}
    cfg = PretrainConfig.from_dict(json.loads((comparison / "trials" / rows["mixed"]["trial"] / "config.json").read_text()))
    assert cfg.mix_ratio == 0.5 and cfg.max_images == 384
    labels = resolve_data(cfg)[0].column("label").to_numpy()
    expected, batches = same_class_share(labels), len(labels) // cfg.batch_size
    assert abs(rows["mixed"]["fn_fraction"] - expected) < batch_mean_tolerance(labels, cfg.batch_size, batches)
    assert rows["mixed"]["fn_fraction"] < rows["baseline"]["fn_fraction"]


def test_every_method_the_script_can_compare_is_declared_with_its_recipe(tmp_path):
    """MoCo v2 at temperature 0.2 and every pretext task without a pair rule, as compare_methods declares them
    (trained end to end in test_ess_*, test_store_lost_* and the comparison above)."""
    configs = _configs(_spec("compare_methods", tmp_path, "--methods", "moco", *PRETEXT_METHODS, "--no-supervised"))
    assert sorted(configs) == sorted(["moco-t0.2-s0", *(f"{m}-s0" for m in PRETEXT_METHODS)])
    assert (configs["moco-t0.2-s0"].framework, configs["moco-t0.2-s0"].temperature) == ("moco", 0.2)
    for method in PRETEXT_METHODS:
        assert (configs[f"{method}-s0"].framework, configs[f"{method}-s0"].pair_rule) == (method, "instance")


@pytest.mark.parametrize("script,argv,param,trials", [
    ("sweep_temperature", ["--temperatures", "0.2", "1.0"], "temperature", {"baseline-t0.2-s0": 0.2, "baseline-t1-s0": 1.0}),
    ("sweep_mix_ratio", [], "mix_ratio", {"mixed-r0-t0.5-s0": 0.0, "mixed-r1-t0.5-s0": 1.0}),
])
def test_parameter_sweeps_declare_their_grid_and_group_by_it(script, argv, param, trials, tmp_path):
    """The temperature and mixed-domain sweeps are the K sweep's machinery (run end to end in test_sweep.py) over
    another parameter: their trials carry it, and the summary and plots group by it. The rows are written here,
    with hand-set accuracies, so the table's values are known."""
    from raysys.distributed.sweep_summary import write_summary

    spec = _spec(script, tmp_path, *argv, "--no-supervised")
    configs = _configs(spec)
    assert {name: getattr(cfg, param) for name, cfg in configs.items()} == trials
    assert {cfg.max_images for cfg in configs.values()} == ({384} if script == "sweep_mix_ratio" else {512})
    rows = [{"trial": name, "method": name.split("-")[0], "seed": 0,
             "framework": "simclr", "pair_rule": "instance", "temperature": cfg.temperature, "mix_ratio": cfg.mix_ratio,
             "k": 0, "msl_acc": 0.25 + 0.5 * i, "msl_balanced_acc": 0.2, "hirise_acc": 0.5, "hirise_balanced_acc": 0.3}
            for i, (name, cfg) in enumerate(configs.items())]
    Path(spec.out).mkdir(parents=True)
    write_summary(spec, rows, [])
    summary = (Path(spec.out) / "summary.md").read_text()
    for row, value in zip(rows, trials.values()):  # one line per value, its trial's accuracy in it
        assert f"| {row['method']} | SimCLR | instance | {value:g} | 1 | {100 * row['msl_acc']:.1f} |" in summary, summary
    _assert_plots(Path(spec.out), script)


def test_fn_precision_noisy_oracle_removes_pairs_at_the_base_rate(ray_session, tmp_path):
    """At a study's step budget (--steps): noise 1 removes pairs at about the base rate of same-class pairs (the
    baseline's false-negative fraction), far below 1; each trial's last evaluation point is in its row and
    plotted. (Noise 0, the clean oracle, removes exactly the false negatives: test_oracle_clusters_* in
    test_sweep.py.)"""
    out = tmp_path / "fnp"
    assert _run_script("fn_precision", out, "--noise", "1", "--modes", "eliminate", "--seeds", "1",
                       "--no-supervised", "--steps", "8", "--eval-every", "4") == 0
    rows = _rows(out)
    for name, row in rows.items():
        curve = json.loads((out / "trials" / name / "curve.json").read_text())
        assert [p["step"] for p in curve["points"]] == [0, 4, 8]
        assert row["pool_knn_acc"] == curve["points"][-1]["knn_acc"]
    assert (out / "fn_precision-pool-knn.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(rows) == ["baseline-t0.5-s0", "cluster-n1-t0.5-s0"]
    noisy = rows["cluster-n1-t0.5-s0"]
    assert noisy["removed_precision"] < 2 * rows["baseline-t0.5-s0"]["fn_fraction"] < 0.5
    assert noisy["noise"] == 1 and noisy["cluster_mode"] == "eliminate" and noisy["cluster_nmi"] < 0.5
    for row in rows.values():
        assert row["msl_balanced_acc"] is not None and row["hirise_balanced_acc"] is not None
    summary = (out / "summary.md").read_text()
    assert "| removed precision |" in summary and "no spread to compare with" in summary
    assert "no spread to compare with" in (out / "report.html").read_text()
    _assert_plots(out, "fn_precision")


def test_trial_names_of_the_noisy_oracle_and_attraction():
    from raysys.distributed.sweep import trial_name

    base = {"temperature": 0.5, "seed": 2, "k": 0}
    assert trial_name({**base, "method": "cluster", "noise": 0.25, "cluster_mode": "attract"}) == "cluster-attract-n0.25-t0.5-s2"
    assert trial_name({**base, "method": "cluster", "k": 10, "cluster_mode": "eliminate"}) == "cluster-k10-t0.5-s2"


@pytest.mark.parametrize("script,args,message", [
    ("sweep_mix_ratio", ["--ratios", "0.5", "1.5"], "--mix-ratio must be in [0, 1]"),
    ("sweep_temperature", ["--temperatures", "0"], "--temperature must be > 0"),
    ("compare_methods", ["--k", "1"], "--k values must be at least 2"),
    ("compare_methods", ["--k-from", "/nonexistent/results.csv"], "holds no finished cluster-aware trial"),
    ("fn_precision", ["--noise", "0", "1.5"], "--noise [1.5] out of range"),
])
def test_bad_grid_fails_before_any_trial(tmp_path, capsys, script, args, message):
    out = tmp_path / "bad"
    assert _run_script(script, out, *args) == 2
    assert message in capsys.readouterr().err
    assert not out.exists(), "nothing may be written for a rejected sweep"


def test_ess_moco_spatial_positives_and_place_recognition(ray_session, tmp_path):
    out = tmp_path / "ess"
    assert _run_script("ess", out, "--sigmas", "2") == 0
    rows = {r["method"]: r for r in _rows(out).values()}
    assert sorted(rows) == ["baseline", "ess-mb", "ess-mw", "random-init"]
    config = (out / "trials" / rows["ess-mb"]["trial"] / "config.json").read_text()
    assert '"framework": "moco"' in config and '"pair_rule": "ess-mb"' in config
    assert rows["ess-mw"]["ess_sigma"] == rows["ess-mw"]["ess_sigma_m"] == 2
    assert rows["ess-mb"]["ess_radius"] is None and rows["ess-mb"]["ess_radius_m"] > 0, "radius derived from the data"
    assert rows["ess-mb"]["positives_per_anchor"] > 1 and rows["baseline"].get("positives_per_anchor") is None
    for row in rows.values():
        assert 0 <= row["place_recall1"] <= row["place_recall5"] <= 1 and row["msl_acc"] is not None
    assert [(rows[m]["framework"], rows[m]["pair_rule"]) for m in sorted(rows)] == [
        ("moco", "instance"), ("moco", "ess-mb"), ("moco", "ess-mw"), (None, None)]  # the reference is MoCo v2
    assert rows["random-init"]["place_chance_recall1"] < 1  # the untrained encoder is scored the same way
    summary = (out / "summary.md").read_text()
    assert "place R@1 %" in summary and (out / "ess-place.png").read_bytes()[:4] == b"\x89PNG"
    assert "| baseline | MoCo v2 | instance |" in summary
    tune_params = json.loads(next((out / "ess").glob("baseline-*/params.json")).read_text())  # Tune's HParams
    assert (tune_params["variant"]["framework"], tune_params["variant"]["pair_rule"]) == ("moco", "instance")


def test_asha_stops_a_trial_early_on_the_validation_monitor(ray_session, tmp_path):
    """Two trials, the second with a learning rate that wrecks the encoder, under ASHA fed the per-epoch kNN
    accuracy on the validation split. The decision is checked against ASHA's rule applied to the accuracies
    both trials logged (about 19 queries each, so which is ahead at a rung is not certain): stop at the
    first rung (epoch 1, 2, 4) where the second trails the first; a stopped trial's row says so."""
    from raysys.distributed.sweep import variant

    out = tmp_path / "asha"
    grid = dict(variants=[variant("baseline"), variant("baseline", lr=5.0)], param="lr", swept=["baseline"])
    code = main("asha", "test", lambda p: (lambda args, preset: grid),
                ["--preset", "smoke", "--out", str(out), "--no-supervised", "--asha", "--epochs", "4"])
    assert code == 0
    rows = _rows(out)
    good, bad = rows["baseline-t0.5-s0"], rows["baseline-lr5-t0.5-s0"]
    assert good["msl_acc"] is not None and good["knn_acc"] is not None
    good_knn, bad_knn = (_knn_by_epoch(out / "trials" / name / "tb") for name in (good["trial"], bad["trial"]))
    expected_stop = next((r for r in (1, 2, 4) if bad_knn[r - 1] < good_knn[r - 1]), None)
    assert bad["stopped_at_round"] == expected_stop, (good_knn, bad_knn)
    assert (bad["msl_acc"] is None) == (expected_stop is not None)
    monitored = json.loads((out / "trials" / "baseline-t0.5-s0" / "config.json").read_text())["knn_monitor"]
    assert monitored == "msl"
    # The stopped trial's Train workers must give their CPUs back, or every later trial would wait forever.
    deadline = time.time() + 60
    while ray_session.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(1)
    assert ray_session.available_resources().get("CPU", 0) == 2, ray_session.available_resources()


def _scalars(tb_dir: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [event.value for event in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def test_sweep_k_two_stage_clusters_with_each_seeds_baseline(ray_session, tmp_path):
    """--encoder baseline: the baselines run first (their own Tune experiment), then the same seed's baseline
    encoder clusters the pool for the cluster-aware trial; its clusters' scores reach results.csv and TB."""
    import pyarrow.parquet as pq

    out = tmp_path / "two-stage"
    assert _run_script("sweep_k", out, "--encoder", "baseline", "--no-supervised", "--k", "4") == 0
    rows = _rows(out)
    assert sorted(rows) == ["baseline-t0.5-s0", "cluster-k4-t0.5-s0"]
    assert (out / "sweep_k-encoders").is_dir() and (out / "sweep_k").is_dir()
    tables = [pq.read_table(f) for f in (out / "cache" / "clusters").glob("*.parquet")]
    assert [t.schema.metadata[b"raysys.encoder"].decode() for t in tables] == \
        [str(out / "trials" / "baseline-t0.5-s0" / "model.pt")]
    cluster = rows["cluster-k4-t0.5-s0"]
    assert 0 <= cluster["cluster_nmi"] <= 1 and 0 <= cluster["cluster_traverse_nmi"] <= 1
    assert 0 < cluster["cluster_pair_precision"] <= 1
    assert _scalars(out / "trials" / "cluster-k4-t0.5-s0" / "tb", "clusters/nmi") == [pytest.approx(cluster["cluster_nmi"])]
    assert "NMI (traverse)" in (out / "summary.md").read_text()


def test_sweep_k_self_clustering_reclusters_inside_the_trial(ray_session, tmp_path):
    """--encoder self: no clustering before the trial; the worker clusters the pool from its own features
    before epoch 2 (warm-up 1) and the trial exports and scores that table."""
    import pyarrow.parquet as pq

    from raysys.config import PretrainConfig
    from raysys.data.sources import resolve_data

    out = tmp_path / "self"
    console = _run_as_job(ray_session, "sweep_k", out, "--encoder", "self", "--no-supervised", "--no-baseline", "--k", "4")
    lines = console.splitlines()
    assert len(lines) <= 60 and "TrainingReport(" not in console, console
    assert lines[0].startswith("[raysys] sweep_k: 1 trial(s)") and "trial 1/1 done: cluster-k4-t0.5-s0" in console
    assert "TrainingReport(" in (out / "ray-output.log").read_text()  # Ray's own output: in the log, not the console
    row = _rows(out)["cluster-k4-t0.5-s0"]
    trial = out / "trials" / "cluster-k4-t0.5-s0"
    table = pq.read_table(trial / "clusters.parquet")
    cfg = PretrainConfig.from_dict(json.loads((trial / "config.json").read_text()))
    pool = resolve_data(cfg)[0]
    assert cfg.self_cluster_k == 4 and table.schema.metadata[b"raysys.round"] == b"1"
    assert set(table.column("image_id").to_pylist()) <= set(pool.column("image_id").to_pylist())
    assert table.num_rows >= 0.9 * pool.num_rows and set(table.column("cluster_id").to_pylist()) <= set(range(4))
    assert not (out / "cache").exists(), "self-clustering must not cluster before the trial"
    assert row["removed_precision"] is not None and 0 <= row["cluster_nmi"] <= 1
    assert len(_scalars(trial / "tb", "self_clusters/nmi")) == 1
