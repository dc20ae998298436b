"""What a run says about its time and what reaches the console: the split of a run's wall time, a trial's fixed
cost, a sweep's ETA and progress lines, and Ray's output kept in a log file."""

import logging
import os
import subprocess
import sys

import pytest

from raysys.distributed import console, progress
from raysys.distributed import sweep_trial as trial
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


class _Trial:
    def __init__(self, name: str, result: dict | None = None):
        self.trial_id, self.config, self.last_result = name, {"name": name}, result


def test_sweep_eta_counts_only_this_sessions_work(monkeypatch):
    """5 trials, 1 finished before a resume: a trial reported again from its final.json adds no pace; the ETA
    is the elapsed time over the work done now (finished trials and running trials' epochs) times the work left."""
    now = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    shown = []
    monkeypatch.setattr(progress, "say", shown.append)

    def at(t: float, call, *args):
        now[0] = t
        call(0, [], *args)

    bar = progress.SweepProgress(5, 1, lambda t: t.trial_id, lambda config, result: result)
    at(0.0, bar.on_trial_start, _Trial("old"))
    at(1.0, bar.on_trial_complete, _Trial("old", {"trial": "old"}))  # replayed from final.json within a second
    assert shown[-1] == "[raysys] trial 2/5 done: old; 3 left"  # no pace yet: no ETA
    at(1.0, bar.on_trial_start, _Trial("a"))
    at(61.0, bar.on_trial_complete, _Trial("a", {"trial": "a", "msl_acc": 0.625, "trial_seconds": 60.0,
                                                  "fixed_fraction": 0.25}))
    # 1 trial's work in 61 s, 2 left
    assert shown[-1] == "[raysys] trial 3/5 done: a, MSL 62.5%, 60 s (fixed cost 25%); ETA 2 min for the 2 left"
    at(61.0, bar.on_trial_start, _Trial("b"))
    at(91.0, bar.on_trial_result, _Trial("b"), {"round": 1, "rounds": 4, "unit": "epoch", "loss": 1.0,
                                                "images_per_s": 400.0})
    assert bar.eta() == pytest.approx(91.0 / 1.25 * 1.75)  # work done 1 + 1/4; left 2 - 1/4
    assert bar.status_line() == "[raysys] trials: 3 done, 1 running, 1 left · b epoch 1/4, 400 img/s · ETA 2 min"


def test_eta_formula_and_round_line():
    assert progress.round_line({"round": 1, "rounds": 4, "unit": "epoch", "epoch": 1.0, "loss": 2.5, "knn_acc": 0.4,
                                "images_per_s": 99.6}, 150.0) == \
        "epoch 1/4 [#####---------------] · loss 2.500 · kNN 40.0% · 100 img/s · ETA 2 min"
    assert progress.round_line({"round": 4, "rounds": 4, "loss": 2.5, "images_per_s": 10.0}, 0.0).endswith("10 img/s")
    # a round shorter than an epoch says how far through the pool the run is
    assert progress.round_line({"round": 3, "rounds": 15, "unit": "round", "epoch": 0.2, "loss": 2.5,
                                "images_per_s": 10.0}, None).startswith("round 3/15 [####----------------] (epoch 0.20) ·")
    assert [console.duration(s) for s in (45, 89.6, 600, 7500)] == ["45 s", "90 s", "10 min", "2 h 05 min"]


def test_quiet_console_sends_every_write_of_the_process_to_the_log(tmp_path, capfd):
    """What Ray writes from the driver -- Python prints, raw writes to the file descriptors, a child process's
    output -- goes to the log; raysys's own lines and warnings reach the console; --verbose changes nothing."""
    with console.quiet_console(tmp_path):
        print("python print")
        os.write(2, b"raw stderr\n")
        subprocess.run([sys.executable, "-c", "print('child')"], check=True)
        console.say("[raysys] mine")
        logging.getLogger("raysys.test").warning("act on this")
    shown = capfd.readouterr()
    log = (tmp_path / console.LOG_FILE).read_text()
    assert all(text in log for text in ("python print", "raw stderr", "child"))
    assert "[raysys] mine" in shown.out and "act on this" in shown.out
    assert not any(text in shown.out + shown.err for text in ("python print", "raw stderr", "child"))
    with console.quiet_console(tmp_path / "v", verbose=True):
        print("loud")
    assert "loud" in capfd.readouterr().out and not (tmp_path / "v").exists()


def test_status_line_off_a_terminal_is_printed_when_it_changes_at_most_every_interval(monkeypatch, capsys):
    clock = iter([100.0, 110.0, 140.0, 141.0])
    monkeypatch.setattr(console.time, "monotonic", lambda: next(clock))
    status = console.Status(every=30.0)
    for text in ("a", "b", "c", "c"):  # a at 100; b at 110 is too soon; c at 140 is due; c again is no change
        status.show(text)
    assert capsys.readouterr().out.splitlines() == ["a", "c"]
