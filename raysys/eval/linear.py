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
import json
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raysys.config.schema import PROBE_ACTIVATIONS
from raysys.data.formats import class_names, read_manifest
from raysys.errors import ConfigError, DataError
from raysys.eval.features import LABELED_SPLITS, benchmark_features
from raysys.models.io import load_saved, model_digest, resolve_model_file, run_folder

DEFAULT_IMAGE_SIZE = 32
# The probe's optimiser is the paper's (Appendix A, Table 3, "used in all contrastive training / linear evaluation
# experiments"): Adam at 3e-4, weight decay 1e-6, batch 128. The paper gives no probe epoch count; ours is the
# pretraining preset's eval_epochs (smoke 30, demo 100) or --epochs.
PROBE_LR, PROBE_WEIGHT_DECAY, PROBE_BATCH_SIZE = 3e-4, 1e-6, 128
# Sec. 4.4's "single dense / linear layer of 128 neurons" is read as one linear layer of 128 units before the class
# layer, so the probe stays linear (a rank-128 map); activation "relu" makes it an MLP (PROBE_ACTIVATIONS).


# ----------------------------------------------------------------------------- probe and metrics


def classification_metrics(y_true, y_pred, num_classes: int) -> dict:
    """Accuracy, class-balanced accuracy (mean per-class recall over classes present in ``y_true``), macro-F1
    (mean per-class F1 over the same classes), per-class accuracy ``{class_id: recall}`` for present classes and
    the confusion matrix (rows: true, columns: predicted, ``num_classes`` x ``num_classes``)."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    if len(y_true) == 0 or len(y_true) != len(y_pred):
        raise ValueError(f"need equally many true and predicted labels, at least one (got {len(y_true)} and {len(y_pred)})")
    from sklearn.metrics import (  # here: 1.6 s to import, paid by every
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
    )
    # Ray Train worker that loads this module for the kNN monitor, which never calls this

    cm = confusion_matrix(y_true, y_pred, labels=list(range(num_classes)))
    with warnings.catch_warnings():  # predictions of classes absent from y_true are expected, not a problem
        warnings.simplefilter("ignore", UserWarning)
        balanced = float(balanced_accuracy_score(y_true, y_pred))
    present = np.flatnonzero(cm.sum(axis=1))
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "balanced_accuracy": balanced,
        "macro_f1": float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        "per_class_accuracy": {int(c): float(cm[c, c] / cm[c].sum()) for c in present},
        "confusion_matrix": cm.tolist(),
        "n_test": int(len(y_true)),
    }


class LinearProbe(nn.Module):
    """Standardize with the train statistics, then a linear layer (``hidden=0``) or the paper's dense layer,
    ``Linear(D, hidden) -> Linear(hidden, C)``, with a ReLU between them when ``activation="relu"``."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, num_classes: int, hidden: int = 0,
                 activation: str = "none"):
        super().__init__()
        if activation not in PROBE_ACTIVATIONS:
            raise ValueError(f"probe activation {activation!r} is unknown; choose one of {PROBE_ACTIVATIONS}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)
        dim = mean.numel()
        if hidden:
            between = [nn.ReLU()] if activation == "relu" else []
            self.net = nn.Sequential(nn.Linear(dim, hidden), *between, nn.Linear(hidden, num_classes))
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
    train_x, train_y, num_classes: int, hidden: int = 0, epochs: int = 100, lr: float = PROBE_LR,
    weight_decay: float = PROBE_WEIGHT_DECAY, batch_size: int = PROBE_BATCH_SIZE, seed: int = 0,
    activation: str = "none",
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
        probe = LinearProbe(mean, std, num_classes, hidden, activation)
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
    train_x, train_y, test_x, test_y, num_classes: int, hidden: int = 0, epochs: int = 100, lr: float = PROBE_LR,
    weight_decay: float = PROBE_WEIGHT_DECAY, batch_size: int = PROBE_BATCH_SIZE, seed: int = 0,
    activation: str = "none",
) -> dict:
    """Train a probe on (``train_x``, ``train_y``) and score it on the test split.

    Returns :func:`classification_metrics` on test plus ``n_train`` and ``train_accuracy``.
    """
    test_x, test_y = np.asarray(test_x, dtype=np.float32), np.asarray(test_y, dtype=np.int64)
    _check_probe_inputs(test_x, test_y, num_classes, "test")
    if test_x.shape[1] != np.shape(train_x)[1]:
        raise ValueError(f"train and test features differ in width ({np.shape(train_x)[1]} vs {test_x.shape[1]})")
    probe = train_probe(train_x, train_y, num_classes, hidden, epochs, lr, weight_decay, batch_size, seed, activation)
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
    cache_dir=None, lr: float = PROBE_LR, weight_decay: float = PROBE_WEIGHT_DECAY,
    batch_size: int = PROBE_BATCH_SIZE, device=None, progress: bool = True, activation: str = "none",
) -> dict:
    """Linear evaluation of ``model``'s frozen features on one benchmark; writes ``eval-<name>.json``.

    The probe is fitted on train and scored on test (and on val when present, for model selection that
    does not look at test). The backbone's digest is checked before and after, so a run whose features
    came from a changed model cannot be reported.
    """
    if not name or Path(name).name != name:
        raise ValueError(f"name {name!r} must be a plain file-name part (no folders)")
    manifest, names = load_benchmark(benchmark_root)
    data = benchmark_features(model, manifest, image_size, cache_dir=cache_dir, device=device, progress=progress)
    for split in ("train", "test"):
        if len(data[split]["y"]) == 0:
            raise DataError(f"benchmark {benchmark_root}: no {split} image could be decoded ({len(data['skipped'])} skipped)")
    if model_digest(model) != data["model_digest"]:
        raise RuntimeError("the model changed during feature extraction; the evaluation is void")
    settings = dict(hidden=hidden, activation=activation, epochs=epochs, lr=lr, weight_decay=weight_decay,
                    batch_size=batch_size, seed=seed)
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
    p.add_argument("--hidden", type=int, choices=(0, 128), default=0,
                   help="0: one linear layer (default); 128: the paper's 128-unit dense layer before the class layer")
    p.add_argument("--activation", choices=PROBE_ACTIVATIONS, default="none",
                   help="with --hidden 128: none keeps the probe linear (the paper's reading, default), relu makes it an MLP")
    p.add_argument("--epochs", type=int, default=100, help="probe training epochs (default: %(default)s; the paper gives none)")
    p.add_argument("--lr", type=float, default=PROBE_LR, help="probe Adam learning rate (default: %(default)s, Appendix A)")
    p.add_argument("--weight-decay", type=float, default=PROBE_WEIGHT_DECAY,
                   help="probe weight decay (default: %(default)s, Appendix A)")
    p.add_argument("--batch-size", type=int, default=PROBE_BATCH_SIZE, help="probe batch size (default: %(default)s, Appendix A)")
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
    if args.epochs < 1 or args.batch_size < 1:
        raise ConfigError(f"--epochs and --batch-size must be at least 1 (got {args.epochs} and {args.batch_size})")
    if args.lr <= 0 or args.weight_decay < 0:
        raise ConfigError(f"--lr must be positive and --weight-decay non-negative (got {args.lr} and {args.weight_decay})")
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
                     cache_dir=cache_dir, lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                     device=args.device, activation=args.activation)
        metrics = r["metrics"]
        rows.append((name, metrics["accuracy"], metrics["balanced_accuracy"], r["majority"]["accuracy"], len(r["skipped"])))
    width = max(len("benchmark"), *(len(r[0]) for r in rows))
    print(f"{'benchmark':<{width}}  accuracy  balanced  majority  skipped")
    for name, acc, bal, maj, skipped in rows:
        print(f"{name:<{width}}  {acc:8.2%}  {bal:8.2%}  {maj:8.2%}  {skipped:7d}")
    print(f"results: {out}/eval-<benchmark>.json")
    return 0
