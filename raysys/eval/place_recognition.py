"""Place recognition on held-out traverses: do frozen features find frames taken nearby?

The spatial evaluation of the ESS paper (localization from features), on rover traverses that pretraining
never saw. The simulated pool lists its held-out traverse ids in ``holdout-traverses.txt``;
:func:`raysys.data.sources.holdout_split` keeps them out of pretraining and gives them to :func:`evaluate_place_recognition`.

Protocol (:func:`place_recognition`):

* every held-out frame with a known position is a query; its gallery is every frame of the *other*
  held-out traverses (``exclude=None``, the default): recognising a place means finding it again on
  another drive, at another time of day and heading, not finding the previous frame of the same drive.
  ``exclude=W`` (an int) is the older, looser protocol: the gallery also holds the query's own traverse
  except the frames within ``W`` frame numbers (``|frame_q - frame_g| <= W``).
* the gallery is ranked by cosine similarity of the features (ties at the k-th place broken arbitrarily).
* recall@k: the share of *answerable* queries (at least one gallery frame within ``radius`` metres) for
  which any of the top-k frames lies within ``radius``. Queries with no gallery frame within the radius
  cannot be answered by any features and are counted (``n_unanswerable``) but left out of recall, as in
  the usual visual place recognition protocol. ``chance_recall@k`` is what a random ranking would score
  on the same queries (hypergeometric, exact).
* ``median_error``: median distance between each query (every query with a non-empty gallery) and its
  top-1 frame, in metres.
* ``n_answerable_cross`` counts the queries with a positive on another traverse (all answerable queries
  under the default gallery). The simulator's held-out drives come back over their own path as traverses
  of their own (:mod:`raysys.data.simulate`), so most held-out frames have one.
* default radius: the ESS positive radius of :func:`raysys.methods.pairs.default_radius`, twice the median
  distance between consecutive frames of a traverse over the steps where the rover moved, so "the same
  place" means the same thing in training and in this evaluation.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
from sklearn.preprocessing import normalize
from tqdm.auto import tqdm

from raysys import storage
from raysys.data.sources import HOLDOUT_FILE, holdout_split
from raysys.errors import DataError
from raysys.eval.features import default_device, frozen, path_features
from raysys.methods.pairs import default_radius
from raysys.models.io import model_digest

log = logging.getLogger(__name__)

RESULT_FILE = "eval-place.json"
DEFAULT_EXCLUDE = None  # None: the gallery is the other traverses only; an int W: also the own traverse beyond +-W
DEFAULT_KS = (1, 5)
QUERY_CHUNK = 1024  # query rows per similarity block: bounds memory at QUERY_CHUNK x n floats


# ----------------------------------------------------------------------------- the metric


def _check_inputs(features, x, y, traverse, frame):
    features = np.asarray(features, dtype=np.float32)
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    traverse, frame = np.asarray(traverse, dtype=np.int64), np.asarray(frame, dtype=np.int64)
    n = len(features)
    if features.ndim != 2 or any(len(a) != n for a in (x, y, traverse, frame)):
        raise ValueError(f"features must be [n, d] with n equal to the lengths of x, y, traverse, frame; got "
                         f"{features.shape} and {[len(a) for a in (x, y, traverse, frame)]}")
    if n < 2:
        raise ValueError(f"place recognition needs at least 2 frames, got {n}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite; drop frames of unknown position first")
    if (traverse < 0).any() or (frame < 0).any():
        raise ValueError("traverse and frame must be known (>= 0); drop frames without them first")
    return features, x, y, traverse, frame


def _chance_recall(n_candidates: np.ndarray, n_positive: np.ndarray, k: int) -> float:
    """Mean over queries of P(a uniformly random ranking puts a positive in the top k)."""
    miss = np.ones(len(n_candidates))
    for i in range(k):  # P(no positive in k draws without replacement) = prod (N - P - i) / (N - i)
        miss *= np.clip(n_candidates - n_positive - i, 0, None) / np.maximum(n_candidates - i, 1)
    return float(np.mean(1.0 - miss))


def _blocked(traverse: np.ndarray, frame: np.ndarray, q: np.ndarray, exclude: int | None) -> np.ndarray:
    """``[len(q), n]``: gallery frames query ``q`` may not retrieve: its own traverse (``exclude=None``) or its
    ``exclude`` window of it, itself included."""
    same = traverse[q, None] == traverse[None, :]
    return same if exclude is None else same & (np.abs(frame[q, None] - frame[None, :]) <= exclude)


def retrieve(features, traverse, frame, k: int, exclude: int | None = DEFAULT_EXCLUDE) -> tuple[np.ndarray, np.ndarray]:
    """Cosine retrieval over each query's gallery (module doc): ``(top, n_gallery)`` where ``top``
    ``int64 [n, k]`` holds each query's best gallery frames, best first, and -1 past the end of its gallery,
    and ``n_gallery`` ``[n]`` is the size of each query's gallery."""
    features = np.asarray(features, dtype=np.float32)
    traverse, frame = np.asarray(traverse, dtype=np.int64), np.asarray(frame, dtype=np.int64)
    if features.ndim != 2 or len(features) < 2 or len(traverse) != len(features) or len(frame) != len(features):
        raise ValueError(f"need features [n >= 2, d] and n traverse and frame ids, got {features.shape}, "
                         f"{len(traverse)} and {len(frame)}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    unit = normalize(features)  # zero vectors stay zero: similarity 0 to everything
    n = len(unit)
    kk = min(k, n - 1)
    top = np.full((n, k), -1, dtype=np.int64)
    n_gallery = np.zeros(n, np.int64)
    for start in range(0, n, QUERY_CHUNK):
        q = np.arange(start, min(start + QUERY_CHUNK, n))
        sim = unit[q] @ unit.T
        blocked = _blocked(traverse, frame, q, exclude)
        sim[blocked] = -np.inf
        n_gallery[q] = (~blocked).sum(1)
        part = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]
        rank = np.argsort(-np.take_along_axis(sim, part, 1), axis=1, kind="stable")
        top[q, :kk] = np.take_along_axis(part, rank, 1)
    top[np.arange(k)[None, :] >= n_gallery[:, None]] = -1  # ranks past the gallery hold blocked frames
    return top, n_gallery


