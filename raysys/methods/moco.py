"""MoCo v2 (He et al. 2020; Chen et al. 2020) with pair rules: momentum key encoder, a key queue that
carries metadata, shuffle-BN, and the queue loss.

Queries of this rank are scored against the candidates ``[keys of the global batch; queue entries]``
with the rectangular form of a pair rule (:meth:`raysys.methods.pairs.Rule.pairs`) and the rectangular InfoNCE
(:func:`raysys.methods.losses.info_nce_qk`). With the instance rule the positive of a query is its own key and
every other candidate is a negative: MoCo v2's loss, except that the other images' current keys are
negatives too (MoCo v2 uses only the queue); they are needed so that ESS / cluster rules can also make
in-batch neighbours positives. The queue stores each key's metadata, so the same rule pairs queries with
queue entries: an ESS neighbour captured a few batches ago is a positive, and an older key of the very
same image (same ``image_id``) is a positive, never a false negative.

Batch statistics and shuffle-BN. MoCo (Sec. 3.3) found that BatchNorm lets the model "cheat": the
positive key was normalized with statistics of the same images as the query, queue keys were not.
Its fix, used here, is shuffle-BN: the key encoder sees the global batch in a random order split over
ranks, so a key's BN statistics come from other images than its query's (:func:`forward_keys`). SyncBN
is not a substitute here: it normalizes the keys with statistics of the same global image set as the
queries. On one process, shuffling alone changes nothing (BN statistics are order-free), so
:func:`forward_keys` also takes ``sub_batches``: the shuffled batch goes through the key encoder in
that many pieces, each with its own statistics (the role of MoCo's single-GPU SplitBatchNorm).

Training step (``model`` = query encoder, possibly DDP-wrapped)::

    key_model = make_key_encoder(model)                 # once; same init on every rank
    queue = KeyQueue(size, proj_dim, queue_columns(rule, extra=("label",)), device=device)
    ...
    _, q = model(view1)                                 # queries, with gradient
    k = forward_keys(lambda v: key_model(v)[1], view2, sub_batches=splits)   # no grad, shuffle-BN
    loss, pm, global_meta = moco_loss(q, k, meta, queue, rule, temperature)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    momentum_update(key_model, model, m)
    queue.enqueue(k, meta)                              # after the step: gathers keys from all ranks

Checkpoint ``key_model.state_dict()`` and ``queue.state_dict()`` with the model; both load with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from raysys.methods.losses import (
    check_ranks_agree,
    gather_meta,
    gather_no_grad,
    info_nce_qk,
    scored_anchors,
)
from raysys.methods.pairs import (
    InstanceRule,
    PairMatrix,
    Rule,
    false_negative_stats,
    make_rule,
)

# Metadata a queue can store (names and dtypes of the training batch, raysys.data.schema) and the
# "unknown" value of each dtype.
QUEUE_COLUMNS = {"image_id": torch.int64, "cluster_id": torch.int64, "label": torch.int64, "domain": torch.int64,
                 "x": torch.float32, "y": torch.float32, "heading": torch.float32}


def _unknown(dtype: torch.dtype) -> float:
    return float("nan") if dtype.is_floating_point else -1


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (parameter names without ``module.``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def make_key_encoder(query_model: nn.Module) -> nn.Module:
    """A copy of the (unwrapped) query encoder to serve as MoCo's key encoder: same initial weights,
    parameters frozen (updated only by :func:`momentum_update`). Do not wrap it in DDP: it takes no
    gradient, and the momentum update from the DDP-synchronized query encoder keeps it equal on all ranks."""
    key_model = copy.deepcopy(_unwrap(query_model))
    key_model.requires_grad_(False)
    return key_model


@torch.no_grad()
def momentum_update(key_model: nn.Module, query_model: nn.Module, m: float = 0.999) -> None:
    """MoCo's update of every key-encoder parameter: ``theta_k <- m theta_k + (1 - m) theta_q``.

    Buffers (BN running statistics) are not copied: as in MoCo, the key encoder keeps its own, collected
    from its forward passes. DDP wrappers are unwrapped; the two models must have the same parameters."""
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1] (MoCo uses 0.999), got {m}")
    pk, pq = dict(_unwrap(key_model).named_parameters()), dict(_unwrap(query_model).named_parameters())
    if pk.keys() != pq.keys() or any(pk[n].shape != pq[n].shape for n in pk):
        raise ValueError("key and query encoders have different parameters; build the key encoder with "
                         "make_key_encoder(query_model)")
    for name, p in pk.items():
        p.lerp_(pq[name].detach(), 1.0 - m)  # p + (1 - m)(q - p) = m p + (1 - m) q


def queue_columns(rule: Rule, extra: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Metadata columns a queue needs for ``rule``: ``image_id``, the rule's ``requires`` and ``extra``
    (e.g. ``"label"`` for false-negative diagnostics, ``"heading"`` when batches carry headings and the
    ESS rule has a ``theta``)."""
    return tuple(dict.fromkeys(("image_id", *rule.requires, *extra)))


