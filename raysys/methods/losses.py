"""One multi-positive InfoNCE loss for every pair rule, and its data-parallel form.

``info_nce_qk`` scores anchors against candidates with a rectangular :class:`~raysys.methods.pairs.PairMatrix`
(MoCo: queries vs keys + queue, see :mod:`raysys.methods.moco`); ``multi_positive_info_nce`` is its square form
over the N views of a batch, and with the instance rule it is exactly SimCLR's NT-Xent (paper Eq. 1).
``decoupled=True`` takes the positives out of every anchor's denominator (Yeh et al., "Decoupled Contrastive
Learning", ECCV 2022): with the instance rule that is DCL, with the cluster rule the paper's Eq. 2 as printed
(its denominator keeps only candidates of other clusters). Without it the positive stays in the denominator,
the standard InfoNCE form, so that cluster elimination changes only which negatives are seen; the label rule
is then supervised contrastive learning in SupCon's outer-mean form (Khosla et al. 2020, Eq. 2).
``contrastive_loss`` runs the square form under torch.distributed: it gathers embeddings (with gradient)
and metadata from all ranks, builds the pair matrix of the global batch, and scores this rank's own
anchors, so that DDP's gradient averaging gives exactly the gradients of one process holding the whole
batch.
"""

from __future__ import annotations

import zlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from raysys.methods.pairs import PairMatrix, PairRule, make_rule


def scored_anchors(pm: PairMatrix, decoupled: bool = False) -> Tensor:
    """[Na] bool: the anchors the loss scores -- those with a positive and, when ``decoupled``, a negative
    (a decoupled denominator of positives alone would be empty)."""
    has_pos = pm.pos.sum(dim=1) > 0
    return has_pos & pm.neg.any(dim=1) if decoupled else has_pos


def info_nce_qk(q: Tensor, k: Tensor, pm: PairMatrix, temperature: float,
                denominator: float | Tensor | None = None, decoupled: bool = False) -> Tensor:
    """Multi-positive InfoNCE of anchors ``q [Nq, D]`` against candidates ``k [Nk, D]``:
    ``sum_i L_i / denominator`` with ``L_i = -sum_j w_ij (s_ij - logsumexp_{m in D_i} s_im)``.

    ``s = q k^T / temperature`` on L2-normalized rows (cosine similarity), computed in at least float32
    whatever the input dtype, with autocast off. ``w_i`` is ``pm.pos[i]`` normalized to sum 1 (weights
    must be >= 0); the denominator set is ``D_i = {m : pos_im > 0 or neg_im}``, or ``{m : neg_im}`` when
    ``decoupled``. Anchors :func:`scored_anchors` leaves out are skipped. ``denominator`` defaults to the
    number of scored anchors (the mean);
    a caller splitting anchors over ranks passes the global count / world size instead (see
    :func:`contrastive_loss` for why).
    """
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"anchors and candidates must be [Nq, D] and [Nk, D], got {tuple(q.shape)} and {tuple(k.shape)}")
    if pm.pos.shape != (q.shape[0], k.shape[0]) or pm.neg.shape != pm.pos.shape:
        raise ValueError(f"pair matrix is {tuple(pm.pos.shape)} but there are {q.shape[0]} anchors and "
                         f"{k.shape[0]} candidates; build it from the same batch")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    pos, neg = pm.pos.to(q.device), pm.neg.to(q.device)
    has_pos = scored_anchors(PairMatrix(pos, neg), decoupled)
    if denominator is None:
        denominator = has_pos.sum().clamp_min(1)
    dtype = torch.promote_types(torch.promote_types(q.dtype, k.dtype), torch.float32)
    with torch.autocast(device_type=q.device.type, enabled=False):
        qn = F.normalize(q[has_pos].to(dtype), dim=1)
        kn = F.normalize(k.to(dtype), dim=1)
        logits = qn @ kn.T / temperature
        w = pos[has_pos].to(dtype)
        in_denominator = neg[has_pos] if decoupled else (w > 0) | neg[has_pos]
        # Every kept anchor has a candidate in its denominator, so the -inf fill never makes a whole row
        # -inf: logsumexp stays finite and its gradient to masked entries is exactly 0.
        lse = torch.logsumexp(logits.masked_fill(~in_denominator, float("-inf")), dim=1, keepdim=True)
        w = w / w.sum(dim=1, keepdim=True)
        per_anchor = -(w * (logits - lse)).sum(dim=1)
        return per_anchor.sum() / torch.as_tensor(denominator, dtype=dtype, device=q.device)


