"""The unsupervised clustering step of cluster-aware contrastive learning (the paper's Section 4.2).

Features of every image of the pretraining pool from an encoder -> PCA-whitening to 256-d -> L2
normalization -> k-means with K clusters -> a cluster id per ``image_id``, stored as Parquet.

Encoders:

* ``"texture"``: the deep texture-clustering encoder of Panambur et al. (:mod:`raysys.models.texture`), trained
  here without labels, once per (pool, seed, settings), and kept under ``<cache>/encoders/``;
* a saved raysys model (run folder, ``model.pt``, checkpoint folder): its backbone features;
* ``"oracle"``: the true (hidden) labels as clusters, optionally with a fraction of them replaced by random
  ids (the noisy oracle of ``experiments/fn_precision.py``). For diagnostics on simulated data only: it
  uses labels, says so in a warning, and marks its table ``raysys.uses_labels = true``.

Cache layout under ``cache_dir`` (every write goes to a temporary file renamed into place, and a file
lock per entry makes concurrent trials wait for one another instead of computing the same thing twice;
with ``shared`` storage -- a sweep's ``--storage`` -- each entry is also kept there under the same
relative path, fetched when this node lacks it and published put-if-absent, so other nodes reuse it):

* ``encoders/texture-<data>-<settings>-s<seed>.pt``: a trained texture encoder;
* ``features/<encoder digest>-<data digest>.npz``: ``image_id`` and ``features`` of one encoder;
* ``clusters/<feature key>-k<K>-s<seed>.parquet``: ``image_id``, ``cluster_id`` (one K, one seed).

The data digest covers the manifest's image ids and paths, the files' sizes and modification times, and
the image size, so regenerated data at the same paths is not served stale features. The ``raysys cluster``
command is :mod:`raysys.distributed.cluster_command`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
import torch
from filelock import FileLock

from raysys import storage
from raysys.data.schema import image_key
from raysys.distributed.pipeline import decoded_dataset, progress_bars
from raysys.errors import ClusterError, ModelFileError
from raysys.models import texture
from raysys.models.backbones import embed
from raysys.models.io import load_model, model_digest
from raysys.models.texture import cluster_features, cluster_quality
from raysys.storage import atomic_local_path

log = logging.getLogger(__name__)

ENCODERS = ("texture", "oracle")  # or a path to a saved raysys model
DEFAULT_CACHE_DIR = "runs/cache"
DEFAULT_IMAGE_SIZE = 32
# The feature actor's CPU share on clusters without GPUs: small enough to run beside a Tune trial on a
# 2-CPU machine while the decode tasks still get a CPU.
ACTOR_CPUS = 0.5
EMBED_BATCH = 256

META_ENCODER = b"raysys.encoder"
META_K = b"raysys.k"
META_SEED = b"raysys.seed"
META_USES_LABELS = b"raysys.uses_labels"
META_QUALITY = b"raysys.quality"
META_CACHE_FILE = b"raysys.cache_file"

__all__ = ["ClusterError", "cluster_assignments", "cluster_features", "cluster_quality", "data_digest", "noisy_labels"]


# ----------------------------------------------------------------------------- digests and cache files


def data_digest(manifest: pa.Table, image_size: int) -> str:
    """Short hash of what determines an encoder's features: image ids, paths, file sizes and modification
    times (so data regenerated in place is seen as new), and the image size."""
    h = hashlib.blake2b(digest_size=8)
    h.update(f"{image_size}px".encode())
    for image_id, path in zip(manifest.column("image_id").to_pylist(), manifest.column("path").to_pylist()):
        try:
            st = os.stat(path)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"
        h.update(f"{image_id}\0{path}\0{stamp}\n".encode())
    return h.hexdigest()


def _short_hash(obj) -> str:
    return hashlib.blake2b(json.dumps(obj, sort_keys=True, default=str).encode(), digest_size=6).hexdigest()


@contextmanager
def _locked(file: Path):
    """Hold ``<file>.lock``: one trial computes a cache entry while the others wait for it."""
    file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(file) + ".lock"):
        yield


@contextmanager
def _entry(file: Path, cache: Path, shared: str | None):
    """Hold the cache entry ``file`` (its lock); with ``shared`` storage, fetch it from there first if this node
    lacks it, and publish it there afterwards (put-if-absent) once the block has it."""
    uri = storage.join(shared, file.relative_to(cache).as_posix()) if shared else None
    with _locked(file):
        fetched = uri is not None and not file.is_file() and storage.fetch_if_present(uri, file)
        yield
        if uri and not fetched and file.is_file():  # fetched: storage has it already
            storage.put_if_absent(file, uri)


def _write_parquet(table: pa.Table, file: Path) -> None:
    with atomic_local_path(file) as tmp:  # readers never see half a file
        pq.write_table(table, tmp)


def _save_features(file: Path, image_ids: np.ndarray, features: np.ndarray) -> None:
    with atomic_local_path(file) as tmp, open(tmp, "wb") as f:
        np.savez(f, image_id=image_ids.astype(str), features=features)


def _load_features(file: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(file, allow_pickle=False) as z:
        return z["image_id"], z["features"]


# ----------------------------------------------------------------------------- input checks


def _unique_images(manifest: pa.Table) -> pa.Table:
    """One row per ``image_id`` (HiRISE's split file repeats rows on purpose; clustering needs each once)."""
    ids = manifest.column("image_id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)
    if len(first) == manifest.num_rows:
        return manifest
    log.info("clustering %d distinct images (%d repeated manifest rows ignored)", len(first), manifest.num_rows - len(first))
    return manifest.take(np.sort(first))


def check_k(k, n_images: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise ClusterError(f"K must be an integer, got {k!r}")
    if not 2 <= k <= n_images:
        raise ClusterError(f"K={k} is out of range for {n_images} images; choose 2 <= K <= {n_images}")
    return int(k)


def manifest_labels(manifest: pa.Table) -> np.ndarray:
    return np.asarray(manifest.column("label").to_pylist(), dtype=np.int64)


# ----------------------------------------------------------------------------- Ray Data feature extraction


def _use_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) >= 1


class _Embedder:
    """Ray Data actor holding one model: uint8 ``image`` batches -> ``feature`` rows (same ``image_id``)."""

    def __init__(self, model_ref):
        model = ray.get(model_ref[0])  # wrapped in a list: Ray Data does not resolve refs in kwargs
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        self.model = model.to(self.device).eval()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with torch.inference_mode():
            features = embed(self.model, batch["image"], EMBED_BATCH, self.device)
        return {"image_id": batch["image_id"], "feature": features}


def extract_features(model: torch.nn.Module, manifest: pa.Table, image_size: int,
                     progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``model.features`` of every manifest image via Ray Data: the pipeline's decode stage feeds an actor
    pool holding the model (1 GPU per actor when the cluster has GPUs, else ``ACTOR_CPUS``).

    Returns ``(image_ids str [M], features float32 [M, D])`` in manifest order; files that cannot be
    decoded are left out (M <= rows) and counted in a warning.
    """
    gpus = int(ray.cluster_resources().get("GPU", 0))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": ACTOR_CPUS}
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, gpus))
    ds = decoded_dataset(manifest, image_size).map_batches(
        _Embedder, fn_constructor_kwargs={"model_ref": [ray.put(model)]},
        batch_size=EMBED_BATCH, batch_format="numpy", compute=pool, **resources,
    )
    keys, parts = [], []
    with progress_bars(progress):
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            keys.append(batch["image_id"])
            parts.append(batch["feature"])
    ids = manifest.column("image_id").to_pylist()
    row_of = {image_key(i): row for row, i in enumerate(ids)}
    if len(row_of) != len(ids):
        raise ClusterError("two image ids share a 64-bit key; rename one of the files")
    rows = np.array([row_of[int(k)] for k in np.concatenate(keys)], dtype=np.int64) if keys else np.zeros(0, np.int64)
    order = np.argsort(rows)
    features = np.concatenate(parts)[order].astype(np.float32) if parts else np.zeros((0, 0), np.float32)
    missing = len(ids) - len(rows)
    if missing:
        log.warning("%d of %d images could not be decoded and get no cluster id", missing, len(ids))
    return np.asarray(ids, dtype=str)[rows[order]], features


def decoded_images(manifest: pa.Table, image_size: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(row indices into manifest, uint8 images [M, S, S, 3])`` from the pipeline's decode stage, in
    manifest order; undecodable files are left out."""
    row_of = {image_key(i): row for row, i in enumerate(manifest.column("image_id").to_pylist())}
    keys, parts = [], []
    with progress_bars(progress):
        for batch in decoded_dataset(manifest, image_size).iter_batches(batch_size=None, batch_format="numpy"):
            keys.append(batch["image_id"])
            parts.append(batch["image"])
    if not keys:
        raise ClusterError("no image of the pool could be decoded; check the files (see the decode warnings)")
    rows = np.array([row_of[int(k)] for k in np.concatenate(keys)], dtype=np.int64)
    order = np.argsort(rows)
    return rows[order], np.concatenate(parts)[order]


# ----------------------------------------------------------------------------- encoders


def _texture_encoder(manifest: pa.Table, data_key: str, image_size: int, seed: int, cache: Path,
                     shared: str | None, progress: bool, settings: dict) -> torch.nn.Module:
    """The texture encoder for this pool, seed and settings: from the cache, or trained and cached."""
    cfg = texture.TextureConfig.from_dict(settings)
    file = cache / "encoders" / f"texture-{data_key}-{_short_hash(cfg.to_dict())}-s{seed}.pt"
    with _entry(file, cache, shared):
        if not file.is_file():
            rows, images = decoded_images(manifest, image_size, progress)
            labels = manifest_labels(manifest)[rows]
            diagnostic = labels if (labels >= 0).any() else None  # logged per epoch, never trained on
            log.info("training the texture encoder on %d images (%d epochs; cached as %s)", len(images), cfg.epochs, file)
            train = texture.train_texture_encoder
            if _use_gpu():  # the caller (a Tune trial's driver) may hold no GPU: train in a task that does
                train = ray.remote(num_gpus=1)(train).remote
            result = train(images, cfg, seed=seed, progress=progress, diagnostic_labels=diagnostic)
            model, history = ray.get(result) if isinstance(result, ray.ObjectRef) else result
            with atomic_local_path(file) as tmp:
                texture.save_texture_encoder(model, tmp, settings=cfg.to_dict(), history=history, seed=seed)
    return texture.load_texture_encoder(file)


def _resolve_encoder(encoder: str, manifest: pa.Table, data_key: str, image_size: int, seed: int, cache: Path,
                     shared: str | None, progress: bool, encoder_kw: dict) -> torch.nn.Module:
    if encoder == "texture":
        return _texture_encoder(manifest, data_key, image_size, seed, cache, shared, progress, encoder_kw)
    if encoder_kw:
        raise ClusterError(f"encoder settings {sorted(encoder_kw)} apply only to --encoder texture")
    try:
        return load_model(encoder)
    except ModelFileError as exc:
        raise ClusterError(f"--encoder {encoder}: {exc}") from None


# ----------------------------------------------------------------------------- the clustering step


def _metadata(encoder: str, k: int, seed: int, uses_labels: bool, quality: dict, file: Path) -> dict:
    return {META_ENCODER: str(encoder).encode(), META_K: str(k).encode(), META_SEED: str(seed).encode(),
            META_USES_LABELS: b"true" if uses_labels else b"false", META_QUALITY: json.dumps(quality).encode(),
            META_CACHE_FILE: str(file).encode()}


def _assignment_table(image_ids, cluster_ids, meta: dict) -> pa.Table:
    table = pa.table({"image_id": pa.array(image_ids, pa.string()), "cluster_id": pa.array(cluster_ids, pa.int32())})
    return table.replace_schema_metadata(meta)


def noisy_labels(labels: np.ndarray, noise: float, seed: int) -> np.ndarray:
    """``labels`` with ``round(noise * n)`` of them, drawn at random, replaced by ids drawn uniformly from the
    labels' own classes (a replaced id can land on the true one by chance): the noisy oracle."""
    if not 0.0 <= noise <= 1.0:
        raise ClusterError(f"--noise {noise:g} is out of range; choose a fraction in [0, 1]")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    replaced = rng.permutation(len(labels))[:round(noise * len(labels))]
    noisy = labels.copy()
    noisy[replaced] = rng.choice(classes, size=len(replaced))
    return noisy


def _oracle(manifest: pa.Table, k, cache: Path, noise: float = 0.0, seed: int = 0) -> pa.Table:
    labels = manifest_labels(manifest)
    known = labels >= 0
    if not known.any():
        raise ClusterError("--encoder oracle needs labels, and every image's label is unknown (-1); "
                           "use simulated data (hidden labels) or a labeled dataset")
    ids = np.asarray(manifest.column("image_id").to_pylist(), dtype=str)
    n_classes = len(np.unique(labels[known]))
    ignored = "" if k is None else f"; K={k} ignored"
    noisy = f", {noise:.0%} of them replaced by random ids" if noise else ""
    log.warning("encoder 'oracle' USES THE TRUE LABELS as clusters (%d classes%s%s): a diagnostic upper bound "
                "for simulated data, not an unsupervised result", n_classes, noisy, ignored)
    if not known.all():
        log.warning("oracle: %d images have no label and get no cluster id", int((~known).sum()))
    key = _short_hash([ids[known].tolist(), labels[known].tolist()])
    name = f"oracle-{key}" + (f"-n{noise:g}-s{seed}" if noise else "")
    file = cache / "clusters" / f"{name}.parquet"
    with _locked(file):
        if not file.is_file():
            cluster_ids = noisy_labels(labels[known], noise, seed)
            quality = cluster_quality(cluster_ids, labels[known])
            meta = _metadata("oracle", n_classes, seed, True, quality, file)
            _write_parquet(_assignment_table(ids[known], cluster_ids, meta), file)
    return pq.read_table(file)


def cluster_assignments(
    manifest: pa.Table, encoder: str, k: int, seed: int = 0, cache_dir: str | Path = DEFAULT_CACHE_DIR,
    image_size: int = DEFAULT_IMAGE_SIZE, progress: bool = True, encoder_seed: int | None = None, noise: float = 0.0,
    shared: str | None = None, **encoder_kw,
) -> pa.Table:
    """Cluster ids of the manifest's images: a table ``image_id`` (string), ``cluster_id`` (int32).

    ``encoder``: ``"texture"`` (trained here, settings in ``encoder_kw``, see
    :class:`raysys.models.texture.TextureConfig`), ``"oracle"`` (true labels; K ignored; ``noise``: the fraction
    of them replaced by random ids, drawn with ``seed``, see :func:`noisy_labels`) or a saved raysys model.
    Features come from Ray Data (the caller starts Ray) and are cached per (encoder, data); each K and
    seed reruns only k-means, itself cached as Parquet (see the module docstring), and also in ``shared``
    storage when given (the oracle's cheap table is not). Schema metadata:
    ``raysys.encoder``, ``raysys.k``, ``raysys.seed``, ``raysys.uses_labels`` (``true`` only for the
    oracle), ``raysys.quality`` (JSON NMI/purity against known labels, ``{}`` without) and
    ``raysys.cache_file``. ``seed`` seeds k-means and, unless ``encoder_seed`` is given, the texture encoder.
    """
    if manifest.num_rows == 0:
        raise ClusterError("the manifest holds no images; pass a folder of images")
    manifest = _unique_images(manifest)
    cache = Path(cache_dir)
    if encoder == "oracle":
        return _oracle(manifest, k, cache, noise, seed)
    if noise:
        raise ClusterError(f"noise={noise:g} applies only to --encoder oracle (the noisy oracle), not {encoder}")
    k = check_k(k, manifest.num_rows)
    if image_size < 8:
        raise ClusterError(f"image_size must be at least 8 pixels, got {image_size}")
    data_key = data_digest(manifest, image_size)
    model = _resolve_encoder(encoder, manifest, data_key, image_size, seed if encoder_seed is None else encoder_seed,
                             cache, shared, progress, encoder_kw)
    feature_key = f"{model_digest(model)}-{data_key}"
    feature_file = cache / "features" / f"{feature_key}.npz"
    cluster_file = cache / "clusters" / f"{feature_key}-k{k}-s{seed}.parquet"
    if cluster_file.is_file():
        return pq.read_table(cluster_file)
    with _entry(cluster_file, cache, shared):
        if not cluster_file.is_file():
            with _entry(feature_file, cache, shared):  # inside: features are not fetched when the clusters were
                if not feature_file.is_file():
                    _save_features(feature_file, *extract_features(model, manifest, image_size, progress))
            image_ids, features = _load_features(feature_file)
            k = check_k(k, len(image_ids))  # undecodable files may have left fewer images than rows
            ids = cluster_features(features, k, seed)
            labels = manifest_labels(manifest)
            row_of = {i: r for r, i in enumerate(manifest.column("image_id").to_pylist())}
            quality = cluster_quality(ids, labels[[row_of[i] for i in image_ids]])
            if quality:
                log.info("clusters of %s, K=%d: NMI %.3f, purity %.3f against %d known labels",
                         encoder, k, quality["nmi"], quality["purity"], quality["n_labeled"])
            _write_parquet(_assignment_table(image_ids, ids, _metadata(encoder, k, seed, False, quality, cluster_file)),
                           cluster_file)
    return pq.read_table(cluster_file)


def add_texture_arguments(p: argparse.ArgumentParser) -> None:
    """The texture encoder's options shared by ``raysys cluster`` and ``experiments/sweep_k.py``."""
    p.add_argument("--texture-colour-invariant", action="store_true",
                   help="train the texture encoder with SimCLR's colour jitter and grayscale, so its clusters "
                        "cannot follow a traverse's colour cast")
    p.add_argument("--texture-weights", help="start the texture encoder's ResNet trunk from this weights file "
                                             "(same architecture and width; the paper's was pretrained)")


def texture_settings(args) -> dict:
    """The texture options given on the command line, as TextureConfig fields."""
    given = {"epochs": getattr(args, "texture_epochs", None), "init_weights": args.texture_weights,
             "colour_invariant": args.texture_colour_invariant or None}
    return {key: value for key, value in given.items() if value is not None}
