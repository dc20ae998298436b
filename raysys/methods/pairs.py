"""Pair rules: which pairs of views are positives, which are negatives, with what weight.

Every contrastive method here differs only in its pair rule; one loss
(:func:`raysys.methods.losses.info_nce_qk`, and its square form :func:`raysys.methods.losses.multi_positive_info_nce`)
consumes the resulting :class:`PairMatrix`.

A rule has two forms, built from one piece of logic:

- rectangular, ``rule.pairs(anchors, candidates) -> PairMatrix [Na, Nc]``: scores every anchor image
  against every candidate image from their metadata (dicts of 1-D tensors named as in
  :mod:`raysys.data.schema`: ``image_id``, ``label``, ``cluster_id``, ``x``, ``y``, ``heading``, ...).
  MoCo uses it for queries against [current keys; queue entries].
- square, ``rule(meta) -> PairMatrix [2B, 2B]``: the SimCLR view layout. A batch of B images gives
  N = 2B views ordered ``[view1 of images 0..B-1, view2 of images 0..B-1]``, so view ``v`` shows image
  ``v % B``; the matrix is ``rule.pairs(meta, meta)`` tiled 2 x 2 with the diagonal (a view with itself)
  cleared.

Entries with the same ``image_id`` (the instance positive, or a dataset that repeats rows) are always
positives of each other with weight 1, never negatives, in every rule.

The same matrices serve the false-negative diagnostics (:func:`false_negative_stats`) and the
Appendix B simulation (:func:`false_negative_fraction_all_pairs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class PairMatrix:
    """Pseudo-labels of ordered (anchor, candidate) pairs; row i = anchor i, column j = candidate j.

    pos: float ``[Na, Nc]``, weight of candidate j as a positive of anchor i (0 = not a positive).
    neg: bool ``[Na, Nc]``, whether candidate j is a negative of anchor i (False where pos > 0).
    In the square view layout the diagonal (a view with itself) is 0 / False in both.
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
    """B of a metadata dict, checking every entry is a tensor of B rows: ``[B]``, or ``[B, D]`` for a
    per-image vector (the ``support`` embedding of :class:`SupportTopKRule`)."""
    shapes = {k: tuple(v.shape) for k, v in meta.items() if isinstance(v, Tensor)}
    if not shapes:
        raise ValueError("pair rule got no metadata tensors; pass at least 'image_id' as a [B] tensor")
    rows = {shape[0] if len(shape) in (1, 2) else None for shape in shapes.values()}
    if len(rows) != 1 or None in rows:
        raise ValueError(f"pair-rule metadata must be [B] (or [B, D]) tensors of one length B, got shapes {shapes}")
    return rows.pop()


def _require(meta: dict, key: str, rule: str) -> Tensor:
    if key not in meta:
        raise ValueError(f"pair rule '{rule}' needs metadata '{key}' (got {sorted(meta)}); "
                         f"attach it to the batch (and the MoCo queue) or choose another rule")
    return meta[key]


def _same_group(a: Tensor, c: Tensor) -> Tensor:
    """[Na, Nc] bool: entries sharing a group key; a negative key means 'unknown' and matches nothing."""
    return (a[:, None] == c[None, :]) & (a >= 0)[:, None] & (c >= 0)[None, :]


def _circular_difference(a: Tensor, c: Tensor) -> Tensor:
    """[Na, Nc] absolute heading difference in degrees, in [0, 180] (359 vs 1 -> 2); NaN where unknown."""
    d = torch.remainder(a.double()[:, None] - c.double()[None, :], 360.0)
    return torch.minimum(d, 360.0 - d)


