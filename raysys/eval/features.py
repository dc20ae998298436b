"""Frozen-backbone features: of images in memory (:func:`extract_features`), of files (:func:`path_features`)
and of every labeled split of a benchmark, cached (:func:`benchmark_features`). The model is run in eval
mode without autograd and left exactly as it was; the embedding loop itself is
:func:`raysys.models.backbones.embed`.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from torch import nn
from tqdm.auto import tqdm

from raysys import storage
from raysys.data.decode import load_images
from raysys.models.backbones import embed
from raysys.models.io import model_digest

LABELED_SPLITS = ("train", "val", "test")


def default_device(device) -> torch.device:
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


@contextlib.contextmanager
def frozen(model: nn.Module, device: torch.device):
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
    device = default_device(device)
    with frozen(model, device), tqdm(total=len(images), unit="img", desc="features", disable=not progress) as bar:
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


def path_features(model, paths: list[str], image_size: int, batch_size: int, device, workers: int, bar=None):
    """``(features float32 [M, D], kept positions in paths [M], [(path, reason)] of undecodable files)``:
    the files decoded in chunks a few ahead (threads) and embedded; call it inside :func:`frozen`."""
    if not paths:
        return embed(model, np.zeros((0, image_size, image_size, 3), np.uint8), 1, device), np.zeros(0, np.int64), []
    feats, kept_rows, skipped = [], [], []
    for start, images, kept, bad in _decoded_chunks(paths, image_size, batch_size, workers):
        feats.append(embed(model, images, batch_size, device))
        kept_rows.append(start + kept)
        skipped += bad
        if bar is not None:
            bar.update(len(kept) + len(bad))
    return np.concatenate(feats), np.concatenate(kept_rows), skipped


def _split_features(model, manifest, split, image_size, batch_size, device, workers, progress):
    """Decode and embed one split; returns its arrays and the files that could not be decoded."""
    rows = manifest.filter(pc.equal(manifest.column("split"), split))
    labels = np.asarray(rows.column("label").to_pylist(), dtype=np.int64)
    ids = np.asarray(rows.column("image_id").to_pylist(), dtype=str)
    with tqdm(total=rows.num_rows, unit="img", desc=f"{split} features", disable=not progress) as bar:
        x, keep, bad = path_features(model, rows.column("path").to_pylist(), image_size, batch_size, device, workers, bar)
    return {"x": x, "y": labels[keep], "image_id": ids[keep]}, [{"split": split, "path": p, "reason": r} for p, r in bad]


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
    device = default_device(device)
    workers = workers or min(8, os.cpu_count() or 1)
    result = {"skipped": []}
    with frozen(model, device):
        for split in (s for s in LABELED_SPLITS if s in present):
            result[split], skipped = _split_features(
                model, manifest, split, image_size, batch_size, device, workers, progress)
            result["skipped"] += skipped
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        _save_cache(cache_file, result)
    return {**result, **digests, "cache_file": None if cache_file is None else str(cache_file), "cache_hit": False}
