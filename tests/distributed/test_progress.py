"""What a run says about its time: the split of a run's wall time, a trial's fixed cost, a sweep's ETA."""

from raysys.distributed.sweep import trial, tuner
from raysys.distributed.trainer import run_timing


def test_run_timing_splits_the_fit_into_steps_and_the_rest():
    timing = run_timing(before_fit=5.0, fit=100.0, after_fit=2.0, metrics={"step_seconds": 80.0})
    assert timing == {"steps": 80.0, "before_fit": 5.0, "fit_outside_steps": 20.0, "after_fit": 2.0}
    # A run without the step metric (resumed past its last epoch) counts every second as fixed.
    assert run_timing(1.0, 30.0, 0.0, {})["fit_outside_steps"] == 30.0


def test_trial_timing_reports_the_fixed_cost_and_says_it(capsys):
    timing = {"steps": 90.0, "before_fit": 3.0, "fit_outside_steps": 20.0, "after_fit": 1.0}
    out = trial.trial_timing("cluster-k10-s0", 120.0, timing)
    assert out == {"trial_seconds": 120.0, "step_seconds": 90.0, "fixed_seconds": 30.0, "fixed_fraction": 0.25}
    line = capsys.readouterr().out
    assert "cluster-k10-s0: 120 s" in line and "fixed cost 30 s (25%)" in line
    assert "clustering and evaluation 6 s" in line  # 120 - (90 + 3 + 20 + 1)


def test_sweep_eta_from_this_sessions_pace(tmp_path, monkeypatch):
    (tmp_path / "results.csv").write_text("trial,msl_acc\nbaseline-s0,0.5\n")  # finished before a resume
    clock = iter([1000.0, 1060.0, 1120.0])
    monkeypatch.setattr(tuner.time, "perf_counter", lambda: next(clock))
    writer = tuner.ResultsWriter(tmp_path / "results.csv", None, total=5)
    writer.rows["cluster-k10-s0"] = {"trial": "cluster-k10-s0", "msl_acc": 0.625}
    # 2 of 5 done, 1 of them in this session's 60 s: 3 left at 60 s each.
    assert writer.progress_line(writer.rows["cluster-k10-s0"]) == (
        "[raysys] trial 2/5 done: cluster-k10-s0, MSL 62.5%; ETA 3 min for the 3 left")
    for name in ("a", "b", "c"):
        writer.rows[name] = {"trial": name}
    assert writer.progress_line({"trial": "c"}).endswith("trial 5/5 done: c; all trials done")