class Rule:
    """Base of the registered pair rules: subclasses define the rectangular :meth:`pairs`;
    the square view-layout matrix is derived from it.

    A rule is one class plus its entry in :data:`RULES`; everything else follows from these attributes:

    - ``name``: its ``--pair-rule`` value and sweep method name;
    - ``requires``: metadata columns it reads besides ``image_id`` (what a MoCo queue must store);
    - ``options``: constructor argument -> the :class:`raysys.config.PretrainConfig` field that sets it;
    - ``trial_tags``: (tag, sweep parameter) pairs that name a sweep trial (``cluster-k10-...``);
    - ``spatial``: positives come from capture positions (ESS), so a missing radius is derived from the pool.
    """

    name = ""
    uses_labels = False
    requires: tuple[str, ...] = ()
    options: dict[str, str] = {}
    trial_tags: tuple[tuple[str, str], ...] = ()
    spatial = False

    def pairs(self, anchors: dict, candidates: dict) -> PairMatrix:
        """``[Na, Nc]`` pair matrix of anchor images against candidate images (both need ``image_id``)."""
        _batch_size(anchors)
        _batch_size(candidates)
        ids_a, ids_c = _require(anchors, "image_id", self.name), _require(candidates, "image_id", self.name)
        pos, neg = self._score(anchors, candidates, ids_a[:, None] == ids_c[None, :])
        return PairMatrix(pos=pos.float(), neg=neg)

    def _score(self, anchors: dict, candidates: dict, same_image: Tensor) -> tuple[Tensor, Tensor]:
        """(pos weights, neg mask) given the [Na, Nc] same-image mask; pos must be 1 where same_image."""
        raise NotImplementedError

    def __call__(self, meta: dict) -> PairMatrix:
        """Square ``[2B, 2B]`` matrix of the view layout (module doc) for one batch's metadata ``[B]``.
        Without ``image_id`` every row is its own image."""
        b = _batch_size(meta)
        if "image_id" not in meta:
            device = next(v for v in meta.values() if isinstance(v, Tensor)).device
            meta = {**meta, "image_id": torch.arange(b, device=device)}
        img = self.pairs(meta, meta)
        pos, neg = img.pos.repeat(2, 2), img.neg.repeat(2, 2)
        eye = torch.eye(2 * b, dtype=torch.bool, device=pos.device)
        return PairMatrix(pos=pos.masked_fill(eye, 0.0), neg=neg & ~eye)


def _binary(positive: Tensor) -> tuple[Tensor, Tensor]:
    return positive.float(), ~positive


class InstanceRule(Rule):
    """Baseline SimCLR (paper Eq. 1) / MoCo: the positive of a view is the other view (key) of the same
    image; every other view (key) is a negative."""

    name = "instance"

    def _score(self, anchors, candidates, same_image):
        return _binary(same_image)


