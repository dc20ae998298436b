"""Linear evaluation of a frozen pretrained backbone on a labeled benchmark (the paper's Section 4.4).

Protocol: precompute backbone features for every benchmark image with the contrastively trained model
left untouched, fit a classifier on the train split's features (a single linear layer, or the paper's
variant with one 128-unit dense layer), and report accuracy on the test split. Plain accuracy is shown
beside class-balanced accuracy and the majority-class baseline, because both benchmarks are dominated by
one class (MSL v2.1 test: 31.2 % "Nearby surface"; HiRISE v3.2 test: 82.7 % "other").

Features are cached per (model weights, manifest content, image size), so evaluating one checkpoint
again (another probe variant, another seed) decodes and embeds nothing.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from sklearn.metrics import balanced_accuracy_score, confusion_matrix
from torch import nn
from tqdm.auto import tqdm

from raysys import storage
from raysys.data.decode import load_images
from raysys.data.formats import class_names, read_manifest
from raysys.errors import ConfigError, DataError
from raysys.models.backbones import embed
from raysys.models.io import load_saved, model_digest, resolve_model_file, run_folder

LABELED_SPLITS = ("train", "val", "test")
DEFAULT_IMAGE_SIZE = 32


# ----------------------------------------------------------------------------- features


def _default_device(device) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def _frozen(model: nn.Module, device: torch.device):
    """Run ``model`` in eval mode, without autograd, on ``device``; restore every submodule's mode and
    the model's device afterwards (parameters are only read)."""
    modes = [(m, m.training) for m in model.modules()]
    first = next(model.parameters(), None)
    home = first.device if first is not None else device
    model.eval().to(device)
    try:
        with torch.inference_mode():
            yield
    finally:
        model.to(home)
        for module, training in modes:
            module.training = training


def _check_images(images) -> None:
    ok = isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
    if not ok:
        got = f"{type(images).__name__} {getattr(images, 'dtype', '')} {getattr(images, 'shape', '')}"
        raise ValueError(f"images must be a uint8 numpy array [N, S, S, 3], got {got}")