def clamp_queue_size(requested: int, pool_size: int, batch_size: int = 0) -> tuple[int, str | None]:
    """The queue size to use for a pool of ``pool_size`` images and global batch ``batch_size``:
    ``min(requested, pool_size - batch_size)``, and a warning when that clamps.

    A queue that, with the current batch, spans more than the pool must hold some image twice. In plain
    MoCo that duplicate is a false negative of its own query; here the shared ``image_id`` makes it a
    positive instead, but a stale one that gives the instance extra weight. Past an epoch boundary an
    image can still recur in a smaller queue; ``image_id`` matching keeps that a positive.
    """
    if requested < 1:
        raise ValueError(f"queue size must be >= 1, got {requested}")
    room = pool_size - batch_size
    if room < 1:
        raise ValueError(f"the pool of {pool_size} images holds no more than one global batch of {batch_size}; "
                         f"a MoCo queue needs more images than that: add data or lower the batch size")
    if requested <= room:
        return requested, None
    return room, (f"queue size {requested} exceeds the {room} images the pool of {pool_size} holds besides one "
                  f"global batch of {batch_size}; using {room} (a larger queue would hold images twice)")


class KeyQueue:
    """MoCo's queue of L2-normalized keys ``[size, dim]`` (float32) with metadata columns ``[size]``
    (names from :data:`QUEUE_COLUMNS`; ``image_id`` is required so an image's own older keys are positives).

    A ring buffer: ``ptr`` is the next slot to write, ``filled`` how many slots hold keys (slots
    ``0..filled-1``; empty slots are never returned, so never used as negatives). Under torch.distributed
    :meth:`enqueue` gathers the keys of all ranks first, so every rank holds the same queue.
    """

    def __init__(self, size: int, dim: int, meta_keys: tuple[str, ...] = ("image_id",), device=None):
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and key dim must be >= 1, got size={size}, dim={dim}")
        unknown = [c for c in meta_keys if c not in QUEUE_COLUMNS]
        if unknown or "image_id" not in meta_keys:
            raise ValueError(f"queue columns must include 'image_id' and come from {sorted(QUEUE_COLUMNS)}; "
                             f"got {list(meta_keys)}")
        self.size, self.dim, self.meta_keys = size, dim, tuple(dict.fromkeys(meta_keys))
        self.keys = torch.zeros(size, dim, dtype=torch.float32, device=device)
        self.meta = {c: torch.full((size,), _unknown(QUEUE_COLUMNS[c]), dtype=QUEUE_COLUMNS[c], device=device)
                     for c in self.meta_keys}
        self.ptr = 0
        self.filled = 0

    def __len__(self) -> int:
        return self.filled

    @torch.no_grad()
    def enqueue(self, keys: Tensor, meta: dict) -> None:
        """Add this rank's keys ``[B_local, dim]`` (any scale: normalized here) and their metadata (dict of
        ``[B_local]`` tensors holding at least this queue's columns; others are ignored), gathered across
        ranks in rank order, overwriting the oldest entries. A (global) batch larger than the queue keeps
        its newest ``size`` entries, as if written one by one."""
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [B, {self.dim}], got {tuple(keys.shape)}")
        missing = [c for c in self.meta_keys if c not in meta]
        if missing:
            raise ValueError(f"enqueue needs metadata {missing} (this queue stores {list(self.meta_keys)})")
        # gather_meta first: it checks that all ranks send equal batches before any gather of keys
        cols = gather_meta({c: meta[c] for c in self.meta_keys}, len(keys), self.keys.device)
        keys = F.normalize(gather_no_grad(keys.detach().to(self.keys.device, torch.float32)), dim=1)
        n = len(keys)
        if n > self.size:  # only the newest `size` survive; the ring advances past the dropped ones
            self.ptr = (self.ptr + n - self.size) % self.size
            keys, cols, n = keys[-self.size:], {c: v[-self.size:] for c, v in cols.items()}, self.size
        slots = (self.ptr + torch.arange(n, device=self.keys.device)) % self.size
        self.keys[slots] = keys
        for c in self.meta_keys:
            self.meta[c][slots] = cols[c].to(self.meta[c].dtype)
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.filled + n, self.size)

    def entries(self) -> tuple[Tensor, dict]:
        """The filled part: keys ``[filled, dim]`` and metadata ``[filled]``, in slot order (not age order).
        Views of the buffers: copy them before an :meth:`enqueue` if they must stay unchanged."""
        return self.keys[: self.filled], {c: v[: self.filled] for c, v in self.meta.items()}

    @torch.no_grad()
    def relabel(self, column: str, lookup: Callable[[Tensor], Tensor]) -> None:
        """Replace ``column`` of every filled entry by ``lookup(image_ids)``: after self-clustering re-clusters
        the pool, the queued keys must carry the new cluster ids, not the ones they were enqueued with."""
        if column not in self.meta_keys or column == "image_id":
            raise ValueError(f"relabel: this queue stores {list(self.meta_keys)}; {column!r} is not a relabelable column")
        ids = self.meta["image_id"][: self.filled]
        self.meta[column][: self.filled] = lookup(ids).to(self.meta[column].dtype)

    def state_dict(self) -> dict:
        """Plain tensors (copies), loadable with ``torch.load(weights_only=True)``."""
        return {"keys": self.keys.clone(), "meta": {c: v.clone() for c, v in self.meta.items()},
                "ptr": torch.tensor(self.ptr), "filled": torch.tensor(self.filled)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` of a queue with the same size, dim and columns (into this queue's device)."""
        keys, meta = state["keys"], state["meta"]
        if tuple(keys.shape) != (self.size, self.dim) or set(meta) != set(self.meta_keys):
            raise ValueError(f"saved queue is {tuple(keys.shape)} with columns {sorted(meta)}, this one is "
                             f"{(self.size, self.dim)} with {sorted(self.meta_keys)}; build the queue with the "
                             f"saved size, dim and columns or start a fresh queue")
        ptr, filled = int(state["ptr"]), int(state["filled"])
        if not (0 <= ptr < self.size and 0 <= filled <= self.size):
            raise ValueError(f"saved queue state is corrupt: ptr={ptr}, filled={filled}, size={self.size}")
        self.keys.copy_(keys)
        for c in self.meta_keys:
            self.meta[c].copy_(meta[c])
        self.ptr, self.filled = ptr, filled


@torch.no_grad()
def batch_shuffle_ddp(x: Tensor) -> tuple[Tensor, Tensor]:
    """MoCo's shuffle for shuffle-BN: gather ``x [B_local, ...]`` from all ranks, permute the global batch
    with one permutation drawn on rank 0 and broadcast, and return this rank's ``B_local`` rows of it with
    the inverse permutation for :func:`batch_unshuffle_ddp`. On one process it permutes the batch."""
    rank, world = _rank_world()
    check_ranks_agree(len(x), [], x.device)
    x_all = gather_no_grad(x)
    perm = torch.randperm(len(x_all), device=x.device)
    if world > 1:
        dist.broadcast(perm, src=0)
    return x_all[perm.view(world, -1)[rank]], torch.argsort(perm)


@torch.no_grad()
def batch_unshuffle_ddp(x: Tensor, idx_unshuffle: Tensor) -> Tensor:
    """Undo :func:`batch_shuffle_ddp` on its outputs (e.g. keys): this rank's original rows, in order."""
    rank, world = _rank_world()
    return gather_no_grad(x)[idx_unshuffle.view(world, -1)[rank]]


@torch.no_grad()
def forward_keys(encode: Callable[[Tensor], Tensor], x: Tensor, sub_batches: int = 1) -> Tensor:
    """Keys of images ``x [B_local, ...]`` with shuffle-BN (module doc): shuffle the global batch over ranks,
    run ``encode`` (e.g. ``lambda v: key_model(v)[1]``) on this rank's shuffled share in ``sub_batches``
    pieces, and return the outputs in ``x``'s order, without gradient."""
    if not 1 <= sub_batches <= len(x):
        raise ValueError(f"sub_batches must be in [1, local batch {len(x)}], got {sub_batches}")
    shuffled, idx_unshuffle = batch_shuffle_ddp(x)
    keys = torch.cat([encode(part) for part in shuffled.tensor_split(sub_batches)])
    return batch_unshuffle_ddp(keys, idx_unshuffle)


def _candidate_meta(global_meta: dict, queue: KeyQueue) -> dict:
    """Metadata (the queue's columns) of the candidates [global batch; queue entries]."""
    missing = [c for c in queue.meta_keys if c not in global_meta]
    if missing:
        raise ValueError(f"the batch lacks metadata {missing} that the queue stores; send it with the batch "
                         f"or build the queue without it")
    _, q_meta = queue.entries()
    return {c: torch.cat([global_meta[c], q_meta[c].to(global_meta[c].device, global_meta[c].dtype)])
            for c in queue.meta_keys}


def _own_rows(global_meta: dict, columns, b_local: int) -> dict:
    rank, _ = _rank_world()
    return {c: global_meta[c][rank * b_local:(rank + 1) * b_local] for c in columns}


def moco_loss(q: Tensor, k: Tensor, meta: dict, queue: KeyQueue, rule: Rule | str,
              temperature: float, decoupled: bool = False) -> tuple[Tensor, PairMatrix, dict]:
    """MoCo loss of this rank's queries ``q [B_local, D]`` (with gradient) against the candidates
    ``[keys of the global batch; queue entries]``; ``k [B_local, D]`` are this rank's keys (no gradient
    needed), ``meta`` this rank's batch metadata (dict of ``[B_local]`` tensors holding every queue column).

    Positives and negatives come from ``rule.pairs`` (a registered rule or its name) on the metadata:
    with ``instance`` a query's own key (and older keys of the same image in the queue) is its positive.
    Call ``queue.enqueue(k, meta)`` after the optimizer step, not before: the current keys are already
    candidates here.

    Returns ``(loss, pm, global_meta)``: ``pm [B_local, B_global + len(queue)]`` holds this rank's query
    rows, ``global_meta`` the gathered batch metadata. The loss is the sum over this rank's queries with a
    positive divided by (all ranks' such queries / world size), so DDP's gradient average is the gradient
    of the mean over the global batch (keys carry no gradient, so no cross-rank term arises).
    """
    if q.ndim != 2 or q.shape != k.shape:
        raise ValueError(f"q and k must both be [B, D] of one shape, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[1] != queue.dim:
        raise ValueError(f"embeddings have dim {q.shape[1]} but the queue holds dim {queue.dim}")
    rule = make_rule(rule) if isinstance(rule, str) else rule
    if not isinstance(rule, Rule):
        raise ValueError(f"MoCo needs a registered pair rule with a rectangular form (raysys.methods.pairs.Rule), "
                         f"got {type(rule).__name__}")
    missing = [c for c in queue_columns(rule) if c not in queue.meta_keys]
    if missing:
        raise ValueError(f"rule '{rule.name}' reads {missing} but the queue does not store it; "
                         f"build it with KeyQueue(size, dim, queue_columns(rule))")
    b_local = q.shape[0]
    global_meta = gather_meta(meta, b_local, q.device)
    cand_meta = _candidate_meta(global_meta, queue)
    q_keys, _ = queue.entries()
    cand_keys = torch.cat([F.normalize(gather_no_grad(k.detach()).float(), dim=1), q_keys.to(q.device)])
    pm = rule.pairs(_own_rows(global_meta, queue.meta_keys, b_local), cand_meta)
    with_pos = gather_no_grad(scored_anchors(pm, decoupled).sum()[None]).sum()
    denominator = with_pos.clamp_min(1).double() / _rank_world()[1]
    return info_nce_qk(q, cand_keys, pm, temperature, denominator=denominator, decoupled=decoupled), pm, global_meta


def moco_false_negative_stats(pm: PairMatrix, global_meta: dict, queue: KeyQueue) -> dict:
    """:func:`raysys.methods.pairs.false_negative_stats` of a :func:`moco_loss` pair matrix, judged by hidden labels
    against the instance rule's negatives. Call it before ``queue.enqueue`` (the queue must still hold the
    candidates the loss saw); needs ``label`` in the batch and among the queue's columns."""
    if "label" not in queue.meta_keys or "label" not in global_meta:
        raise ValueError("false-negative stats need 'label' in the batch and the queue; "
                         "build the queue with queue_columns(rule, extra=('label',))")
    b_local = pm.pos.shape[0]
    b_global = len(global_meta["label"])
    if pm.pos.shape[1] != b_global + len(queue):
        raise ValueError(f"pair matrix has {pm.pos.shape[1]} candidates but batch + queue hold "
                         f"{b_global + len(queue)}; call this before queue.enqueue")
    cand = _candidate_meta(global_meta, queue)
    anchors = _own_rows(global_meta, queue.meta_keys, b_local)
    baseline = InstanceRule().pairs(anchors, cand)
    return false_negative_stats(pm, anchors["label"], baseline, candidate_labels=cand["label"])