class ClusterRule(Rule):
    """Cluster-aware contrastive learning (paper Sec. 4.2); needs ``cluster_id`` (< 0 = unknown,
    such an image is its own cluster).

    ``mode="eliminate"`` (default) is the paper's Eq. 2 reading: views of other images in the anchor's
    cluster are removed from the negatives, and the positive is still only the other view of the same
    image. Eq. 2's denominator as printed keeps only candidates of other clusters, so it also drops the
    positive itself: that is elimination plus decoupling, the loss's ``decoupled`` option
    (:mod:`raysys.methods.losses`). By default the positive stays in the denominator, as in every InfoNCE
    form, so that the rule changes only which negatives are seen.

    ``mode="attract"`` follows the paper's prose ("positive view pairs as views which came from the same
    source image or cluster"): same-cluster views of other images also become positives, all with equal
    weight.
    """

    name = "cluster"
    requires = ("cluster_id",)
    options = {"mode": "cluster_mode"}
    trial_tags = (("k", "k"),)
    MODES = ("eliminate", "attract")

    def __init__(self, mode: str = "eliminate"):
        if mode not in self.MODES:
            raise ValueError(f"cluster rule mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode

    def _score(self, anchors, candidates, same_image):
        same_cluster = same_image | _same_group(_require(anchors, "cluster_id", self.name),
                                                _require(candidates, "cluster_id", self.name))
        if self.mode == "attract":
            return _binary(same_cluster)
        return same_image.float(), ~same_cluster


class LabelRule(Rule):
    """Oracle / supervised-contrastive rule: views of images with the same label are positives.
    USES LABELS: a diagnostic upper bound, not self-supervised. Label < 0 (unknown) matches only itself."""

    name = "label"
    uses_labels = True
    requires = ("label",)

    def _score(self, anchors, candidates, same_image):
        return _binary(same_image | _same_group(_require(anchors, "label", self.name),
                                                _require(candidates, "label", self.name)))


class _SpatialRule(Rule):
    """Environmental Spatial Similarity (ESS, seed 001, arXiv 2401.15120): images captured close to each
    other are positives. A candidate is *near* an anchor when their capture positions ``x, y`` (metres)
    are within Euclidean distance ``r`` and, when ``theta`` is set and both headings are known (metadata
    ``heading`` in degrees, not NaN), their circular heading difference is at most ``theta`` degrees
    (359 and 1 differ by 2). Unknown positions (NaN) are near nothing: such an image keeps only its
    instance positive. Candidates that are neither the same image nor near are negatives.
    """

    requires = ("x", "y")
    options = {"r": "ess_radius", "theta": "ess_theta"}
    trial_tags = (("rad", "ess_radius"),)
    spatial = True

    def __init__(self, r: float | None = None, theta: float | None = None):
        if r is None or not (math.isfinite(r) and r >= 0):
            raise ValueError(f"pair rule '{self.name}' needs a radius r >= 0 in metres (got {r}); "
                             f"derive one from the traverses with raysys.methods.pairs.default_radius")
        if theta is not None and not (0 <= theta <= 180):
            raise ValueError(f"pair rule '{self.name}': theta is a heading difference in degrees and must be "
                             f"in [0, 180] (got {theta}); pass None to ignore headings")
        self.r, self.theta = float(r), theta

    def _near(self, anchors: dict, candidates: dict) -> tuple[Tensor, Tensor]:
        """([Na, Nc] near mask, [Na, Nc] float64 squared distance); float64 so that the radius test does
        not depend on the order of float32 rounding."""
        dx = _require(anchors, "x", self.name).double()[:, None] - _require(candidates, "x", self.name).double()[None, :]
        dy = _require(anchors, "y", self.name).double()[:, None] - _require(candidates, "y", self.name).double()[None, :]
        d2 = dx * dx + dy * dy
        near = d2 <= self.r * self.r  # False for NaN
        if self.theta is not None and "heading" in anchors and "heading" in candidates:
            dh = _circular_difference(anchors["heading"], candidates["heading"])
            near &= (dh <= self.theta) | dh.isnan()  # unknown heading: position alone decides
        return near, d2


class EssMBRule(_SpatialRule):
    """ESS-MB (binary): every near candidate (see :class:`_SpatialRule`) is a positive of equal weight 1."""

    name = "ess-mb"

    def _score(self, anchors, candidates, same_image):
        near, _ = self._near(anchors, candidates)
        return _binary(same_image | near)


class EssMWRule(_SpatialRule):
    """ESS-MW (weighted): a near candidate at distance d is a positive of weight ``exp(-d^2 / (2 sigma^2))``;
    the same image always has weight 1 (= w(0)). The loss normalizes each anchor's weights into a soft
    target. ``sigma`` defaults to ``r / 2`` (the ratio :func:`default_radius` uses), so the farthest
    positive weighs exp(-2) = 0.14. Near candidates whose weight underflows to 0 are neither positive nor
    negative."""

    name = "ess-mw"
    options = {**_SpatialRule.options, "sigma": "ess_sigma"}
    trial_tags = (*_SpatialRule.trial_tags, ("sig", "ess_sigma"))

    def __init__(self, r: float | None = None, theta: float | None = None, sigma: float | None = None):
        super().__init__(r, theta)
        sigma = self.r / 2 if sigma is None else sigma
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"pair rule 'ess-mw' needs sigma > 0 in metres (got {sigma})")
        self.sigma = float(sigma)

    def _score(self, anchors, candidates, same_image):
        near, d2 = self._near(anchors, candidates)
        w = torch.where(near, torch.exp(-d2 / (2 * self.sigma ** 2)), 0.0)
        return w.masked_fill(same_image, 1.0), ~(near | same_image)


