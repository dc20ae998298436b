"""Ray Data pipeline: manifest -> read bytes -> decode (bad files skipped and reported) -> two views.

Two stages, both ``map_batches`` over whole batches:

1. :func:`decode_batch` reads each row's file, decodes and resizes it to ``image_size`` (one bad file
   never aborts the dataset, unlike ``read_images``); bad files are dropped and, with files
   converted from 16-bit/CMYK/alpha, sent to a :class:`FileReport` actor that the driver lists in the
   run folder.
   The decoded, resized images may be materialized once and reused every epoch (``cache_decoded``).
2. :func:`two_views_batch` draws two SimCLR views for the whole batch at once with tensor ops
   (``raysys.data.augment.two_views``). It is never materialized, so every epoch sees fresh views.

The output columns are documented in :mod:`raysys.data.schema`.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from raysys.data.decode import CONVERTED_MODES, DecodeError, decode
from raysys.data.paired import canonical_order
from raysys.data.schema import VIEW1, VIEW2, image_key
from raysys.errors import ConfigError

log = logging.getLogger(__name__)

# Rows per decode/augment batch: large enough that per-batch overhead is small, small enough to
# keep several blocks in flight on a 2-core machine.
BATCH_ROWS = 256


@ray.remote(num_cpus=0)
class FileReport:
    """Collects, once per path and across all decode tasks, the files skipped and the files converted."""

    def __init__(self):
        self._notes = {"skipped": {}, "converted": {}}

    def add(self, kind: str, items: list[tuple[str, str]]) -> None:
        for path, note in items:
            self._notes[kind].setdefault(path, note)

    def items(self, kind: str) -> list[tuple[str, str]]:
        return sorted(self._notes[kind].items())


def write_file_report(report, out_dir: str | Path) -> dict[str, list[tuple[str, str]]]:
    """Write ``skipped-files.tsv`` (path, reason) and ``converted-files.tsv`` (path, source mode)."""
    notes = {kind: ray.get(report.items.remote(kind)) for kind in ("skipped", "converted")}
    for kind, items in notes.items():
        if items:
            path = Path(out_dir) / f"{kind}-files.tsv"
            path.write_text("".join(f"{p}\t{note}\n" for p, note in items))
            log.warning("%s %d image(s); list in %s", kind, len(items), path)
    return notes


def decode_batch(batch: dict[str, np.ndarray], image_size: int, domains: list[str], report=None) -> dict[str, np.ndarray]:
    """Decode a batch of manifest rows into ``image`` uint8 [n, S, S, 3] plus numeric metadata."""
    images, keep, skipped, converted = [], [], [], []
    for i, path in enumerate(batch["path"]):
        try:
            with open(path, "rb") as f:
                image, mode = decode(f.read(), image_size)
        except (DecodeError, OSError) as exc:
            skipped.append((str(path), str(exc)))
            continue
        images.append(image)
        keep.append(i)
        if mode in CONVERTED_MODES:
            converted.append((str(path), mode))
    if report is not None:
        for kind, items in (("skipped", skipped), ("converted", converted)):
            if items:
                report.add.remote(kind, items)
    keep = np.asarray(keep, dtype=np.int64)
    domain_index = {d: i for i, d in enumerate(domains)}
    out = {
        "image": np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8),
        "image_id": np.array([image_key(str(s)) for s in batch["image_id"][keep]], dtype=np.int64),
        "label": batch["label"][keep].astype(np.int64),
        "domain": np.array([domain_index[str(d)] for d in batch["domain"][keep]], dtype=np.int64),
        "x": batch["x"][keep].astype(np.float32),
        "y": batch["y"][keep].astype(np.float32),
        "heading": batch["heading"][keep].astype(np.float32),
    }
    if "cluster_id" in batch:
        out["cluster_id"] = batch["cluster_id"][keep].astype(np.int64)
    return out


def two_views_batch(batch: dict[str, np.ndarray], augment: dict) -> dict[str, np.ndarray]:
    """Replace ``image`` by two independently augmented float views (fresh randomness every call)."""
    # torch and torchvision here, not at the top: a decode task's fresh process would spend ~6 s of a
    # 2-core machine importing them, and decoding needs neither.
    import torch

    from raysys.data.augment import AugmentConfig, two_views

    torch.set_num_threads(1)  # one task per CPU: extra intra-op threads only oversubscribe
    images = torch.from_numpy(np.ascontiguousarray(batch.pop("image")))
    # Fresh entropy per batch: torch's default generator starts from the same seed in every new
    # worker process, which would give different workers identical augmentation streams.
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    v1, v2 = two_views(images, AugmentConfig.from_dict(augment), generator)
    batch[VIEW1], batch[VIEW2] = v1.numpy(), v2.numpy()
    return batch


def decoded_dataset(
    manifest: pa.Table, image_size: int, report=None, cache: bool = False, num_blocks: int | None = None
) -> ray.data.Dataset:
    """Decoded, resized images with metadata; materialized once when ``cache`` is set."""
    domains = sorted(set(manifest.column("domain").to_pylist()))
    columns = ["path", "image_id", "label", "domain", "x", "y", "heading"]
    if "cluster_id" in manifest.column_names:
        columns.append("cluster_id")
    blocks = num_blocks or max(2, math.ceil(manifest.num_rows / (4 * BATCH_ROWS)))
    ds = ray.data.from_arrow(manifest.select(columns)).repartition(blocks)
    ds = ds.map_batches(
        decode_batch,
        fn_kwargs=dict(image_size=image_size, domains=domains, report=report),
        batch_size=BATCH_ROWS,
        batch_format="numpy",
    )
    return ds.materialize() if cache else ds


def two_view_dataset(decoded: ray.data.Dataset, augment) -> ray.data.Dataset:
    """Lazily add ``view1``/``view2`` (``augment``: an AugmentConfig or its dict); block order is reshuffled
    on every pass (every epoch)."""
    augment = augment.to_dict() if hasattr(augment, "to_dict") else dict(augment)
    return decoded.randomize_block_order().map_batches(
        two_views_batch, fn_kwargs=dict(augment=augment), batch_size=BATCH_ROWS, batch_format="numpy"
    )


def pretrain_dataset(
    manifest: pa.Table, augment, image_size: int, report=None, cache: bool = False,
    seed: int = 0, views: bool = True,
) -> ray.data.Dataset:
    """The full two-view pretraining stream for ``manifest``, its rows permuted once (``seed``); with
    ``views=False`` the decoded ``image`` column instead, for workers that make the views on their device.

    Manifests list a traverse's frames together, and blocks are contiguous row ranges: without the
    permutation a block (hence a batch) holds a few traverses, and batches share classes far more often
    than i.i.d. draws would, inflating false negatives. Block order and the local shuffle buffer then
    vary the batches every epoch (:func:`train_batches`).
    """
    permuted = manifest.take(np.random.default_rng(seed).permutation(manifest.num_rows))
    decoded = decoded_dataset(permuted, image_size, report, cache)
    return two_view_dataset(decoded, augment) if views else decoded.randomize_block_order()


def decoded_pool(manifest: pa.Table, image_size: int, report=None, max_bytes: int = 4 << 30) -> dict[str, np.ndarray]:
    """The whole pool decoded by Ray Data's tasks, gathered as arrays in canonical order (image key): what
    paired batches (:mod:`raysys.data.paired`) draw from. Refuses a pool whose pixels exceed ``max_bytes``."""
    needed = manifest.num_rows * image_size * image_size * 3
    if needed > max_bytes:
        raise ConfigError(f"paired batches hold the decoded pool in memory: {manifest.num_rows} images at "
                          f"{image_size} px need {needed / 2**30:.1f} GiB (limit {max_bytes / 2**30:.0f} GiB); "
                          "lower --max-images or --image-size")
    parts = list(decoded_dataset(manifest, image_size, report).iter_batches(batch_size=None, batch_format="numpy"))
    return canonical_order({key: np.concatenate([part[key] for part in parts]) for key in parts[0]})


def train_batches(stream, batch_size: int, shuffle_buffer: int | None, pin_memory: bool = False):
    """One epoch of torch batches from a stream (a Dataset or a Train worker's shard); in a Train worker
    they arrive on its device, copied from pinned memory when ``pin_memory`` (GPU workers)."""
    return stream.iter_torch_batches(batch_size=batch_size, drop_last=True, pin_memory=pin_memory,
                                     local_shuffle_buffer_size=shuffle_buffer or None)