def multi_positive_info_nce(z: Tensor, pm: PairMatrix, temperature: float,
                            rows: slice | Tensor | None = None, decoupled: bool = False) -> Tensor:
    """Mean over anchors of ``L_i = -sum_j w_ij (s_ij - logsumexp_{k in D_i} s_ik)``: :func:`info_nce_qk`
    of the views ``z [N, D]`` against themselves, with a square ``[N, N]`` pair matrix.

    With the instance rule ``D_i`` is every view k != i, as in Eq. 1 (SimCLR's NT-Xent); ``decoupled``: see
    :func:`info_nce_qk`.
    ``rows`` (a slice or index tensor) restricts the anchors to these rows, scored against all columns.
    The result is ``sum_{i in rows} L_i * (N / len(rows)) / (number of anchors with a positive in the
    whole matrix)`` (scored: :func:`scored_anchors`): when every anchor is scored this is the plain mean over ``rows``, and in general
    the average over equal-size row blocks equals the full-matrix loss (what data parallelism needs).
    """
    if z.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {tuple(z.shape)}")
    n = z.shape[0]
    if pm.pos.shape != (n, n) or pm.neg.shape != (n, n):
        raise ValueError(f"pair matrix is {tuple(pm.pos.shape)} but there are {n} views; build it from the same batch")
    row_idx = torch.arange(n, device=pm.pos.device)[rows if rows is not None else slice(None)]
    n_anchors = scored_anchors(pm, decoupled).sum().clamp_min(1).to(z.device, torch.float64)
    sub = PairMatrix(pm.pos[row_idx], pm.neg[row_idx])
    return info_nce_qk(z[row_idx.to(z.device)], z, sub, temperature, denominator=n_anchors * (len(row_idx) / n),
                       decoupled=decoupled)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of the gathered tensor over ranks (one all_reduce) and
    returns this rank's slice. Plain ``dist`` calls, so it is correct on every torch release and backend
    (gloo has no reduce_scatter); PyTorch's functional collectives carried no backward before late 2025
    (PR #168140, issue #152127) and ``torch.distributed.nn.functional.all_gather`` is deprecated."""

    @staticmethod
    def forward(ctx, t: Tensor) -> Tensor:
        ctx.rows = t.shape[0]
        parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, t)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place; autograd owns grad
        dist.all_reduce(grad)
        rank = dist.get_rank()
        return grad[rank * ctx.rows:(rank + 1) * ctx.rows]


def gather_with_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` from all ranks along dim 0 (rank order), keeping the autograd graph: the backward
    pass sums every rank's gradient for this rank's slice. Identity when torch.distributed is not set up."""
    if not _distributed():
        return t
    return _GatherWithGrad.apply(t.contiguous())


@torch.no_grad()
def gather_no_grad(t: Tensor) -> Tensor:
    """Concatenate ``t`` (e.g. metadata) from all ranks along dim 0, without gradient; identity when not distributed."""
    if not _distributed():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def check_ranks_agree(b_local: int, keys: list[str], device) -> None:
    """All ranks must hold the same local batch size and metadata keys: all_gather needs equal shapes,
    and the per-rank loss scaling below assumes equal row counts. Raise on every rank if not."""
    if not _distributed():
        return
    mine = torch.tensor([b_local, zlib.crc32(",".join(keys).encode())], dtype=torch.int64, device=device)
    every = gather_no_grad(mine[None]).tolist()
    if any(row != every[0] for row in every):
        raise ValueError(f"ranks disagree on [local batch size, metadata-key checksum]: {every}; "
                         f"drop the last partial batch and send the same metadata columns on every rank")


def gather_meta(meta: dict, b_local: int, device) -> dict:
    """The global batch's metadata: each ``[B_local]`` tensor of ``meta`` gathered from all ranks in rank order
    (identity without torch.distributed). Checks first, on every rank, that the entries are ``[B_local]``
    tensors and that all ranks hold the same ``B_local`` and keys (all_gather needs equal shapes)."""
    bad = {k: (tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__)
           for k, v in meta.items() if not isinstance(v, Tensor) or v.ndim not in (1, 2) or v.shape[0] != b_local}
    if bad:
        raise ValueError(f"metadata must be [B_local={b_local}] (or [B_local, D]) tensors; offending entries: {bad}")
    keys = sorted(meta)  # one collective order on every rank
    check_ranks_agree(b_local, keys, device)
    return {k: gather_no_grad(meta[k].to(device)) for k in keys}


def contrastive_loss(z1: Tensor, z2: Tensor, meta: dict, rule: PairRule | str,
                     temperature: float, decoupled: bool = False) -> tuple[Tensor, PairMatrix, dict]:
    """Loss of this rank's share of the global batch, for embeddings of the two views ``z1, z2 [B_local, D]``
    and per-image metadata ``meta`` (dict of ``[B_local]`` tensors).

    The global batch is the ranks' batches concatenated in rank order, with views ordered
    ``[all view1; all view2]``; ``rule`` (a pair rule or its registered name) is applied to the gathered
    metadata; ``decoupled`` takes the positives out of the denominators (:func:`info_nce_qk`). Every rank must
    hold the same ``B_local`` and metadata keys (checked; drop the last partial batch). Returns ``(loss, global pair matrix, global metadata)``. Without torch.distributed it is the
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
    global_meta = gather_meta(meta, b_local, z1.device)
    rule = make_rule(rule) if isinstance(rule, str) else rule

    g1, g2 = gather_with_grad(z1), gather_with_grad(z2)
    pm = rule(global_meta)

    b = g1.shape[0]
    rank = dist.get_rank() if _distributed() else 0
    own = torch.arange(rank * b_local, (rank + 1) * b_local, device=z1.device)
    rows = torch.cat([own, own + b])  # this rank's view1 rows and view2 rows
    loss = multi_positive_info_nce(torch.cat([g1, g2]), pm, temperature, rows=rows, decoupled=decoupled)
    return loss, pm, global_meta