class SupportTopKRule(Rule):
    """Label-free false-negative detection per anchor, after FNC (Huynh et al., WACV 2022): a candidate image
    is a detected false negative of an anchor image when it is among the anchor's ``k`` most similar other
    images of the batch and its similarity exceeds ``threshold``. Similarity is the dot product of the images'
    ``support`` metadata ``[B, D]``: the mean of the L2-normalized embeddings of each image's support views,
    detached (:class:`raysys.methods.objectives.SimCLRObjective` fills it from the two training views).

    FNC draws extra support views per anchor for this and aggregates their top-k votes; here the anchor's own
    two training views are its support set, so detection costs no extra forward pass, and their mean embedding
    stands for the votes. ``mode="eliminate"`` removes detected
    candidates from the anchor's negatives; ``"attract"`` makes them positives of weight 1 (FNC's two uses).
    """

    name = "fnc"
    requires = ("support",)
    options = {"k": "fnc_k", "threshold": "fnc_threshold", "mode": "cluster_mode"}
    MODES = ClusterRule.MODES

    def __init__(self, k: int = 10, threshold: float = 0.5, mode: str = "eliminate"):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"pair rule 'fnc' needs k >= 1 candidates per anchor (got {k!r})")
        if not -1.0 <= threshold <= 1.0:
            raise ValueError(f"pair rule 'fnc': threshold is a cosine similarity in [-1, 1] (got {threshold})")
        if mode not in self.MODES:
            raise ValueError(f"pair rule 'fnc' mode must be one of {self.MODES}, got {mode!r}")
        self.k, self.threshold, self.mode = k, float(threshold), mode

    def _score(self, anchors, candidates, same_image):
        a, c = _require(anchors, "support", self.name), _require(candidates, "support", self.name)
        if a.ndim != 2 or c.ndim != 2:
            raise ValueError(f"pair rule 'fnc' needs 'support' as [B, D] embeddings, got {tuple(a.shape)}")
        sim = (a.float() @ c.float().T).masked_fill(same_image, float("-inf"))
        k = min(self.k, sim.shape[1])
        top = torch.zeros_like(same_image).scatter_(1, sim.topk(k, dim=1).indices, True)
        detected = top & (sim > self.threshold)
        if self.mode == "attract":
            return _binary(same_image | detected)
        return same_image.float(), ~(same_image | detected)


# The registry: a new method is a Rule subclass and its entry here.
RULES: dict[str, type[Rule]] = {r.name: r for r in (InstanceRule, ClusterRule, LabelRule, EssMBRule, EssMWRule,
                                                    SupportTopKRule)}


def make_rule(name: str, **kwargs) -> Rule:
    """Build the pair rule registered under ``name`` (see :data:`RULES`) with its keyword options
    (the class's ``options``: ``cluster``: mode; ``ess-mb``: r, theta; ``ess-mw``: r, theta, sigma)."""
    if name not in RULES:
        raise ValueError(f"unknown pair rule {name!r}; valid rules: {sorted(RULES)}")
    try:
        return RULES[name](**kwargs)
    except TypeError as e:  # an option another rule takes
        raise ValueError(f"pair rule {name!r} got bad options {sorted(kwargs)}: {e}") from None


def positives_per_anchor(pm: PairMatrix) -> dict:
    """Number of positives (pos > 0) per anchor row: ``positives_mean``, ``positives_min``, ``positives_max``.
    In the square view layout this counts the other view of the same image too."""
    if pm.pos.shape[0] == 0:
        raise ValueError("pair matrix has no anchors")
    counts = (pm.pos > 0).sum(dim=1).double()
    return {"positives_mean": float(counts.mean()), "positives_min": float(counts.min()),
            "positives_max": float(counts.max())}


