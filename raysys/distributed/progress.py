"""Progress on the console: one line per round (an epoch, or a share of a step budget: raysys.config.schedule) of
a pretraining run, and a sweep's live status line with one line per finished trial (see :mod:`raysys.distributed.console` for where Ray's own output goes)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from queue import Empty

from ray import tune
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Queue

from raysys.distributed.console import Status, duration, say

BAR_WIDTH = 20


def round_line(metrics: dict, eta_s: float | None) -> str:
    """``epoch 2/3 [#############-------] loss 5.213 · kNN 41.2% · 412 img/s · ETA 40 s``; a round that is not an
    epoch says how far through the pool it is: ``round 4/15 [...] (epoch 0.27) · loss ...``."""
    done, total = metrics["round"], metrics.get("rounds") or metrics["round"]
    filled = round(BAR_WIDTH * done / max(1, total))
    unit = metrics.get("unit") or "epoch"
    where = f" (epoch {metrics['epoch']:.2f})" if unit != "epoch" and metrics.get("epoch") is not None else ""
    parts = [f"{unit} {done}/{total} [{'#' * filled}{'-' * (BAR_WIDTH - filled)}]{where}", f"loss {metrics['loss']:.3f}"]
    if metrics.get("knn_acc") is not None:
        parts.append(f"kNN {metrics['knn_acc']:.1%}")
    parts.append(f"{metrics['images_per_s']:.0f} img/s")
    if done < total and eta_s is not None:
        parts.append(f"ETA {duration(eta_s)}")
    return " · ".join(parts)


class _ForwardRounds(UserCallback):
    """Runs in Ray Train's controller (another process): hands rank 0's report of each round to the driver."""

    def __init__(self, queue: Queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        if metrics and "round" in metrics[0] and "loss" in metrics[0]:
            self.queue.put({k: metrics[0].get(k) for k in ("round", "rounds", "unit", "epoch", "loss", "knn_acc",
                                                           "images_per_s")})


def _show_rounds(queue: Queue, stop: threading.Event) -> None:
    """Print each round's line as it arrives; the ETA from the pace between this run's round reports."""
    first = None  # (time, round) of the first report: Ray Train's start-up is not a round's pace
    while not (stop.is_set() and queue.empty()):
        try:
            metrics = queue.get(timeout=0.5)
        except Empty:
            continue
        now, done = time.monotonic(), metrics["round"]
        first = first or (now, done)
        pace = (now - first[0]) / (done - first[1]) if done > first[1] else None
        left = (metrics.get("rounds") or done) - done
        say(round_line(metrics, pace * left if pace else None))


@contextmanager
def round_progress(enabled: bool = True):
    """Train callbacks that print one line per round on the console while the run trains (none if not
    ``enabled``: a sweep's trial reports to Tune instead)."""
    if not enabled:
        yield []
        return
    queue, stop = Queue(), threading.Event()
    thread = threading.Thread(target=_show_rounds, args=(queue, stop), daemon=True)
    thread.start()
    try:
        yield [_ForwardRounds(queue)]
    finally:
        stop.set()
        thread.join(timeout=5)
        queue.shutdown()


class SweepProgress(tune.Callback):
    """A sweep's console: the live status line (trials done, running and left; each running trial's round and
    images/s; the ETA) and one line per finished trial. The ETA counts only work done in this session: a trial
    reported again from its ``final.json`` after a resume took no time now."""

    def __init__(self, total: int, done_before: int, name_of, row_of):
        self.total, self.done, self.name_of, self.row_of = total, done_before, name_of, row_of
        self.running: dict[str, dict] = {}  # trial -> its last round report and when it started
        self.started, self.work_done = time.monotonic(), 0.0  # trials' worth of work done this session
        self.status = Status()

    def on_trial_start(self, iteration, trials, trial, **info):
        self.running[trial.trial_id] = {"name": self.name_of(trial), "began": time.monotonic(), "fraction": 0.0}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        state = self.running.get(trial.trial_id)
        if state is None or "loss" not in result or "round" not in result:
            return
        rounds = result.get("rounds") or result["round"]
        state.update(round=result["round"], rounds=rounds, unit=result.get("unit") or "epoch",
                     images_per_s=result.get("images_per_s"), fraction=min(1.0, result["round"] / max(1, rounds)))
        self.status.show(self.status_line())

    def on_trial_complete(self, iteration, trials, trial, **info):
        state = self.running.pop(trial.trial_id, None)
        self.done += 1
        if state and time.monotonic() - state["began"] > 5:  # ran now, not reported again from final.json
            self.work_done += 1
        if trial.last_result:
            say(self.finished_line(self.row_of(trial.config, trial.last_result)))
        if self.running:
            self.status.show(self.status_line(), force=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.running.pop(trial.trial_id, None)
        self.done += 1
        say(f"[raysys] trial {self.name_of(trial)} failed; its error is in the summary and the log")

    def eta(self) -> float | None:
        """Seconds left at this session's pace, finished trials and the running ones' finished rounds counted."""
        work = self.work_done + sum(state["fraction"] for state in self.running.values())
        if work <= 0:
            return None
        left = self.total - self.done - sum(state["fraction"] for state in self.running.values())
        return (time.monotonic() - self.started) / work * max(0.0, left)

    def status_line(self) -> str:
        running = [f"{s['name']} {s['unit']} {s['round']}/{s['rounds']}, {s['images_per_s']:.0f} img/s"
                   for s in self.running.values() if "round" in s]
        eta = self.eta()
        left = self.total - self.done - len(self.running)
        return " · ".join([f"[raysys] trials: {self.done} done, {len(self.running)} running, {left} left", *running,
                           f"ETA {duration(eta)}" if eta is not None else "ETA –"])

    def finished_line(self, row: dict) -> str:
        score = f", MSL {row['msl_acc']:.1%}" if isinstance(row.get("msl_acc"), float) else ""
        took = (f", {duration(row['trial_seconds'])} (fixed cost {row['fixed_fraction']:.0%})"
                if isinstance(row.get("trial_seconds"), float) and isinstance(row.get("fixed_fraction"), float) else "")
        left = self.total - self.done
        eta = self.eta()
        tail = ("all trials done" if not left else
                f"ETA {duration(eta)} for the {left} left" if eta is not None else f"{left} left")
        return f"[raysys] trial {self.done}/{self.total} done: {row['trial']}{score}{took}; {tail}"
