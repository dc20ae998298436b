"""Helpers shared by test modules (pytest puts this folder on sys.path: ``from helpers import ...``)."""

import socket
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"


def bucket_keys(bucket_uri: str) -> list[str]:
    """Every object key in a bucket of the test object store, listed with boto3 (independently of pyarrow);
    the empty ``folder/`` markers pyarrow keeps for folders are left out."""
    import boto3

    listed = boto3.client("s3").list_objects_v2(Bucket=bucket_uri.removeprefix("s3://")).get("Contents", [])
    return [o["Key"] for o in listed if not o["Key"].endswith("/")]


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


@contextmanager
def gloo_group(rank: int, port: int, world: int):
    """The gloo process group of one rank spawned by :func:`run_ranks`. On a clean exit every rank meets
    first: rank 0 hosts the store, and tearing it down under a busy peer aborts that peer."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        yield
        dist.barrier()
    finally:
        dist.destroy_process_group()


def ddp_mean_grads(module: torch.nn.Module, world: int) -> list:
    """What DDP does: every parameter's gradient averaged over the ranks."""
    grads = []
    for p in module.parameters():
        dist.all_reduce(p.grad)
        grads.append(p.grad / world)
    return grads


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
