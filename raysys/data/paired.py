"""Paired batches: a training stream that is a function of the seed alone, for paired comparisons.

Two runs that differ only in their loss (the false-negative study's arms) should see the same images in the
same batches in the same order, and the same augmentations of them: then the gap between them at a step is
the loss's effect, not the luck of the draw. Ray Data's stream is not that: block order, the local shuffle
buffer and which worker gets which rows follow the scheduler. Here the decoded pool sits in memory in one
canonical order (image key), each epoch's order is a permutation drawn from ``(seed, epoch)``, global batch
``g`` is rows ``g*B .. (g+1)*B`` of it and rank ``r`` takes its ``r``-th slice; :func:`view_seed` gives the
views' random stream per ``(seed, step, rank)``. Plain numpy/torch: no Ray here.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def _mix(*parts: int) -> int:
    """A 63-bit seed from integers, the same on every machine and Python (not ``hash``)."""
    digest = hashlib.blake2b(",".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def view_seed(seed: int, step: int, rank: int) -> int:
    """The seed of the views made at optimizer ``step`` on ``rank``: equal across runs of one seed."""
    return _mix(seed, step, rank, 0x51E)


def canonical_order(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The decoded pool's columns with rows sorted by ``image_id`` (stable), whatever order they came in."""
    order = np.argsort(arrays["image_id"], kind="stable")
    return {key: value[order] for key, value in arrays.items()}


class PairedBatches:
    """This rank's batches of the in-memory pool ``arrays`` (columns of one length, rows in canonical order)."""

    def __init__(self, arrays: dict[str, np.ndarray], seed: int, rank: int = 0, world: int = 1):
        self.arrays, self.seed, self.rank, self.world = arrays, seed, rank, world
        self.rows = len(arrays["image_id"])

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The global row order of ``epoch``: a permutation drawn from ``(seed, epoch)``."""
        return np.random.default_rng(_mix(self.seed, epoch)).permutation(self.rows)

    def _batch(self, rows: np.ndarray) -> dict[str, torch.Tensor]:
        return {key: torch.from_numpy(np.ascontiguousarray(value[rows])) for key, value in self.arrays.items()}

    def epoch(self, epoch: int, local_batch: int):
        """This rank's batches of ``epoch`` (the last partial global batch dropped)."""
        per_epoch = self.rows // (local_batch * self.world)
        return self.steps(epoch * per_epoch, per_epoch, local_batch)

    def steps(self, start: int, count: int, local_batch: int):
        """This rank's batches of global steps ``start .. start + count - 1``: step ``g`` is batch ``g mod E`` of
        epoch ``g div E`` (``E`` full global batches an epoch), so a run read in rounds shorter than an epoch, or
        resumed inside one, sees the batches a run read in epochs does."""
        global_batch = local_batch * self.world
        per_epoch = self.rows // global_batch
        order, ordered = None, None
        for step in range(start, start + count):
            epoch, index = divmod(step, per_epoch)
            if epoch != ordered:
                order, ordered = self.epoch_order(epoch), epoch
            mine = index * global_batch + self.rank * local_batch
            yield self._batch(order[mine:mine + local_batch])

    def iter_torch_batches(self, batch_size: int, drop_last: bool = False, **_):
        """Every row this rank owns (rows ``rank::world``) once, in canonical order: what embedding the pool
        (self-clustering) reads, in the interface of a Ray Data shard."""
        own = np.arange(self.rank, self.rows, self.world)
        stop = len(own) - len(own) % batch_size if drop_last else len(own)
        for start in range(0, stop, batch_size):
            yield self._batch(own[start:start + batch_size])
