"""Helpers shared by test modules (pytest puts this folder on sys.path: ``from helpers import ...``)."""

import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker, world: int, out_dir: Path) -> list:
    """Run ``worker(rank, port, out_dir)`` in ``world`` spawned processes (a gloo group per test) and
    return what each rank saved to ``out_dir/rank<r>.pt``."""
    ctx = mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + 180  # a hang guard, not a timing assertion
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail("DDP worker processes did not finish")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
            p.join()
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]


def same_class_share(labels: np.ndarray) -> float:
    """Share of distinct-image pairs with the same class: of one batch (the training diagnostic), or of a
    whole pool (then the exact expectation for batches drawn from it without replacement)."""
    counts = np.bincount(labels)
    return float((counts * (counts - 1)).sum() / (len(labels) * (len(labels) - 1)))


def batch_mean_tolerance(pool_labels: np.ndarray, batch_size: int, batches: int) -> float:
    """Four standard errors of a mean of ``batches`` per-batch shares, the per-batch spread simulated from
    the pool itself (i.i.d. batches, not the measured ones: under-mixed batches would widen their own band)."""
    rng = np.random.default_rng(0)
    draws = [same_class_share(rng.choice(pool_labels, batch_size, replace=False)) for _ in range(4000)]
    return 4 * float(np.std(draws, ddof=1)) / np.sqrt(batches)
