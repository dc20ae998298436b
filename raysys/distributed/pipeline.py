"""Ray Data pipeline: manifest -> read bytes -> decode (bad files skipped and reported) -> two views.

Two stages, both ``map_batches`` with one batch per block:

1. :func:`decode_batch` reads each row's file, decodes and resizes it to the decode size (one bad file
   never aborts the dataset, unlike ``read_images``); bad files are dropped and, with files
   converted from 16-bit/CMYK/alpha, sent to a :class:`FileReport` actor that the driver lists in the
   run folder.
   The decoded, resized images may be materialized once and reused every epoch (``cache_decoded``).
2. :func:`two_views_batch` draws two SimCLR views for the whole batch at once with tensor ops
   (``raysys.data.augment.two_views``), returned as uint8 (the worker turns them into floats on its
   device). It is never materialized, so every epoch sees fresh views.

Sizing: a map task never splits a block, so the blocks are what spreads the work. There are
:data:`BLOCKS_PER_CPU` per cluster CPU (at most :data:`BATCH_ROWS` rows each), so every CPU gets work and
each task's output stays small in the object store.

The output columns are documented in :mod:`raysys.data.schema`.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from raysys.data.decode import CONVERTED_MODES, DecodeError, decode
from raysys.data.paired import canonical_order
from raysys.data.schema import VIEW1, VIEW2, image_key
from raysys.errors import ConfigError

log = logging.getLogger(__name__)

# Rows per block, at most: large enough that per-task overhead is small; and blocks per cluster CPU: enough that
# every CPU has work and the stream keeps flowing while the slowest tasks finish. Never fewer rows than
# MIN_BLOCK_ROWS (a tiny pool stays a few blocks).
BATCH_ROWS = 256
BLOCKS_PER_CPU = 4
MIN_BLOCK_ROWS = 16


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


def decode_files(paths, image_size: int, report=None) -> tuple[np.ndarray, np.ndarray]:
    """Decode image files to uint8 ``[n, S, S, 3]``; returns them and the indices of ``paths`` they came from.
    Files that cannot be decoded are left out; they, and the ones converted to RGB, go to ``report``."""
    images, keep, skipped, converted = [], [], [], []
    for i, path in enumerate(paths):
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
    stacked = np.stack(images) if images else np.zeros((0, image_size, image_size, 3), np.uint8)
    return stacked, np.asarray(keep, dtype=np.int64)


@contextmanager
def progress_bars(enabled: bool):
    """Ray Data's progress bars on or off while a dataset runs; the process-wide setting is restored after."""
    ctx = ray.data.DataContext.get_current()
    before, ctx.enable_progress_bars = ctx.enable_progress_bars, enabled
    try:
        yield
    finally:
        ctx.enable_progress_bars = before


