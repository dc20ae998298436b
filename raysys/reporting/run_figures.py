"""Figures the report draws from what runs leave behind: training curves from each run's TensorBoard
scalars (``tb/``) and confusion matrices from ``eval-*.json``. Each returns PNG bytes, for embedding, that hold
the figure's one-line reading (:func:`raysys.reporting.results.figure_reading`)."""

from __future__ import annotations

import io
import logging
import statistics
from pathlib import Path

import numpy as np

from raysys.reporting.plots import HEADROOM, draw_floor, pyplot, save_figure

# Per panel: its title, its y-axis label (with the unit), the factor from the logged value to that unit, and the
# scalars it draws, the finest first (the worker logs the loss every few steps and, in a study, kNN accuracy at every
# evaluation step; each epoch's end adds the epoch's mean loss and the kNN monitor), each with what it measures and
# what one point is. The monitor's queries are val images of the runs' knn_monitor benchmark ({monitor}).
MONITOR_TAG = "train/knn_acc"
CURVES = (
    ("training loss", "loss (no unit)", 1, (("train/loss_step", ", per logged step"), ("train/loss", ", epoch mean"))),
    ("kNN accuracy (%)", "kNN accuracy (%)", 100, (("study/knn_acc", " on unseen pool images, per evaluation step"),
                                                   (MONITOR_TAG, " on {monitor} val, at each epoch end"))),
)
MAX_CURVES = 40  # runs drawn in one training-curve figure; more would be an unreadable tangle
MARKERS_UP_TO = 30  # points per line drawn with markers: sparse curves show where they were measured


