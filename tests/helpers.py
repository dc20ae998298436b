"""Helpers shared by test modules (pytest puts this folder on sys.path: ``from helpers import ...``)."""

import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


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
