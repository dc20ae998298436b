"""k-nearest-neighbour classification on frozen features, and a small kNN monitor for training.

The classifier is the weighted kNN of InstDisc (Wu et al. 2018) and DINO (Caron et al. 2021): features are
L2-normalised, a query's ``k`` most cosine-similar train features vote for their labels with weight
``exp(sim / T)``, and the class with the largest summed weight wins. Unlike a linear probe it has no
training and no seed, so it is a cheap, deterministic read-out of how well the feature space groups classes.

Ties are broken deterministically: among equally similar train features the lower train index is the
nearer neighbour (a stable sort), and classes whose summed votes agree to a relative 1e-9 -- equal up to
floating-point summation order, which differs between CPU and GPU -- count as tied, the lowest class id
winning. Queries are processed in batches, so memory is O(batch_size x n_train).

The monitor (:func:`monitor_split`, :func:`load_monitor_data`, :func:`knn_monitor_score`) scores a model
during pretraining on a few hundred pre-decoded labeled images drawn from a benchmark's train split (the
bank) and val split (the queries) -- never from test, so choosing checkpoints or trials by it keeps the
test split untouched. Plain PyTorch/numpy: no Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from raysys.data.decode import load_images
from raysys.data.sampling import sample_groups
from raysys.data.simulate import apportion
from raysys.errors import DataError
from raysys.eval.features import benchmark_features, extract_features
from raysys.eval.linear import classification_metrics, load_benchmark

DEFAULT_K, DEFAULT_TEMPERATURE = 20, 0.07
TIE_RTOL = 1e-9  # votes this close (relative) are tied: summation order must not decide a prediction


def _as_tensor(x, dtype, device) -> torch.Tensor:
    return torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(device=device, dtype=dtype)


def _check_knn_inputs(train_x, train_y, query_x, num_classes: int, k: int, temperature: float, batch_size: int):
    if train_x.ndim != 2 or query_x.ndim != 2 or train_x.shape[1] != query_x.shape[1]:
        raise ValueError(f"train and query features must be [N, D] with the same D, got {tuple(train_x.shape)} "
                         f"and {tuple(query_x.shape)}")
    if len(train_x) == 0 or len(train_x) != len(train_y):
        raise ValueError(f"need at least one train feature and one label per feature (got {len(train_x)} "
                         f"features, {len(train_y)} labels)")
    if train_y.min() < 0 or train_y.max() >= num_classes:
        raise ValueError(f"train labels must lie in [0, {num_classes}), found {int(train_y.min())}..{int(train_y.max())}")
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise ValueError(f"k must be an integer >= 1 (got {k!r})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 (got {temperature}); DINO uses 0.07")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1 (got {batch_size})")


def knn_predict(
    train_x, train_y, query_x, num_classes: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
    batch_size: int = 1024, device=None,
) -> np.ndarray:
    """Class ids ``int64 [Q]`` predicted for ``query_x`` ``[Q, D]`` by similarity-weighted kNN voting over
    ``train_x`` ``[N, D]`` / ``train_y`` ``[N]`` (numpy arrays or tensors).

    Cosine similarity; each of the ``min(k, N)`` nearest neighbours votes ``exp(sim / T)`` for its label.
    Ties as in the module docstring. Computed on ``device`` (default: ``train_x``'s device, else CPU).
    """
    if device is None:
        device = train_x.device if isinstance(train_x, torch.Tensor) else torch.device("cpu")
    train = _as_tensor(train_x, torch.float32, device)
    labels = _as_tensor(train_y, torch.int64, device)
    queries = _as_tensor(query_x, torch.float32, device)
    _check_knn_inputs(train, labels, queries, num_classes, k, temperature, batch_size)
    train = torch.nn.functional.normalize(train, dim=1)
    k = min(int(k), len(train))
    out = []
    for start in range(0, len(queries), batch_size):
        q = torch.nn.functional.normalize(queries[start : start + batch_size], dim=1)
        sims = q @ train.T  # [B, N]: the only O(batch x train) buffer
        top_sims, top_idx = torch.sort(sims, dim=1, descending=True, stable=True)
        top_sims, top_idx = top_sims[:, :k].double(), top_idx[:, :k]
        # shifting by the best similarity leaves the vote ratios unchanged and keeps exp() finite at tiny T
        weights = torch.exp((top_sims - top_sims[:, :1]) / temperature)
        votes = torch.zeros(len(q), num_classes, dtype=torch.float64, device=device)
        votes.scatter_add_(1, labels[top_idx], weights)
        tied = votes >= votes.max(dim=1, keepdim=True).values * (1 - TIE_RTOL)
        out.append(tied.to(torch.uint8).argmax(dim=1).cpu())  # argmax returns the first (lowest) tied class
    return torch.cat(out).numpy() if out else np.zeros(0, np.int64)


def knn_accuracy(train_x, train_y, query_x, query_y, num_classes: int, k: int = DEFAULT_K,
                 temperature: float = DEFAULT_TEMPERATURE, **kw) -> float:
    """Fraction of ``query_y`` that :func:`knn_predict` gets right."""
    pred = knn_predict(train_x, train_y, query_x, num_classes, k, temperature, **kw)
    return float(np.mean(pred == np.asarray(query_y))) if len(pred) else float("nan")


def knn_metrics(train_x, train_y, test_x, test_y, num_classes: int, k: int = DEFAULT_K,
                temperature: float = DEFAULT_TEMPERATURE, **kw) -> dict:
    """:func:`raysys.eval.linear.classification_metrics` of kNN predictions, plus ``k``, ``temperature`` and
    ``n_train``."""
    pred = knn_predict(train_x, train_y, test_x, num_classes, k, temperature, **kw)
    return {**classification_metrics(test_y, pred, num_classes), "k": int(k), "temperature": float(temperature),
            "n_train": int(len(train_y))}


def evaluate_knn(model, benchmark_root, image_size: int, k: int = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 cache_dir=None, device=None, progress: bool = True) -> dict:
    """kNN evaluation of ``model``'s frozen features on a benchmark: bank = train split, queries = test
    (and val, when present, under ``val_metrics``). Features come from
    :func:`raysys.eval.features.benchmark_features`, so they are shared with the linear probe's cache."""
    manifest, names = load_benchmark(benchmark_root)
    data = benchmark_features(model, manifest, image_size, cache_dir=cache_dir, device=device, progress=progress)
    if len(data["train"]["y"]) == 0 or len(data["test"]["y"]) == 0:
        raise DataError(f"benchmark {benchmark_root}: no train or no test image could be decoded")
    train = data["train"]
    result = {"benchmark": str(Path(benchmark_root).resolve()), "model_digest": data["model_digest"],
              "metrics": knn_metrics(train["x"], train["y"], data["test"]["x"], data["test"]["y"], len(names), k,
                                     temperature)}
    if "val" in data and len(data["val"]["y"]):
        result["val_metrics"] = knn_metrics(train["x"], train["y"], data["val"]["x"], data["val"]["y"], len(names),
                                            k, temperature)
    return result


# ----------------------------------------------------------------------------- training monitor


@dataclass
class MonitorSplit:
    """Manifest row indices of the monitor's bank (from train) and queries (from val, or held-out train)."""

    bank: np.ndarray
    query: np.ndarray
    query_source: str  # "val", or "train (held out)" when the benchmark has no val split


def _stratified_rows(labels: np.ndarray, groups: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """About ``n`` rows (exactly ``min(n, len)`` when every group is one image) drawn as whole groups, each
    class getting its share of ``n`` proportional to its row count (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    if n >= len(labels) or len(classes) == 0:
        return np.arange(len(labels))
    targets = dict(zip(classes.tolist(), apportion(n, counts, minimum=0).tolist()))
    return sample_groups(labels, groups, targets, rng)


def monitor_split(manifest: pa.Table, n_bank: int = 512, n_query: int = 256, seed: int = 0) -> MonitorSplit:
    """Choose the monitor's images from a labeled manifest, stratified by class; never a test row.

    Bank: ``n_bank`` train rows. Queries: ``n_query`` val rows; without a val split, whole augmentation
    groups of train are held out for the queries first and the bank is drawn from the remaining groups,
    so no query has a flipped/rotated copy of itself in the bank. Fewer rows are returned when a split is
    smaller than asked.
    """
    if n_bank < 1 or n_query < 1:
        raise ValueError(f"n_bank and n_query must be at least 1 (got {n_bank}, {n_query})")
    split = np.asarray(manifest.column("split").to_pylist())
    labels = np.asarray(manifest.column("label").to_pylist(), dtype=np.int64)
    groups = np.asarray(manifest.column("group_id").to_pylist())
    train = np.flatnonzero((split == "train") & (labels >= 0))
    val = np.flatnonzero((split == "val") & (labels >= 0))
    if len(train) == 0:
        raise ValueError("the manifest has no labeled train rows; the kNN monitor needs a benchmark's train split")
    rng = np.random.default_rng(seed)
    if len(val):
        query = val[_stratified_rows(labels[val], val.astype(str), n_query, rng)]
        source = "val"
    else:
        if len(np.unique(groups[train])) < 2:
            raise ValueError("without a val split the monitor holds out train groups, but train has a single group")
        n_query = min(n_query, len(train) // 2)  # leave the bank at least half of train
        query = train[_stratified_rows(labels[train], groups[train], n_query, rng)]
        train = train[~np.isin(groups[train], groups[query])]
        source = "train (held out)"
    bank = train[_stratified_rows(labels[train], train.astype(str), n_bank, rng)]
    return MonitorSplit(np.sort(bank), np.sort(query), source)


@dataclass
class MonitorData:
    """Pre-decoded monitor images (uint8 ``[n, S, S, 3]``) and labels; small enough to ship to a worker."""

    bank_images: np.ndarray
    bank_labels: np.ndarray
    query_images: np.ndarray
    query_labels: np.ndarray
    num_classes: int


def load_monitor_data(benchmark_root, image_size: int, n_bank: int = 512, n_query: int = 256,
                      seed: int = 0) -> MonitorData:
    """Decode the :func:`monitor_split` images of a benchmark at ``image_size`` (undecodable files are
    left out)."""
    manifest, names = load_benchmark(benchmark_root)
    split = monitor_split(manifest, n_bank, n_query, seed)
    paths = np.asarray(manifest.column("path").to_pylist())
    labels = np.asarray(manifest.column("label").to_pylist(), dtype=np.int64)
    parts = []
    for rows in (split.bank, split.query):
        images, kept, _ = load_images(paths[rows].tolist(), image_size)
        parts += [images, labels[rows][kept]]
    if len(parts[1]) == 0 or len(parts[3]) == 0:
        raise ValueError(f"benchmark {benchmark_root}: none of the monitor's bank or query images could be decoded")
    return MonitorData(*parts, num_classes=len(names))


@dataclass
class CurveData:
    """The evaluation curve's images (uint8 ``[n, S, S, 3]``), hidden labels, and each image's fold (0 or 1)."""

    images: np.ndarray
    labels: np.ndarray
    folds: np.ndarray
    num_classes: int


def load_curve_data(pool: pa.Table, image_size: int, n_max: int = 4096, seed: int = 0) -> CurveData:
    """The evaluation curve's images: labeled pool rows never pretrained on (``pool``: the hidden labels of the
    built-in data), up to ``n_max`` stratified by class, split into two folds by whole traverses so that no
    image has a frame of its own traverse among its neighbours. Each fold's images are the queries against
    the other's (:func:`knn_curve_point`): every image is scored once, a few thousand queries where the
    monitor's 256 have a standard error of about 3 points -- too coarse for the gaps the study looks for."""
    labels = np.asarray(pool.column("label").to_pylist(), dtype=np.int64)
    traverse = np.asarray(pool.column("traverse").to_pylist(), dtype=np.int64)
    image_ids = np.asarray(pool.column("image_id").to_pylist())
    groups = np.where(traverse >= 0, traverse.astype(str), image_ids)  # no traverse: the image is its own group
    rows = np.flatnonzero(labels >= 0)
    if len(np.unique(groups[rows])) < 2:
        raise ValueError(f"the evaluation curve needs labeled pool images of at least two traverses never "
                         f"pretrained on (found {len(rows)} images)")
    rng = np.random.default_rng(seed)
    rows = rows[np.sort(_stratified_rows(labels[rows], rows.astype(str), n_max, rng))]
    names = np.unique(groups[rows])
    fold_of = dict(zip(names.tolist(), (rng.permutation(len(names)) % 2).tolist()))
    images, kept, _ = load_images(np.asarray(pool.column("path").to_pylist())[rows].tolist(), image_size)
    rows = rows[kept]
    return CurveData(images, labels[rows], np.asarray([fold_of[g] for g in groups[rows]], dtype=np.int64),
                     num_classes=int(labels[rows].max()) + 1)


def knn_curve_point(model, data: CurveData, device=None, batch_size: int = 256) -> dict:
    """kNN accuracy and balanced accuracy of ``model``'s frozen features, each fold's images the queries
    against the other fold's (safe between training steps, as :func:`knn_monitor_score`)."""
    features = extract_features(model, data.images, batch_size, device, progress=False)
    truth, predicted = [], []
    for fold in (0, 1):
        query, bank = data.folds == fold, data.folds != fold
        if query.any() and bank.any():
            predicted.append(knn_predict(features[bank], data.labels[bank], features[query], data.num_classes))
            truth.append(data.labels[query])
    m = classification_metrics(np.concatenate(truth), np.concatenate(predicted), data.num_classes)
    return {"knn_acc": m["accuracy"], "knn_balanced_acc": m["balanced_accuracy"]}


def knn_monitor_score(model, monitor_data: MonitorData, device=None, k: int = DEFAULT_K,
                      temperature: float = DEFAULT_TEMPERATURE, batch_size: int = 256) -> float:
    """kNN accuracy of ``model``'s (a :class:`ContrastiveModel`, or anything with ``.features``) frozen
    features on the monitor queries, with the monitor bank as neighbours.

    Runs like :func:`raysys.eval.features.extract_features`: eval mode, no autograd, the model's modes and
    device restored afterwards -- safe to call between training epochs (on the unwrapped DDP module).
    """
    m = monitor_data
    bank = extract_features(model, m.bank_images, batch_size, device, progress=False)
    query = extract_features(model, m.query_images, batch_size, device, progress=False)
    return knn_accuracy(bank, m.bank_labels, query, m.query_labels, m.num_classes, k, temperature)
