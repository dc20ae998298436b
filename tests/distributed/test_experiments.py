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


def test_mix_ratio_sweep_lowers_false_negatives(ray_session, tmp_path):
    out = tmp_path / "mix"
    assert _run_script("sweep_mix_ratio", out, "--no-supervised") == 0
    rows = _rows(out)
    assert sorted(rows) == ["mixed-r0-t0.5-s0", "mixed-r1-t0.5-s0"]
    assert rows["mixed-r1-t0.5-s0"]["fn_fraction"] < 0.5 * rows["mixed-r0-t0.5-s0"]["fn_fraction"]
    assert all(r["msl_acc"] is not None and r["hirise_acc"] is not None for r in rows.values())
    summary = (out / "summary.md").read_text()
    assert "| mixed | SimCLR | instance | 0.5 |" not in summary and "| mixed | SimCLR | instance | 1 |" in summary
    _assert_plots(out, "sweep_mix_ratio")
    configs = {name: (out / "trials" / name / "config.json").read_text() for name in rows}
    assert '"mix_ratio": 1.0' in configs["mixed-r1-t0.5-s0"] and '"max_images": 384' in configs["mixed-r1-t0.5-s0"]


def test_temperature_sweep(ray_session, tmp_path):
    out = tmp_path / "temperature"
    assert _run_script("sweep_temperature", out, "--no-supervised", "--temperatures", "0.2", "1.0") == 0
    rows = _rows(out)
    assert sorted(rows) == ["baseline-t0.2-s0", "baseline-t1-s0"]
    assert [rows[t]["temperature"] for t in sorted(rows)] == [0.2, 1.0]
    summary = (out / "summary.md").read_text()
    assert "| baseline | SimCLR | instance | 0.2 | 1 |" in summary and "| baseline | SimCLR | instance | 1 | 1 |" in summary
    _assert_plots(out, "sweep_temperature")


def test_compare_methods_table_and_bars(ray_session, tmp_path):
    out = tmp_path / "compare"
    assert _run_script("compare_methods", out, "--encoder", "oracle", "--k", "5") == 0
    rows = _rows(out)
    assert sorted(r["method"] for r in rows.values()) == ["baseline", "cluster", "fnc", "mixed", "supervised"]
    summary = (out / "summary.md").read_text()
    for label in ("| baseline | SimCLR | instance |", "| mixed r=0.5 | SimCLR | instance |",
                  "| cluster K=5 | SimCLR | cluster |", "| fnc | SimCLR | fnc |", "| supervised, from scratch | – | – |"):
        assert label in summary
    assert "FN pairs per batch %" in summary and "MSL fine-tuned %" in summary
    for row in rows.values():  # linear probe and fine-tuning for pretrained encoders; supervised from scratch
        tuned = row["method"] != "supervised"
        assert (row["msl_ft_acc"] is not None) == tuned and (row["hirise_ft_acc"] is not None) == tuned
    assert (out / "report.html").read_text().count("data:image/png;base64,") >= 2
    _assert_plots(out, "compare_methods")


def test_compare_methods_runs_moco_and_every_pretext_task(ray_session, tmp_path):
    out = tmp_path / "pretext"
    methods = ["moco", *PRETEXT_METHODS, "random-init"]
    assert _run_script("compare_methods", out, "--methods", *methods, "--no-supervised", "--fine-tune-epochs", "0",
                       "--epochs", "1") == 0
    rows = {r["method"]: r for r in _rows(out).values()}
    assert sorted(rows) == sorted(methods)
    for method, row in rows.items():  # every encoder linear-evaluated on both benchmarks
        assert row["msl_acc"] is not None and row["hirise_balanced_acc"] is not None
        assert (row["pretext_accuracy"] is not None) == (method in PRETEXT_METHODS)
        if method == "random-init":
            continue
        config = json.loads((out / "trials" / row["trial"] / "config.json").read_text())
        assert config["framework"] == method and config["pair_rule"] == "instance"
        spec = load_saved(out / "trials" / row["trial"])[0].spec  # the task head saved with the model
        assert (spec.get("head") is not None) == (method in PRETEXT_METHODS)
    assert json.loads((out / "trials" / rows["moco"]["trial"] / "config.json").read_text())["temperature"] == 0.2
    assert "pretext task acc %" in (out / "summary.md").read_text()


def test_fn_precision_noisy_oracle_spans_the_precision_range(ray_session, tmp_path):
    """At a study's step budget (--steps): noise 0 removes exactly the false negatives (precision and recall 1);
    noise 1 removes pairs at about the base rate of same-class pairs (the baseline's false-negative fraction),
    far below 1; each trial's last evaluation point is in its row and plotted."""
    out = tmp_path / "fnp"
    assert _run_script("fn_precision", out, "--noise", "0", "1", "--modes", "eliminate", "--seeds", "1",
                       "--no-supervised", "--steps", "8", "--eval-every", "4") == 0
    rows = _rows(out)
    for name, row in rows.items():
        curve = json.loads((out / "trials" / name / "curve.json").read_text())
        assert [p["step"] for p in curve["points"]] == [0, 4, 8]
        assert row["pool_knn_acc"] == curve["points"][-1]["knn_acc"]
    assert (out / "fn_precision-pool-knn.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(rows) == ["baseline-t0.5-s0", "cluster-n0-t0.5-s0", "cluster-n1-t0.5-s0"]
    clean, noisy = rows["cluster-n0-t0.5-s0"], rows["cluster-n1-t0.5-s0"]
    assert clean["removed_precision"] == 1.0 and clean["removed_recall"] == 1.0 and clean["fn_fraction"] == 0.0
    assert noisy["removed_precision"] < 2 * rows["baseline-t0.5-s0"]["fn_fraction"] < 0.5
    assert clean["noise"] == 0 and clean["cluster_mode"] == "eliminate" and clean["cluster_nmi"] == pytest.approx(1.0)
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