def read_scalars(tb_dir: Path, tags=tuple(tag for *_, choices in CURVES for tag, _ in choices)
                 ) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` of the TensorBoard event files in ``tb_dir`` (tags absent there are left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per event file otherwise
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    present = set(events.Tags().get("scalars", []))
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in present}


def _png(fig, reading: str | None = None) -> bytes:
    buf = io.BytesIO()
    save_figure(fig, buf, reading)
    return buf.getvalue()


def panel_curves(runs: dict[str, dict[str, list[tuple[int, float]]]], choices
                 ) -> tuple[dict[str, list], str | None, str | None]:
    """Each run's curve for one panel, its tag and what one point is: of the panel's ``choices`` that every run
    logged (runs that logged none are left out), the one with the most points, the finer on a tie (a run shorter
    than the per-step logging interval has more epoch ends than logged steps); ``({}, None, None)`` when no run
    logged any."""
    logged = [name for name, scalars in runs.items() if any(scalars.get(tag) for tag, _ in choices)]
    complete = [(tag, point) for tag, point in choices if logged and all(runs[name].get(tag) for name in logged)]
    if not complete:
        return {}, None, None
    tag, point = max(complete, key=lambda choice: sum(len(runs[name][choice[0]]) for name in logged))
    return {name: runs[name][tag] for name in logged}, tag, point


def monitor_floor(evaluation: dict) -> tuple[float, float] | None:
    """``(majority class, chance)`` on the kNN monitor's queries, from its benchmark's ``eval-*.json`` class counts.
    The monitor draws its bank from train and its queries from val (from held-out train without val), both in
    proportion to the classes (:func:`raysys.eval.knn.monitor_split`): the majority class is the most frequent train
    class, scored by its share of the queries; chance is one over the classes. None without train counts."""
    counts = evaluation.get("counts") or {}
    train, val = ((counts.get(split) or {}).get("per_class") or [] for split in ("train", "val"))
    queries = val if sum(val) else train
    if not sum(train) or len(queries) != len(train):
        return None
    return queries[int(np.argmax(train))] / sum(queries), 1 / len(train)


def curves_reading(loss: dict[str, list], accuracy: dict[str, list], floor: tuple[float, float] | None = None) -> str:
    """One line: in how many runs the loss fell from its first point to its last (medians of both), and the
    range of the last kNN accuracies with the best run, beside the majority class's share (``floor``) when known."""
    moved = [(points[0][1], points[-1][1]) for points in loss.values() if len(points) > 1]
    parts = []
    if moved:
        first, last = statistics.median(a for a, _ in moved), statistics.median(b for _, b in moved)
        parts.append(f"loss fell in {sum(b < a for a, b in moved)} of {len(moved)} runs "
                     f"(median {first:.3g} at the first point, {last:.3g} at the last)")
    if accuracy:
        final = {name: points[-1][1] for name, points in accuracy.items()}
        best, low = max(final, key=final.get), min(final.values())
        parts.append((f"last kNN accuracy {100 * low:.1f} % in every run" if low == final[best] else
                      f"last kNN accuracy {100 * low:.1f}–{100 * final[best]:.1f} % (best: {best})")
                     + (f", always predicting the majority class {100 * floor[0]:.1f} %" if floor else ""))
    return "; ".join(parts) + "." if parts else ""


def training_curves_png(runs: dict[str, dict[str, list[tuple[int, float]]]],
                        monitor: str = "the kNN monitor's benchmark",
                        floor: tuple[float, float] | None = None) -> bytes | None:
    """Loss and kNN accuracy (in %, from 0) against the training step (integer ticks), one line per run
    (``{name: read_scalars(...)}``), each panel from its finest logged scalar (:data:`CURVES`) and titled with what
    it measures (``monitor``: the kNN monitor's benchmark, as written); the monitor's curves with its ``floor``
    (:func:`monitor_floor`) as majority-class and chance lines. The legend sits below the panels, off the data,
    and the PNG holds the curves' reading (:func:`curves_reading`). None when no run logged either scalar."""
    from matplotlib.ticker import MaxNLocator

    runs = dict(sorted(runs.items())[:MAX_CURVES])
    panels = [(title, label, scale, *panel_curves(runs, choices)) for title, label, scale, choices in CURVES]
    if not any(curves for _, _, _, curves, _, _ in panels):
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(11, 3.8))
    colors = {name: f"C{i % 10}" for i, name in enumerate(runs)}
    for ax, (title, label, scale, curves, _, point) in zip(axes, panels):
        for name, points in curves.items():
            steps, values = zip(*points)
            ax.plot(steps, [scale * v for v in values], marker="o" if len(steps) <= MARKERS_UP_TO else None, ms=3,
                    lw=1, color=colors[name], label=name)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(title + (point or "").format(monitor=monitor), fontsize=10)
        ax.grid(alpha=0.3)
    accuracy = axes[1]
    handles, labels = max((ax.get_legend_handles_labels() for ax in axes), key=lambda hl: len(hl[0]))  # the runs
    floor = floor if panels[1][4] == MONITOR_TAG else None  # the pool curve's queries have no recorded counts
    if floor is not None:
        runs_drawn = len(accuracy.lines)
        draw_floor(accuracy, *floor)
        handles, labels = handles + accuracy.lines[runs_drawn:], labels + [
            line.get_label() for line in accuracy.lines[runs_drawn:]]
    accuracy.set_ylim(0, max(accuracy.get_ylim()[1], 100 * HEADROOM * floor[0]) if floor else None)
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=7, frameon=False)
    return _png(fig, curves_reading(panels[0][3], panels[1][3], floor))


def confusion_png(evaluation: dict, title: str) -> bytes | None:
    """The confusion matrix of an ``eval-*.json`` (rows: true class, normalized per row so rare classes are
    readable; the cell text is the count). None when the file has no matrix."""
    matrix = (evaluation.get("metrics") or {}).get("confusion_matrix")
    if not matrix:
        return None
    counts = np.asarray(matrix, dtype=np.int64)
    names = evaluation.get("class_names") or [str(c) for c in range(len(counts))]
    shown = np.flatnonzero(counts.sum(axis=1) + counts.sum(axis=0))  # classes neither true nor predicted add nothing
    counts = counts[np.ix_(shown, shown)]
    rates = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    plt = pyplot()
    size = 2.5 + 0.35 * len(shown)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(counts):
        if count:
            ax.text(col, row, str(count), ha="center", va="center", fontsize=6,
                    color="white" if rates[row, col] > 0.5 else "black")
    labels = [str(names[c])[:24] for c in shown]
    ax.set_xticks(range(len(shown)), labels, rotation=90, fontsize=7)
    ax.set_yticks(range(len(shown)), labels, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class")
    majority = (evaluation.get("majority") or {}).get("accuracy")
    floor = f" Always predicting the majority train class: {100 * majority:.1f} %." if majority is not None else ""
    return _png(fig, confusion_reading(counts, labels) + floor)


def confusion_reading(counts: np.ndarray, names: list[str]) -> str:
    """One line: the accuracy over the matrix's test images and the most frequent confusion."""
    total = int(counts.sum())
    if not total:
        return ""
    errors = counts - np.diag(np.diag(counts))
    reading = f"accuracy {100 * np.trace(counts) / total:.1f} % of {total} test images"
    if errors.any():
        true, predicted = np.unravel_index(np.argmax(errors), errors.shape)
        reading += (f"; most frequent confusion: {names[true]} taken for {names[predicted]} "
                    f"({errors[true, predicted]} of {counts[true].sum()} {names[true]} images)")
    return reading + "."
