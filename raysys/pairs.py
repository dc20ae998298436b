"""Pair rules: which pairs of views in a batch are positives, which are negatives, with what weight.

Every contrastive method here differs only in its pair rule; one loss
(:func:`raysys.losses.multi_positive_info_nce`) consumes the resulting :class:`PairMatrix`.

View layout: a batch of B images gives N = 2B views ordered
``[view1 of images 0..B-1, view2 of images 0..B-1]``, so view ``v`` shows image ``v % B``.
A rule reads per-image metadata (a dict of ``[B]`` tensors named as in :mod:`raysys.data.schema`:
``image_id``, ``label``, ``cluster_id``, ``x``, ``y``, ...) and returns an ``[N, N]`` matrix.

Rows with the same ``image_id`` (a dataset that repeats rows) are always positives of each other,
never negatives, in every rule.

The same matrices serve the false-negative diagnostics (:func:`false_negative_stats`) and the
Appendix B simulation (:func:`false_negative_fraction_all_pairs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor


@dataclass(frozen=True)
class PairMatrix:
    """Pseudo-labels of all ordered view pairs of a batch (row i = anchor i).

    pos: float ``[N, N]``, weight of view j as a positive of anchor i (0 = not a positive; 0 on the diagonal).
    neg: bool ``[N, N]``, whether view j is a negative of anchor i (False on the diagonal and where pos > 0).
    """

    pos: Tensor
    neg: Tensor

    @property
    def n_views(self) -> int:
        return self.pos.shape[0]

    def to(self, device) -> "PairMatrix":
        return PairMatrix(self.pos.to(device), self.neg.to(device))


PairRule = Callable[[dict], PairMatrix]


def _batch_size(meta: dict) -> int:
    """B of a metadata dict, checking every entry is a 1-D tensor of the same length."""
    sizes = {k: tuple(v.shape) for k, v in meta.items() if isinstance(v, Tensor)}
    if not sizes:
        raise ValueError("pair rule got no metadata tensors; pass at least 'image_id' as a [B] tensor")
    if len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
        raise ValueError(f"pair-rule metadata must be 1-D tensors of one length B, got shapes {sizes}")
    return next(iter(sizes.values()))[0]


def _require(meta: dict, key: str, rule: str) -> Tensor:
    if key not in meta:
        raise ValueError(f"pair rule '{rule}' needs batch metadata '{key}' (got {sorted(meta)}); "
                         f"attach it to the batch or choose another rule")
    return meta[key]


def _same_image(meta: dict) -> Tensor:
    """[B, B] bool: rows showing the same image. Without ``image_id`` every row is its own image."""
    b = _batch_size(meta)
    ids = meta.get("image_id")
    if ids is None:
        any_t = next(v for v in meta.values() if isinstance(v, Tensor))
        return torch.eye(b, dtype=torch.bool, device=any_t.device)
    return ids[:, None] == ids[None, :]


def _same_group(keys: Tensor) -> Tensor:
    """[B, B] bool: rows sharing a group key; a negative key means 'unknown' and matches nothing."""
    known = keys >= 0
    return (keys[:, None] == keys[None, :]) & known[:, None] & known[None, :]


def _to_views(pos_img: Tensor, neg_img: Tensor) -> PairMatrix:
    """Expand image-level [B, B] masks to the [2B, 2B] view layout and clear the diagonal."""
    pos = pos_img.repeat(2, 2)
    neg = neg_img.repeat(2, 2) & ~pos
    eye = torch.eye(pos.shape[0], dtype=torch.bool, device=pos.device)
    return PairMatrix(pos=(pos & ~eye).float(), neg=neg & ~eye)


class InstanceRule:
    """Baseline SimCLR (paper Eq. 1): the positive of a view is the other view of the same image;
    every other view in the batch is a negative."""

    name = "instance"
    uses_labels = False

    def __call__(self, meta: dict) -> PairMatrix:
        same = _same_image(meta)
        return _to_views(same, ~same)


class ClusterRule:
    """Cluster-aware contrastive learning (paper Sec. 4.2); needs ``cluster_id`` (< 0 = unknown,
    such an image is its own cluster).

    ``mode="eliminate"`` (default) is the paper's Eq. 2 reading: views of other images in the anchor's
    cluster are removed from the negatives, and the positive is still only the other view of the same
    image. (Eq. 2's denominator, read literally, also drops the positive itself; here the positive stays
    in the denominator, as in every InfoNCE form, which keeps the loss bounded below.)

    ``mode="attract"`` follows the paper's prose ("positive view pairs as views which came from the same
    source image or cluster"): same-cluster views of other images also become positives, all with equal
    weight.
    """

    name = "cluster"
    uses_labels = False
    MODES = ("eliminate", "attract")

    def __init__(self, mode: str = "eliminate"):
        if mode not in self.MODES:
            raise ValueError(f"cluster rule mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def __call__(self, meta: dict) -> PairMatrix:
        clusters = _require(meta, "cluster_id", self.name)
        same_img = _same_image(meta)
        same_cluster = _same_group(clusters) | same_img
        if self.mode == "attract":
            return _to_views(same_cluster, ~same_cluster)
        return _to_views(same_img, ~same_cluster)


class LabelRule:
    """Oracle / supervised-contrastive rule: views of images with the same label are positives.
    USES LABELS: a diagnostic upper bound, not self-supervised. Label < 0 (unknown) matches only itself."""

    name = "label"
    uses_labels = True

    def __call__(self, meta: dict) -> PairMatrix:
        labels = _require(meta, "label", self.name)
        same = _same_group(labels) | _same_image(meta)
        return _to_views(same, ~same)


RULES: dict[str, type] = {r.name: r for r in (InstanceRule, ClusterRule, LabelRule)}


def make_rule(name: str, **kwargs) -> PairRule:
    """Build the pair rule registered under ``name`` (see :data:`RULES`) with its keyword options."""
    if name not in RULES:
        raise ValueError(f"unknown pair rule {name!r}; valid rules: {sorted(RULES)}")
    return RULES[name](**kwargs)


def _ratio(num: Tensor, den: Tensor) -> float:
    return float(num) / float(den) if int(den) > 0 else float("nan")


def false_negative_stats(pm: PairMatrix, labels: Tensor, baseline: PairMatrix | None = None) -> dict:
    """False-negative diagnostics of a pair matrix, judged by image labels ``[B]`` (-1 = unknown).

    Pairs involving an unknown label are excluded everywhere. Returns

    - ``n_negative_pairs``: ordered view pairs counted as negatives (all of them, known or not);
    - ``fn_fraction``: among negative pairs with both labels known, the fraction sharing a label;
    - with ``baseline`` (the instance rule's matrix of the same batch), for the pairs this rule removed
      from the baseline's negatives: ``removed_precision`` (fraction of removed pairs that are truly
      same-label), ``removed_recall`` (fraction of the baseline's false negatives that were removed) and
      ``n_removed_pairs``.

    Ratios with an empty denominator are NaN.
    """
    b = labels.shape[0]
    if pm.n_views != 2 * b:
        raise ValueError(f"pair matrix has {pm.n_views} views but labels describe {b} images (expected {2 * b})")
    view_labels = labels.repeat(2)
    same = _same_group(view_labels)
    known = (view_labels >= 0)[:, None] & (view_labels >= 0)[None, :]
    neg_known = pm.neg & known
    stats = {
        "n_negative_pairs": int(pm.neg.sum()),
        "fn_fraction": _ratio((neg_known & same).sum(), neg_known.sum()),
    }
    if baseline is not None:
        removed = baseline.neg & ~pm.neg & known
        hits = (removed & same).sum()
        stats.update(
            n_removed_pairs=int(removed.sum()),
            removed_precision=_ratio(hits, removed.sum()),
            removed_recall=_ratio(hits, (baseline.neg & known & same).sum()),
        )
    return stats


def count_false_negative_view_pairs(labels: Tensor) -> Tensor:
    """Ordered false-negative view pairs per batch (Appendix B), for labels ``[..., B]`` of distinct images.

    With two views per image, images a != b sharing a known label give 2 x 2 ordered view pairs in
    each direction, so the count is ``4 * sum_c n_c (n_c - 1)`` over classes c of the batch.
    Unknown labels (< 0) match nothing. Vectorized over leading dims: memory is O(labels.numel()).
    """
    lead = labels.shape[:-1]
    flat = labels.reshape(-1, labels.shape[-1])
    batch_idx = torch.arange(flat.shape[0], device=flat.device)[:, None].expand_as(flat)
    known = flat >= 0
    # Dense class index over the whole tensor, then one key per (batch, class) to count class sizes.
    classes, cls_idx = torch.unique(flat[known], return_inverse=True)
    keys = batch_idx[known] * max(len(classes), 1) + cls_idx
    uniq, n_c = torch.unique(keys, return_counts=True)
    pairs = torch.zeros(flat.shape[0], dtype=torch.int64, device=flat.device)
    pairs.scatter_add_(0, uniq // max(len(classes), 1), n_c * (n_c - 1))
    return (4 * pairs).reshape(lead)


def false_negative_fraction_all_pairs(labels: Tensor) -> Tensor:
    """Fraction of false-negative view pairs among all ``2B(2B-1)`` ordered view pairs (a view with
    itself excluded) per batch, as in the paper's Appendix B; labels ``[..., B]``, result ``[...]`` float64."""
    b = labels.shape[-1]
    return count_false_negative_view_pairs(labels).double() / (2 * b * (2 * b - 1))
