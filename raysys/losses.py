"""One multi-positive InfoNCE loss for every pair rule, and its data-parallel form.

``multi_positive_info_nce`` consumes embeddings of N views and a :class:`~raysys.pairs.PairMatrix`;
with the instance rule it is exactly SimCLR's NT-Xent (paper Eq. 1). ``contrastive_loss`` runs it under
torch.distributed: it gathers embeddings (with gradient) and metadata from all ranks, builds the pair
matrix of the global batch, and scores this rank's own anchors, so that DDP's gradient averaging gives
exactly the gradients of one process holding the whole batch.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from raysys.pairs import PairMatrix, PairRule, make_rule


def multi_positive_info_nce(z: Tensor, pm: PairMatrix, temperature: float,
                            rows: slice | Tensor | None = None) -> Tensor:
    """Mean over anchors of ``L_i = -sum_j w_ij (s_ij - logsumexp_{k in D_i} s_ik)``.

    ``s = z z^T / temperature`` on L2-normalized rows of ``z [N, D]`` (cosine similarity), computed in
    at least float32 whatever the input dtype, with autocast off. ``w_i`` is ``pm.pos[i]`` normalized to
    sum 1 (weights must be >= 0); the denominator set is ``D_i = {k : pos_ik > 0 or neg_ik}``, so with the
    instance rule it is every view k != i, as in Eq. 1. Anchors without a positive are skipped.

    ``rows`` (a slice or index tensor) restricts the anchors to these rows, scored against all columns.
    The result is ``sum_{i in rows} L_i * (N / len(rows)) / (number of anchors with a positive in the
    whole matrix)``: when every anchor has a positive this is the plain mean over ``rows``, and in general
    the average over equal-size row blocks equals the full-matrix loss (what data parallelism needs).
    """
    if z.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(z.shape)}")
    n = z.shape[0]
    if pm.pos.shape != (n, n) or pm.neg.shape != (n, n):
        raise ValueError(f"pair matrix is {tuple(pm.pos.shape)} but there are {n} views; build it from the same batch")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pos, neg = pm.pos.to(z.device), pm.neg.to(z.device)
    has_pos = pos.sum(dim=1) > 0
    row_idx = torch.arange(n, device=z.device)[rows if rows is not None else slice(None)]
    anchors = row_idx[has_pos[row_idx]]
    dtype = torch.promote_types(z.dtype, torch.float32)
    with torch.autocast(device_type=z.device.type, enabled=False):
        zn = F.normalize(z.to(dtype), dim=1)
        logits = zn[anchors] @ zn.T / temperature
        w = pos[anchors].to(dtype)
        in_denominator = (w > 0) | neg[anchors]
        # Every kept anchor has a positive in its denominator, so the -inf fill never makes a whole row
        # -inf: logsumexp stays finite and its gradient to masked entries is exactly 0.
        lse = torch.logsumexp(logits.masked_fill(~in_denominator, float("-inf")), dim=1, keepdim=True)
        w = w / w.sum(dim=1, keepdim=True)
        per_anchor = -(w * (logits - lse)).sum(dim=1)
        return per_anchor.sum() * (n / len(row_idx)) / has_pos.sum().clamp_min(1)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0 (rank order), keeping the autograd graph: the backward
    pass sums every rank's gradient for this rank's slice. Identity when torch.distributed is not set up.

    Uses ``_functional_collectives.all_gather_single``, the replacement PyTorch's own deprecation of
    ``torch.distributed.nn.functional.all_gather`` names (same gradient, no FutureWarning every step).
    """
    if not _distributed():
        return t
    from torch.distributed import _functional_collectives as funcol

    out = funcol.all_gather_single(t.contiguous(), 0, dist.group.WORLD)
    return out.wait() if isinstance(out, funcol.AsyncCollectiveTensor) else out


@torch.no_grad()
def gather_no_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` (e.g. metadata) from all ranks along dim 0, without gradient; identity when not distributed."""
    if not _distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _check_ranks_agree(b_local: int, keys: list[str], device) -> None:
    """All ranks must hold the same local batch size and metadata keys: all_gather needs equal shapes,
    and the per-rank loss scaling below assumes equal row counts. Raise on every rank if not."""
    if not _distributed():
        return
    mine = torch.tensor([b_local, zlib.crc32(",".join(keys).encode())], dtype=torch.int64, device=device)
    every = gather_no_grad(mine[None]).tolist()
    if any(row != every[0] for row in every):
        raise ValueError(f"ranks disagree on [local batch size, metadata-key checksum]: {every}; "
                         f"drop the last partial batch and send the same metadata columns on every rank")


def contrastive_loss(z1: Tensor, z2: Tensor, meta: dict, rule: PairRule | str,
                     temperature: float) -> tuple[Tensor, PairMatrix, dict]:
    """Loss of this rank's share of the global batch, for embeddings of the two views ``z1, z2 [B_local, D]``
    and per-image metadata ``meta`` (dict of ``[B_local]`` tensors).

    The global batch is the ranks' batches concatenated in rank order, with views ordered
    ``[all view1; all view2]``; ``rule`` (a pair rule or its registered name) is applied to the gathered
    metadata. Every rank must hold the same ``B_local`` and metadata keys (checked; drop the last partial
    batch). Returns ``(loss, global pair matrix, global metadata)``. Without torch.distributed it is the
    plain single-process loss.

    Why DDP then gives the exact single-process gradient, for W ranks, N = 2 W B_local views, every anchor
    with a positive: rank r's loss is ``l_r = (1/(2 B_local)) sum_{i in r} L_i``. ``L_i`` depends on all
    ranks' embeddings through the gather, whose backward sums ``d l_r' / d z_r`` over all r' onto rank r, so
    rank r's parameter gradient is ``d(sum_r' l_r')/d theta`` through its own ``z_r``. DDP averages these
    over ranks: ``(1/W) sum_r ...`` = ``d((1/W) sum_r' l_r')/d theta`` and ``(1/W) sum_r' l_r' =
    (1/N) sum_i L_i``, the full-batch loss. (With anchors lacking positives, the rows scaling in
    :func:`multi_positive_info_nce` keeps the identity exact.) The argument holds for any split of the
    anchors into equal blocks; scoring only its own rows spares each rank computing all N anchors.
    """
    if z1.ndim != 2 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [B, D] of one shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    b_local = z1.shape[0]
    bad = {k: (tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__)
           for k, v in meta.items() if not isinstance(v, Tensor) or tuple(v.shape) != (b_local,)}
    if bad:
        raise ValueError(f"metadata must be [B_local={b_local}] tensors; offending entries: {bad}")
    keys = sorted(meta)  # one collective order on every rank
    _check_ranks_agree(b_local, keys, z1.device)
    rule = make_rule(rule) if isinstance(rule, str) else rule

    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
    global_meta = {k: gather_no_grad(meta[k].to(z1.device)) for k in keys}
    pm = rule(global_meta)

    b = g1.shape[0]
    rank = dist.get_rank() if _distributed() else 0
    own = torch.arange(rank * b_local, (rank + 1) * b_local, device=z1.device)
    rows = torch.cat([own, own + b])  # this rank's view1 rows and view2 rows
    loss = multi_positive_info_nce(torch.cat([g1, g2]), pm, temperature, rows=rows)
    return loss, pm, global_meta