def decode_batch(batch: dict[str, np.ndarray], image_size: int, domains: list[str], report=None) -> dict[str, np.ndarray]:
    """Decode a batch of manifest rows into ``image`` uint8 [n, S, S, 3] plus numeric metadata."""
    images, keep = decode_files(batch["path"], image_size, report)
    domain_index = {d: i for i, d in enumerate(domains)}
    out = {
        "image": images,
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
    """Replace ``image`` by two independently augmented views, uint8 ``[n, 3, S, S]`` (fresh randomness every
    call): a quarter of float32's bytes in the object store and on the wire, and no coarser than the 8-bit
    source (:func:`raysys.data.augment.to_uint8`)."""
    # torch and torchvision here, not at the top: a decode task's fresh process would spend ~6 s of a
    # 2-core machine importing them, and decoding needs neither.
    import torch

    from raysys.data.augment import AugmentConfig, to_uint8, two_views

    torch.set_num_threads(1)  # one task per CPU: extra intra-op threads only oversubscribe
    images = torch.from_numpy(np.ascontiguousarray(batch.pop("image")))
    # Fresh entropy per batch: torch's default generator starts from the same seed in every new
    # worker process, which would give different workers identical augmentation streams.
    generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
    v1, v2 = two_views(images, AugmentConfig.from_dict(augment), generator)
    batch[VIEW1], batch[VIEW2] = to_uint8(v1).numpy(), to_uint8(v2).numpy()
    return batch


def block_count(num_rows: int, cpus: float) -> int:
    """Blocks for ``num_rows`` rows on ``cpus`` CPUs: BLOCKS_PER_CPU per CPU and at most BATCH_ROWS rows each,
    but no block under MIN_BLOCK_ROWS rows."""
    wanted = max(BLOCKS_PER_CPU * math.ceil(cpus), math.ceil(num_rows / BATCH_ROWS))
    return max(1, min(wanted, num_rows // MIN_BLOCK_ROWS))


def decoded_dataset(
    manifest: pa.Table, image_size: int, report=None, cache: bool = False, num_blocks: int | None = None,
    shuffle_blocks: bool = False,
) -> ray.data.Dataset:
    """Decoded, resized images with metadata; materialized once when ``cache`` is set. ``shuffle_blocks``: a
    new block order on every pass, drawn where it costs nothing -- over the cached blocks, or else over the
    manifest's blocks before decoding (after it, it would wait for the whole pass: an all-to-all barrier)."""
    domains = sorted(set(manifest.column("domain").to_pylist()))
    columns = ["path", "image_id", "label", "domain", "x", "y", "heading"]
    if "cluster_id" in manifest.column_names:
        columns.append("cluster_id")
    table = manifest.select(columns)
    cpus = ray.cluster_resources().get("CPU", 1.0) if ray.is_initialized() else os.cpu_count()  # else Ray Data starts it
    blocks = num_blocks or block_count(table.num_rows, cpus)
    bounds = np.linspace(0, table.num_rows, blocks + 1).astype(int)
    ds = ray.data.from_arrow([table.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])])
    # This pipeline's own context (the stages after share it): no per-operator reservation. With it the augment
    # stage held about half the CPUs (5-6 tasks at once of 8 logical CPUs, bench/data_pipeline.py), without it
    # all of them; its object-store limit still bounds what waits in flight.
    ds.context.op_resource_reservation_enabled = False
    if shuffle_blocks and not cache:
        ds = ds.randomize_block_order()
    ds = ds.map_batches(decode_batch, fn_kwargs=dict(image_size=image_size, domains=domains, report=report),
                        batch_size=None, batch_format="numpy")
    if not cache:
        return ds
    ds = ds.materialize()
    return ds.randomize_block_order() if shuffle_blocks else ds


def two_view_dataset(decoded: ray.data.Dataset, augment) -> ray.data.Dataset:
    """Lazily add ``view1``/``view2`` (``augment``: an AugmentConfig or its dict), one task per decoded block
    (fused with decoding when it is not cached)."""
    augment = augment.to_dict() if hasattr(augment, "to_dict") else dict(augment)
    return decoded.map_batches(two_views_batch, fn_kwargs=dict(augment=augment), batch_size=None,
                               batch_format="numpy")


def pretrain_dataset(
    manifest: pa.Table, augment, image_size: int, report=None, cache: bool = False,
    seed: int = 0, views: bool = True, decode_size: int | None = None,
) -> ray.data.Dataset:
    """The full two-view pretraining stream for ``manifest``, its rows permuted once (``seed``); with
    ``views=False`` the decoded ``image`` column instead, for workers that make the views on their device.
    Images are decoded at ``decode_size`` (default ``image_size``), the views made at ``image_size``.

    Manifests list a traverse's frames together, and blocks are contiguous row ranges: without the
    permutation a block (hence a batch) holds a few traverses, and batches share classes far more often
    than i.i.d. draws would, inflating false negatives. Block order and the local shuffle buffer then
    vary the batches every epoch (:func:`train_batches`).
    """
    permuted = manifest.take(np.random.default_rng(seed).permutation(manifest.num_rows))
    decoded = decoded_dataset(permuted, decode_size or image_size, report, cache, shuffle_blocks=True)
    return two_view_dataset(decoded, augment) if views else decoded


def peak_tasks(ds: ray.data.Dataset, stage: str) -> int:
    """Most tasks of the map stage whose name holds ``stage`` (its function's name) that ran at once in ``ds``'s
    latest execution, from Ray Data's own execution stats: each output block's start and end of work, on one
    node's monotonic clock."""
    stats, spans = [ds._current_executor.get_stats()], {}  # private in Ray 2.60: the latest run's stats
    while stats:
        level = stats.pop()
        stats.extend(level.parents or [])
        for name, blocks in level.metadata.items():
            for block in blocks if stage in name else []:
                run = block.exec_stats
                if run is not None and run.start_time_s is not None:
                    lo, hi = spans.get((name, run.task_idx), (math.inf, -math.inf))
                    spans[(name, run.task_idx)] = (min(lo, run.start_time_s), max(hi, run.end_time_s))
    # a task's end sorts before another's start at the same instant: touching is not overlapping
    events = sorted([(lo, 1) for lo, _ in spans.values()] + [(hi, -1) for _, hi in spans.values()])
    return max(itertools.accumulate(step for _, step in events), default=0)


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
    """One epoch of torch batches from a stream (a Dataset or a Train worker's shard), on the host -- in pinned
    memory when ``pin_memory`` (GPU workers): the worker copies each to its device itself, on a side stream
    while the previous step runs (:func:`raysys.distributed.worker.device_batches`)."""
    return stream.iter_torch_batches(batch_size=batch_size, drop_last=True, pin_memory=pin_memory, device="cpu",
                                     local_shuffle_buffer_size=shuffle_buffer or None)