def _n_positive(x, y, traverse, frame, radius: float, exclude: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Per query, how many gallery frames lie within ``radius``, and how many of those on other traverses."""
    counts, cross = np.zeros(len(x), np.int64), np.zeros(len(x), np.int64)
    for start in range(0, len(x), QUERY_CHUNK):
        q = np.arange(start, min(start + QUERY_CHUNK, len(x)))
        positive = (np.hypot(x[q, None] - x[None, :], y[q, None] - y[None, :]) <= radius) & ~_blocked(
            traverse, frame, q, exclude)
        counts[q] = positive.sum(1)
        cross[q] = (positive & (traverse[q, None] != traverse[None, :])).sum(1)
    return counts, cross


def place_recognition(features, x, y, traverse, frame, radius: float, exclude: int | None = DEFAULT_EXCLUDE,
                      ks=DEFAULT_KS) -> dict:
    """Recall@k within ``radius`` and the top-1 position error of cosine retrieval (module doc: protocol).

    ``features`` ``[n, d]``; ``x``, ``y`` (metres), ``traverse``, ``frame`` ``[n]``. Returns a dict with
    ``recall@k`` and ``chance_recall@k`` for each k, ``median_error``, ``mean_error``, ``n_frames``,
    ``n_traverses``, ``n_queries`` (queries with a non-empty gallery), ``n_answerable``,
    ``n_unanswerable``, ``n_answerable_cross`` (queries with a positive on *another* traverse: the
    revisits; the rest can only be answered by their own traverse beyond the window), ``radius``,
    ``exclude``, ``ks``. Recalls are NaN when no query is answerable.
    """
    features, x, y, traverse, frame = _check_inputs(features, x, y, traverse, frame)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if not (math.isfinite(radius) and radius > 0):
        raise ValueError(f"radius must be a positive number of metres, got {radius}")
    if exclude is not None and exclude < 0:
        raise ValueError(f"exclude must be None (other traverses only) or >= 0 frames, got {exclude}")
    top, n_gallery = retrieve(features, traverse, frame, ks[-1], exclude)
    n_positive, n_cross = _n_positive(x, y, traverse, frame, radius, exclude)
    has_gallery, answerable = n_gallery > 0, n_positive > 0
    dist = np.where(top >= 0, np.hypot(x[top] - x[:, None], y[top] - y[:, None]), np.inf)
    result = {"radius": float(radius), "exclude": None if exclude is None else int(exclude), "ks": ks,
              "n_frames": len(x),
              "n_traverses": int(len(np.unique(traverse))), "n_queries": int(has_gallery.sum()),
              "n_answerable": int(answerable.sum()), "n_unanswerable": int((has_gallery & ~answerable).sum()),
              "n_answerable_cross": int((n_cross > 0).sum())}
    for k in ks:
        hit = (dist[:, :k] <= radius).any(1)
        result[f"recall@{k}"] = float(hit[answerable].mean()) if answerable.any() else math.nan
        result[f"chance_recall@{k}"] = (_chance_recall(n_gallery[answerable], n_positive[answerable], k)
                                        if answerable.any() else math.nan)
    top1 = dist[has_gallery, 0]
    result["median_error"] = float(np.median(top1)) if len(top1) else math.nan
    result["mean_error"] = float(np.mean(top1)) if len(top1) else math.nan
    return result


# ----------------------------------------------------------------------------- the evaluation


def _usable_rows(manifest: pa.Table) -> tuple[pa.Table, int]:
    """Rows with a finite position and known traverse and frame; and how many others were dropped."""
    x, y = (manifest.column(c).to_numpy(zero_copy_only=False) for c in ("x", "y"))
    traverse, frame = (manifest.column(c).to_numpy(zero_copy_only=False) for c in ("traverse", "frame"))
    keep = np.isfinite(x) & np.isfinite(y) & (traverse >= 0) & (frame >= 0)
    return manifest.filter(pa.array(keep)), int((~keep).sum())


def _features(model, manifest: pa.Table, image_size: int, batch_size: int, device, progress: bool):
    """Frozen features of the manifest's images, decoded in chunks; ``(features, kept rows, skipped)``."""
    device = default_device(device)
    with frozen(model, device), tqdm(total=manifest.num_rows, unit="img", desc="place features",
                                     disable=not progress) as bar:
        x, kept, bad = path_features(model, manifest.column("path").to_pylist(), image_size, batch_size, device,
                                     min(8, os.cpu_count() or 1), bar)
    return x, kept, [{"path": p, "reason": r} for p, r in bad]


def evaluate_place_recognition(
    model, manifest: pa.Table, image_size: int, radius: float | None = None, holdout_traverses=None,
    exclude: int | None = DEFAULT_EXCLUDE, ks=DEFAULT_KS, out_dir=None, batch_size: int = 256, device=None,
    progress: bool = True,
) -> dict:
    """Place recognition of ``model``'s frozen features on held-out traverses; writes ``eval-place.json``.

    ``holdout_traverses``: ids to select from ``manifest``; ``None`` uses every row of ``manifest`` (pass
    the held-out part from :func:`raysys.data.sources.holdout_split`). Rows without position, traverse or
    frame are dropped and counted. ``radius`` defaults to the ESS radius (:func:`raysys.methods.pairs.default_radius`) of the
    selected frames, printed.
    Returns :func:`place_recognition`'s dict plus ``model_digest``, ``image_size``, ``default_radius``,
    ``dropped_rows``, ``skipped`` (undecodable files) and ``traverses``; ``out_dir``: where the JSON goes.
    """
    if holdout_traverses is not None:
        manifest = holdout_split(manifest, holdout_traverses)[1]
    rows, dropped = _usable_rows(manifest)
    if rows.num_rows < 2:
        raise DataError(f"place recognition needs at least 2 held-out frames with positions, found {rows.num_rows} "
                         f"({dropped} without position/traverse/frame); does the pool have {HOLDOUT_FILE} and "
                         f"positions.csv?")
    columns = {c: rows.column(c).to_numpy(zero_copy_only=False) for c in ("x", "y", "traverse", "frame")}
    derived = radius is None
    if derived:
        ess = default_radius(**columns)
        radius = ess["r"]
        print(f"place recognition: radius {radius:.3g} m (the ESS default: 2 x the median step "
              f"{ess['median_step']:.3g} m between frames)")
    digest = model_digest(model)
    features, kept, skipped = _features(model, rows, image_size, batch_size, device, progress)
    if model_digest(model) != digest:
        raise RuntimeError("the model changed during feature extraction; the evaluation is void")
    result = place_recognition(features, *(columns[c][kept] for c in ("x", "y", "traverse", "frame")),
                               radius=radius, exclude=exclude, ks=ks)
    result.update(model_digest=digest, image_size=int(image_size), default_radius=derived, dropped_rows=dropped,
                  skipped=skipped, traverses=sorted(int(t) for t in np.unique(columns["traverse"][kept])))
    if out_dir is not None:
        storage.write_text_atomic(str(Path(out_dir) / RESULT_FILE), json.dumps(result, indent=2))
    return result