def default_radius(x, y, traverse, frame) -> dict:
    """Data-derived ESS defaults from the capture positions of traversed frames (arrays or tensors [N]).

    The step of a traverse is the distance between consecutive frames (sorted by frame number within
    each traverse; a gap in the numbering is one step). Frames with a NaN position or an unknown traverse
    (< 0) are ignored, and so are zero-length steps: a rover taking several frames from one spot (a
    panorama, an imaged target) would otherwise pull the median to 0. With ``s`` = median step, returns
    ``{"r": 2 s, "sigma": s, "median_step": s}``: ESS-MB pairs each frame with at least its neighbours
    one and two steps away along a straight drive, and ESS-MW gives a one-step neighbour weight
    exp(-1/2) = 0.61 and a two-step one exp(-2) = 0.14.
    """
    cols = [np.asarray(v.cpu() if isinstance(v, Tensor) else v) for v in (x, y, traverse, frame)]
    if len({c.shape for c in cols}) != 1 or cols[0].ndim != 1:
        raise ValueError(f"x, y, traverse, frame must be 1-D of one length, got {[c.shape for c in cols]}")
    x, y, traverse, frame = cols[0].astype(np.float64), cols[1].astype(np.float64), cols[2], cols[3]
    keep = np.isfinite(x) & np.isfinite(y) & (traverse >= 0)
    x, y, traverse, frame = x[keep], y[keep], traverse[keep], frame[keep]
    order = np.lexsort((frame, traverse))
    x, y, traverse = x[order], y[order], traverse[order]
    step = np.hypot(np.diff(x), np.diff(y))
    step = step[(traverse[1:] == traverse[:-1]) & (step > 0)]
    if step.size == 0:
        raise ValueError("no two frames of one traverse at different known positions; set the ESS radius r "
                         "(and sigma) explicitly")
    s = float(np.median(step))
    return {"r": 2 * s, "sigma": s, "median_step": s}


def _ratio(num: Tensor, den: Tensor) -> float:
    return float(num) / float(den) if int(den) > 0 else float("nan")


def false_negative_stats(pm: PairMatrix, labels: Tensor, baseline: PairMatrix | None = None,
                         candidate_labels: Tensor | None = None) -> dict:
    """False-negative diagnostics of a pair matrix, judged by image labels (-1 = unknown).

    Square view layout (default): ``labels [B]`` describe the images of a ``[2B, 2B]`` matrix.
    Rectangular (e.g. MoCo queries vs keys): ``labels [Na]`` are the anchors' and ``candidate_labels [Nc]``
    the candidates' labels of an ``[Na, Nc]`` matrix.

    Pairs involving an unknown label are excluded everywhere. Returns

    - ``n_negative_pairs``: ordered pairs counted as negatives (all of them, known or not);
    - ``fn_fraction``: among negative pairs with both labels known, the fraction sharing a label;
    - with ``baseline`` (the instance rule's matrix of the same batch), for the pairs this rule removed
      from the baseline's negatives: ``removed_precision`` (fraction of removed pairs that are truly
      same-label), ``removed_recall`` (fraction of the baseline's false negatives that were removed) and
      ``n_removed_pairs``.

    Ratios with an empty denominator are NaN.
    """
    if candidate_labels is None:
        b = labels.shape[0]
        if pm.n_views != 2 * b:
            raise ValueError(f"pair matrix has {pm.n_views} views but labels describe {b} images (expected {2 * b})")
        row_labels = col_labels = labels.repeat(2)
    else:
        row_labels, col_labels = labels, candidate_labels
        if tuple(pm.neg.shape) != (len(row_labels), len(col_labels)):
            raise ValueError(f"pair matrix is {tuple(pm.neg.shape)} but labels describe "
                             f"{len(row_labels)} anchors x {len(col_labels)} candidates")
    same = _same_group(row_labels, col_labels)
    known = (row_labels >= 0)[:, None] & (col_labels >= 0)[None, :]
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