def extract_features(
    model, images: np.ndarray, batch_size: int = 256, device=None, progress: bool = True
) -> np.ndarray:
    """Frozen-backbone features ``float32 [N, D]`` of uint8 ``[N, S, S, 3]`` images.

    Runs in eval mode under ``torch.inference_mode`` on ``device`` (cuda when available, else cpu); the
    model's parameters, buffers, device and per-module train/eval modes are the same afterwards.
    """
    _check_images(images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    device = _default_device(device)
    with _frozen(model, device), tqdm(total=len(images), unit="img", desc="features", disable=not progress) as bar:
        return embed(model, images, batch_size, device, bar.update)


def manifest_digest(manifest) -> str:
    """Short hash of the manifest rows that determine the features and labels (path, split, label)."""
    h = hashlib.blake2b(digest_size=8)
    for column in ("path", "split", "label"):
        h.update(json.dumps([column, manifest.column(column).to_pylist()]).encode())
    return h.hexdigest()


def _decoded_chunks(paths: list[str], size: int, chunk: int, workers: int):
    """Yield ``(start, images, kept, bad)`` per chunk of ``paths`` in order, decoding a few chunks ahead in
    threads (PIL releases the GIL while decoding); at most ``workers + 1`` chunks are held in memory."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = collections.deque()
        for start in range(0, len(paths), chunk):
            pending.append((start, pool.submit(load_images, paths[start : start + chunk], size)))
            if len(pending) > workers:
                first, future = pending.popleft()
                yield (first, *future.result())
        while pending:
            first, future = pending.popleft()
            yield (first, *future.result())


def _split_features(model, manifest, split, image_size, batch_size, device, workers, progress):
    """Decode and embed one split; returns its arrays and the files that could not be decoded."""
    rows = manifest.filter(pc.equal(manifest.column("split"), split))
    paths = rows.column("path").to_pylist()
    labels = np.asarray(rows.column("label").to_pylist(), dtype=np.int64)
    ids = np.asarray(rows.column("image_id").to_pylist(), dtype=str)
    feats, kept_rows, skipped = [], [], []
    with tqdm(total=len(paths), unit="img", desc=f"{split} features", disable=not progress) as bar:
        for start, images, kept, bad in _decoded_chunks(paths, image_size, batch_size, workers):
            feats.append(embed(model, images, batch_size, device))
            kept_rows.append(start + kept)
            skipped += [{"split": split, "path": p, "reason": r} for p, r in bad]
            bar.update(len(kept) + len(bad))
    keep = np.concatenate(kept_rows)
    return {"x": np.concatenate(feats), "y": labels[keep], "image_id": ids[keep]}, skipped


def _save_cache(file: Path, result: dict) -> None:
    arrays = {f"{s}_{k}": v for s in LABELED_SPLITS if s in result for k, v in result[s].items()}
    for key in ("split", "path", "reason"):
        arrays[f"skipped_{key}"] = np.asarray([row[key] for row in result["skipped"]], dtype=str)
    with storage.atomic_local_path(file) as tmp, open(tmp, "wb") as f:  # a concurrent reader never sees half a file
        np.savez(f, **arrays)


def _load_cache(file: Path) -> dict:
    with np.load(file, allow_pickle=False) as z:
        result = {s: {k: z[f"{s}_{k}"] for k in ("x", "y", "image_id")} for s in LABELED_SPLITS if f"{s}_x" in z}
        columns = [z[f"skipped_{k}"].tolist() for k in ("split", "path", "reason")]
    result["skipped"] = [dict(zip(("split", "path", "reason"), row)) for row in zip(*columns)]
    return result


def benchmark_features(
    model,
    manifest,
    image_size: int,
    cache_dir: str | Path | None = None,
    batch_size: int = 256,
    device=None,
    workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Features and labels of every labeled split (train/val/test) present in ``manifest``.

    Returns ``{split: {"x": float32 [N, D], "y": int64 [N], "image_id": str [N]}, "skipped": [{split,
    path, reason}], "model_digest", "manifest_digest", "cache_file", "cache_hit"}``. Files that cannot be
    decoded are left out and listed in ``skipped``. With ``cache_dir`` the result is stored as ``.npz``
    keyed by (model digest, manifest digest, image size) and reused on the next call.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be a positive integer, got {image_size}")
    digests = {"model_digest": model_digest(model), "manifest_digest": manifest_digest(manifest)}
    cache_file = None
    if cache_dir is not None:
        key = f"{digests['model_digest']}-{digests['manifest_digest']}-{image_size}px"
        cache_file = Path(cache_dir) / f"features-{key}.npz"
        if cache_file.is_file():
            return {**_load_cache(cache_file), **digests, "cache_file": str(cache_file), "cache_hit": True}
    present = set(manifest.column("split").to_pylist())
    device = _default_device(device)
    workers = workers or min(8, os.cpu_count() or 1)
    result = {"skipped": []}
    with _frozen(model, device):
        for split in (s for s in LABELED_SPLITS if s in present):
            result[split], skipped = _split_features(
                model, manifest, split, image_size, batch_size, device, workers, progress)
            result["skipped"] += skipped
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        _save_cache(cache_file, result)
    return {**result, **digests, "cache_file": None if cache_file is None else str(cache_file), "cache_hit": False}


# ----------------------------------------------------------------------------- probe and metrics


def classification_metrics(y_true, y_pred, num_classes: int) -> dict:
    """Accuracy, class-balanced accuracy (mean per-class recall over classes present in ``y_true``),
    per-class accuracy ``{class_id: recall}`` for present classes and the confusion matrix (rows: true,
    columns: predicted, ``num_classes`` x ``num_classes``)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0 or len(y_true) != len(y_pred):
        raise ValueError(f"need equally many true and predicted labels, at least one (got {len(y_true)} and {len(y_pred)})")
    cm = confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))
    with warnings.catch_warnings():  # predictions of classes absent from y_true are expected, not a problem
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y_true, y_pred))
    present = np.flatnonzero(cm.sum(axis=1))
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": balanced,
        "per_class_accuracy": {int(c): float(cm[c, c] / cm[c].sum()) for c in present},
        "confusion_matrix": cm.tolist(),
        "n_test": int(len(y_true)),
    }


