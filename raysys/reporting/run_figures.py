"""Figures the report draws from what runs leave behind: training curves from each run's TensorBoard
scalars (``tb/``) and confusion matrices from ``eval-*.json``. Each returns PNG bytes, for embedding."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np

from raysys.reporting.results import pyplot

CURVES = (("train/loss", "contrastive / task loss"), ("train/knn_acc", "kNN monitor accuracy (val)"))
MAX_CURVES = 40  # runs drawn in one training-curve figure; more would be an unreadable tangle


def read_scalars(tb_dir: Path, tags=tuple(tag for tag, _ in CURVES)) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value)]}`` of the TensorBoard event files in ``tb_dir`` (tags absent there are left out)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # one INFO line per event file otherwise
    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    present = set(events.Tags().get("scalars", []))
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in tags if tag in present}


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()


def training_curves_png(runs: dict[str, dict[str, list[tuple[int, float]]]]) -> bytes | None:
    """Loss and kNN accuracy against the training step, one line per run (``{name: read_scalars(...)}``);
    the legend sits below the panels, off the data. None when no run logged either scalar."""
    runs = {name: curves for name, curves in sorted(runs.items())[:MAX_CURVES] if curves}
    if not runs:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(CURVES), figsize=(11, 3.8))
    for ax, (tag, title) in zip(axes, CURVES):
        for i, (name, curves) in enumerate(runs.items()):
            if tag in curves:
                steps, values = zip(*curves[tag])
                ax.plot(steps, values, marker="o", ms=2, lw=1, color=f"C{i % 10}", label=name)
        ax.set_xlabel("training step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=4, fontsize=7, frameon=False)
    return _png(fig)


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
    return _png(fig)