class LinearProbe(nn.Module):
    """Standardize with the train statistics, then a linear layer (``hidden=0``) or the paper's
    ``Linear(D, hidden) -> ReLU -> Linear(hidden, C)``."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int, hidden: int = 0):
        super().__init__()
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        dim = mean.numel()
        if hidden:
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
        else:
            self.net = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)

    @torch.no_grad()
    def predict(self, x: np.ndarray, batch_size: int = 8192) -> np.ndarray:
        """Predicted class ids of features ``x`` ``[N, D]``."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        parts = [self(x[i : i + batch_size]).argmax(1).numpy() for i in range(0, len(x), batch_size)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)


def _check_probe_inputs(x, y, num_classes: int, what: str) -> None:
    if x.ndim != 2 or len(x) != len(y) or len(x) == 0:
        raise ValueError(f"{what} features must be [N, D] with N = len(labels) > 0, got {x.shape} and {len(y)} labels")
    if y.min() < 0 or y.max() >= num_classes:
        raise ValueError(f"{what} labels must lie in [0, {num_classes}), found {y.min()}..{y.max()}")


def train_probe(
    train_x, train_y, num_classes: int, hidden: int = 0, epochs: int = 100, lr: float = 1e-3,
    weight_decay: float = 0.0, batch_size: int = 256, seed: int = 0,
) -> LinearProbe:
    """Fit a :class:`LinearProbe` on CPU with Adam and cross-entropy; the result depends only on the
    inputs and ``seed`` (initialisation and shuffling use their own generator; global RNG untouched)."""
    x = torch.as_tensor(np.asarray(train_x, dtype=np.float32))
    y = torch.as_tensor(np.asarray(train_y, dtype=np.int64))
    _check_probe_inputs(x, y, num_classes, "train")
    if hidden < 0 or epochs < 1 or batch_size < 1:
        raise ValueError(f"need hidden >= 0, epochs >= 1 and batch_size >= 1 (got {hidden}, {epochs}, {batch_size})")
    mean, std = x.mean(0), x.std(0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))  # constant features: leave them centred, not NaN
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe = LinearProbe(mean, std, num_classes, hidden)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(probe.net.parameters(), lr=lr, weight_decay=weight_decay)
    xs = (x - mean) / std  # standardize once; the net then trains on standardized rows directly
    for _ in range(epochs):
        for idx in torch.randperm(len(xs), generator=generator).split(batch_size):
            loss = nn.functional.cross_entropy(probe.net(xs[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return probe.eval()


def linear_probe(
    train_x, train_y, test_x, test_y, num_classes: int, hidden: int = 0, epochs: int = 100, lr: float = 1e-3,
    weight_decay: float = 0.0, batch_size: int = 256, seed: int = 0,
) -> dict:
    """Train a probe on (``train_x``, ``train_y``) and score it on the test split.

    Returns :func:`classification_metrics` on test plus ``n_train`` and ``train_accuracy``.
    """
    test_x, test_y = np.asarray(test_x, dtype=np.float32), np.asarray(test_y, dtype=np.int64)
    _check_probe_inputs(test_x, test_y, num_classes, "test")
    if test_x.shape[1] != np.shape(train_x)[1]:
        raise ValueError(f"train and test features differ in width ({np.shape(train_x)[1]} vs {test_x.shape[1]})")
    probe = train_probe(train_x, train_y, num_classes, hidden, epochs, lr, weight_decay, batch_size, seed)
    return _probe_metrics(probe, train_x, train_y, test_x, test_y, num_classes)


def _probe_metrics(probe: LinearProbe, train_x, train_y, test_x, test_y, num_classes: int) -> dict:
    result = classification_metrics(test_y, probe.predict(test_x), num_classes)
    result["n_train"] = int(len(train_y))
    result["train_accuracy"] = float(np.mean(probe.predict(train_x) == np.asarray(train_y)))
    return result


def majority_baseline(train_y, test_y, num_classes: int | None = None) -> dict:
    """Metrics of always predicting the most frequent train class (lowest id on ties)."""
    train_y, test_y = np.asarray(train_y, dtype=np.int64), np.asarray(test_y, dtype=np.int64)
    if len(train_y) == 0:
        raise ValueError("majority baseline needs at least one train label")
    num_classes = num_classes or int(max(train_y.max(), test_y.max(initial=0))) + 1
    majority = int(np.bincount(train_y, minlength=num_classes).argmax())
    result = classification_metrics(test_y, np.full(len(test_y), majority), num_classes)
    result.update(n_train=int(len(train_y)), majority_class=majority)
    return result


# ----------------------------------------------------------------------------- the whole evaluation


def load_benchmark(root: str | Path):
    """Read a labeled benchmark; one-line :class:`ValueError` unless it has train and test rows whose
    labels are valid class ids. Returns ``(manifest, class_names)``."""
    manifest = read_manifest(root)
    names = class_names(manifest)
    if not names:
        raise DataError(f"{root} has no class map, so it is not a labeled benchmark; pass an MSL or HiRISE folder")
    splits = manifest.column("split").to_pylist()
    for split in ("train", "test"):
        if split not in splits:
            raise DataError(f"benchmark {root} has no {split!r} rows; linear evaluation needs a labeled train and test split")
    labels = np.asarray(manifest.column("label").to_pylist())[np.isin(splits, LABELED_SPLITS)]
    if labels.min() < 0 or labels.max() >= len(names):
        raise DataError(f"benchmark {root} has labels outside 0..{len(names) - 1} (its class map has {len(names)} classes)")
    return manifest, names


def evaluate(
    model, benchmark_root, out_dir, name: str, image_size: int, hidden: int = 0, epochs: int = 100, seed: int = 0,
    cache_dir=None, lr: float = 1e-3, weight_decay: float = 0.0, batch_size: int = 256, device=None,
    progress: bool = True,
) -> dict:
    """Linear evaluation of ``model``'s frozen features on one benchmark; writes ``eval-<name>.json``.

    The probe is fitted on train and scored on test (and on val when present, for model selection that
    does not look at test). The backbone's digest is checked before and after, so a run whose features
    came from a changed model cannot be reported.
    """
    if not name or Path(name).name != name:
        raise ValueError(f"name {name!r} must be a plain file-name part (no folders)")
    manifest, names = load_benchmark(benchmark_root)
    data = benchmark_features(model, manifest, image_size, cache_dir=cache_dir, batch_size=batch_size,
                              device=device, progress=progress)
    for split in ("train", "test"):
        if len(data[split]["y"]) == 0:
            raise DataError(f"benchmark {benchmark_root}: no {split} image could be decoded ({len(data['skipped'])} skipped)")
    if model_digest(model) != data["model_digest"]:
        raise RuntimeError("the model changed during feature extraction; the evaluation is void")
    settings = dict(hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay, batch_size=batch_size, seed=seed)
    (train_x, train_y), (test_x, test_y) = ((data[s]["x"], data[s]["y"]) for s in ("train", "test"))
    probe = train_probe(train_x, train_y, len(names), **settings)
    result = {
        "name": name,
        "benchmark": str(Path(benchmark_root).resolve()),
        "model_digest": data["model_digest"],
        "manifest_digest": data["manifest_digest"],
        "backbone_unchanged": True,
        "image_size": image_size,
        "feature_dim": int(train_x.shape[1]),
        "probe": {**settings, "optimizer": "adam", "standardize": "train mean/std"},
        "metrics": _probe_metrics(probe, train_x, train_y, test_x, test_y, len(names)),
        "majority": majority_baseline(train_y, test_y, len(names)),
        "class_names": names,
        "counts": {
            s: {"rows": int(manifest.column("split").to_pylist().count(s)), "used": int(len(data[s]["y"])),
                "per_class": np.bincount(data[s]["y"], minlength=len(names)).tolist()}
            for s in LABELED_SPLITS if s in data
        },
        "skipped": data["skipped"],
        "features_cached": data["cache_hit"],
    }
    if "val" in data and len(data["val"]["y"]):
        result["val_metrics"] = classification_metrics(data["val"]["y"], probe.predict(data["val"]["x"]), len(names))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"eval-{name}.json").write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- command line


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raysys linear-eval``."""
    p.add_argument("--model", required=True, help="run folder (model.pt), checkpoint directory (state.pt) or the saved file")
    p.add_argument("--benchmark", required=True, action="append", help="labeled dataset folder (MSL v2.1, HiRISE v3.2, ...); repeatable")
    p.add_argument("--out", help="where eval-<benchmark>.json goes (default: the run folder)")
    p.add_argument("--image-size", type=int, help=f"pixels (default: the run's image_size, else {DEFAULT_IMAGE_SIZE})")
    p.add_argument("--hidden", type=int, choices=(0, 128), default=0, help="0: linear probe; 128: the paper's 128-unit dense layer")
    p.add_argument("--epochs", type=int, default=100, help="probe training epochs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-dir", help="feature cache (default: <out>/feature-cache)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write cached features")
    p.add_argument("--device", help="torch device for feature extraction (default: cuda if available, else cpu)")
    return p


def _benchmark_names(roots: list[str]) -> list[str]:
    names, seen = [], collections.Counter()
    for root in roots:
        base = Path(root).resolve().name
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}-{seen[base]}")
    return names


def run(args: argparse.Namespace) -> int:
    """``raysys linear-eval``: evaluate one saved model on each ``--benchmark``; prints a table."""
    if args.epochs < 1:
        raise ConfigError(f"--epochs must be at least 1 (got {args.epochs})")
    if args.image_size is not None and args.image_size < 8:
        raise ConfigError(f"--image-size must be at least 8 (got {args.image_size})")
    missing = [b for b in args.benchmark if not Path(b).is_dir()]
    if missing:
        raise ConfigError(f"--benchmark {missing[0]} is not a folder; pass the unpacked dataset folder")
    model_file = resolve_model_file(args.model)
    for root in args.benchmark:  # read every manifest first: fail on a bad one before any heavy work
        load_benchmark(root)
    model, config = load_saved(model_file)
    out = Path(args.out) if args.out else run_folder(model_file)
    image_size = args.image_size or int(config.get("image_size") or DEFAULT_IMAGE_SIZE)
    cache_dir = None if args.no_cache else (args.cache_dir or out / "feature-cache")
    rows = []
    for root, name in zip(args.benchmark, _benchmark_names(args.benchmark)):
        r = evaluate(model, root, out, name, image_size, hidden=args.hidden, epochs=args.epochs, seed=args.seed,
                     cache_dir=cache_dir, device=args.device)
        metrics = r["metrics"]
        rows.append((name, metrics["accuracy"], metrics["balanced_accuracy"], r["majority"]["accuracy"], len(r["skipped"])))
    width = max(len("benchmark"), *(len(r[0]) for r in rows))
    print(f"{'benchmark':<{width}}  accuracy  balanced  majority  skipped")
    for name, acc, bal, maj, skipped in rows:
        print(f"{name:<{width}}  {acc:8.2%}  {bal:8.2%}  {maj:8.2%}  {skipped:7d}")
    print(f"results: {out}/eval-<benchmark>.json")
    return 0
