"""``raysys embed``: every image of a dataset through a saved encoder, with Ray Data batch inference, into one
Parquet dataset (a folder of part files).

Three streaming stages, so an archive larger than memory and the object store passes through in bounded
pieces and the driver only ever sees row counts:

1. decode tasks read, decode and resize each manifest row; files that cannot be decoded are skipped and
   listed in ``OUT/_report/skipped-files.tsv`` as in pretraining (:class:`raysys.distributed.pipeline.FileReport`);
2. an actor pool holds the encoder (:func:`raysys.models.export.load_encoder`, any format): one GPU per
   actor where the cluster has GPUs, else one CPU per actor on up to half the cluster's CPUs;
3. writer tasks write each bundle of up to :data:`ROWS_PER_FILE` rows as one part file, atomically
   (readers and a rerun never see half a file).

Rows: ``image_id``, ``path``, ``embedding`` (``fixed_size_list<float32>[D]``) and, where the layout has them,
``label``, ``split``, ``traverse`` and the positions (``x``, ``y``, ``heading``, ``frame``). Every part's
metadata holds the encoder's digest, the layout's class names and the sum of the part's embeddings, from
which ``raysys search`` takes the archive's mean (:func:`raysys.eval.search.stored_mean`). A rerun skips the
images already there and adds parts with their own sums, so that mean stays the mean of every row; the
encoder's digest must be the same. The console shows raysys's lines and one progress line; Ray's output goes
to ``ray-output.log`` beside ``--out`` (:func:`raysys.distributed.console.quiet_console`). With
``--storage`` (a cluster) the parts go to that shared location, written by whichever node embeds them, and
are copied to ``--out`` at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray
import torch

from raysys import storage
from raysys.data import formats
from raysys.data.augment import to_float
from raysys.data.schema import MANIFEST_SCHEMA
from raysys.data.sources import has_hidden_labels
from raysys.distributed.console import LOG_FILE, Status, duration, quiet_console, say
from raysys.distributed.pipeline import FileReport, decode_files, progress_bars, write_file_report
from raysys.distributed.runtime import init_ray
from raysys.errors import ConfigError
from raysys.models.export import load_encoder, sidecar_path
from raysys.models.io import resolve_model_file

DECODE_BYTES = 32 << 20  # most decoded pixels per block (one encoder call): blocks in flight stay bounded
DECODE_CPUS = 0.5  # not the actors' 1 CPU: equal arguments would fuse decoding into the encoder actors
ROWS_PER_FILE = 4096  # rows per Parquet part: the unit a rerun resumes from
WRITER_CPUS = 0.25  # writing a part is light; leave the CPUs to decoding and the encoder
REPORT_DIR = "_report"  # inside the dataset folder; a leading "_" keeps Parquet readers out of it
META_ENCODER = b"raysys.encoder"
META_IMAGE_SIZE = b"raysys.image_size"
META_MODEL = b"raysys.model"
META_SUM = b"raysys.embedding_sum"  # this part's embeddings summed (float64, JSON), read by raysys.eval.search
BAR_WIDTH = 20
PROGRESS_POLL_S = 1.0
POSITION_COLUMNS = ("x", "y", "heading", "frame")


# ----------------------------------------------------------------------------- inputs


def encoder_files(model) -> dict[str, bytes]:
    """The bytes of the file(s) behind ``model`` (a run folder's ``model.pt``, an export and its sidecar):
    what the actors rebuild the encoder from, on whichever node they run."""
    path = Path(model)
    file = resolve_model_file(path) if path.is_dir() else path
    files = {file.name: file.read_bytes()}
    if sidecar_path(file).is_file():
        files[sidecar_path(file).name] = sidecar_path(file).read_bytes()
    return files


def encoder_digest(files: dict[str, bytes], image_size: int) -> str:
    h = hashlib.blake2b(f"{image_size}px".encode(), digest_size=8)
    for name in sorted(files):
        h.update(files[name])
    return h.hexdigest()


def read_images(data, layout: str | None = None) -> pa.Table:
    """The manifest of ``data`` (auto-detected layout unless ``layout``), one row per image id; the simulator's
    hidden labels are read where it left them (the built-in data)."""
    layout = layout or formats.detect_format(data)
    extra = {"hidden_labels": has_hidden_labels(data)} if layout == "folder" else {}
    manifest = formats.read_manifest(data, format=layout, **extra)
    ids = manifest.column("image_id").to_numpy(zero_copy_only=False)
    _, first = np.unique(ids, return_index=True)  # HiRISE repeats rows to upsample classes: one row each
    return manifest.take(np.sort(first))


def kept_columns(manifest: pa.Table) -> list[str]:
    """``image_id``, ``path`` and the metadata columns the layout fills (not all unknown)."""
    cols = ["image_id", "path"]
    if pc.any(pc.greater_equal(manifest.column("label"), 0)).as_py():
        cols.append("label")
    if pc.any(pc.not_equal(manifest.column("split"), "unlabeled")).as_py():
        cols.append("split")
    if pc.any(pc.not_equal(manifest.column("traverse"), -1)).as_py():
        cols.append("traverse")
    if pc.any(pc.invert(pc.is_nan(manifest.column("x")))).as_py():
        cols += POSITION_COLUMNS
    return cols


def _parts(location: str):
    """The Parquet dataset at ``location`` (local folder or URI), or None where nothing is written yet."""
    fs, path = storage.filesystem(location)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    return pads.dataset(path, filesystem=fs, format="parquet")


def done_ids(location: str, digest: str) -> set[str]:
    """Image ids already embedded at ``location`` by the same encoder; another encoder's parts are refused."""
    parts = _parts(location)
    if parts is None or not parts.files:
        return set()
    meta = parts.schema.metadata or {}
    if meta.get(META_ENCODER, digest.encode()).decode() != digest:
        raise ConfigError(f"{location} holds embeddings of another encoder or image size; pass a new --out "
                          "(or delete that folder) to embed with this one")
    return set(parts.to_table(columns=["image_id"]).column("image_id").to_pylist())


# ----------------------------------------------------------------------------- the three stages


def decode_rows(batch: dict[str, np.ndarray], image_size: int, report) -> dict[str, np.ndarray]:
    """Manifest rows -> the decoded ``image`` uint8 ``[n, S, S, 3]`` and the rows' other columns; files that
    cannot be decoded are dropped and sent to ``report`` (as the pretraining pipeline does)."""
    images, keep = decode_files(batch["path"], image_size, report)
    out = {k: v[keep] for k, v in batch.items()}
    out["image"] = images
    return out


@ray.remote(num_cpus=0)
class Counter:
    """Images encoded so far, added by the encoder actors after each batch: what the progress line shows
    (finer than the part files the driver sees)."""

    def __init__(self):
        self.count = 0

    def add(self, n: int) -> None:
        self.count += n

    def value(self) -> int:
        return self.count


class Encoder:
    """Ray Data actor holding one encoder: ``image`` batches -> ``embedding`` float32 ``[n, D]``."""

    def __init__(self, files_ref, image_size: int, counter):
        files = ray.get(files_ref[0])  # wrapped in a list: Ray Data does not resolve refs in kwargs
        with tempfile.TemporaryDirectory() as tmp:  # every format is read from a file; the encoder stays in memory
            for name, data in files.items():
                Path(tmp, name).write_bytes(data)
            self.encoder, self.preprocess = load_encoder(Path(tmp, next(iter(files))))
        self.device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
        self.encoder = self.encoder.to(self.device)
        # --image-size wins over the encoder's own size: preprocess would otherwise resize back to it
        self.preprocess = dataclasses.replace(self.preprocess, image_size=image_size)
        self.counter = counter

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = batch.pop("image")  # a read-only view of the block: copied, as torch cannot keep it read-only
        images = torch.from_numpy(images if images.flags.writeable else images.copy()).to(self.device)  # still uint8
        with torch.inference_mode():
            features = self.encoder(self.preprocess(to_float(images, self.preprocess.image_size)))
        batch["embedding"] = features.flatten(1).float().cpu().numpy()
        self.counter.add.remote(len(features))
        return batch


def part_metadata(manifest: pa.Table, digest: str, image_size: int, model) -> dict[bytes, bytes]:
    """What every part's footer records beside its own sum: the encoder (digest, image size, path) and the
    layout's class names, which ``raysys search`` prints in place of label ids."""
    return {META_ENCODER: digest.encode(), META_IMAGE_SIZE: str(image_size).encode(),
            META_MODEL: str(Path(model).expanduser().resolve()).encode(),
            formats.META_CLASSES: json.dumps(formats.class_names(manifest)).encode()}


def embedding_table(batch: dict[str, np.ndarray], meta: dict) -> pa.Table:
    """One part's rows: the metadata columns as the manifest types them, the embedding as a fixed-size list."""
    emb = np.ascontiguousarray(batch["embedding"], dtype=np.float32)
    columns = {c: pa.array(batch[c].tolist() if c in ("image_id", "path", "split") else batch[c],
                           type=MANIFEST_SCHEMA.field(c).type) for c in batch if c != "embedding"}
    columns["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), emb.shape[1])
    # The part's own sum: summed over all parts it gives the archive's mean, however many runs wrote them.
    total = json.dumps(emb.sum(axis=0, dtype=np.float64).tolist()).encode()
    return pa.table(columns).replace_schema_metadata({**meta, META_SUM: total})


def write_part(batch: dict[str, np.ndarray], location: str, meta: dict) -> dict[str, np.ndarray]:
    """Write ``batch`` as one new part file at ``location``, atomically; return its row count."""
    sink = pa.BufferOutputStream()
    pq.write_table(embedding_table(batch, meta), sink)
    storage.write_bytes_atomic(storage.join(location, f"part-{uuid.uuid4().hex}.parquet"), sink.getvalue().to_pybytes())
    return {"rows": np.array([len(batch["embedding"])], dtype=np.int64)}


# ----------------------------------------------------------------------------- the run


def _encoder_resources() -> dict:
    """The encoder actors' ``map_batches`` arguments: one per GPU where the cluster has GPUs, else one CPU
    each on up to half the CPUs (the other half decodes)."""
    cluster = ray.cluster_resources()
    gpus = int(cluster.get("GPU", 0))
    if gpus:
        return {"num_gpus": 1, "concurrency": gpus}
    return {"num_cpus": 1, "concurrency": (1, max(1, int(cluster.get("CPU", 1)) // 2))}


def embedding_stream(manifest: pa.Table, files: dict[str, bytes], image_size: int, batch_size: int,
                     location: str, meta: dict, report, counter) -> ray.data.Dataset:
    """decode tasks -> encoder actors -> part writers, lazily; iterating it yields each part's row count."""
    rows = max(1, min(batch_size, DECODE_BYTES // (3 * image_size**2)))  # a decoded block is one encoder batch
    ds = ray.data.from_arrow(manifest).repartition(max(1, -(-manifest.num_rows // rows)))
    ds = ds.map_batches(decode_rows, fn_kwargs=dict(image_size=image_size, report=report), batch_size=rows,
                        batch_format="numpy", num_cpus=DECODE_CPUS)
    encoder_args = dict(files_ref=[ray.put(files)], image_size=image_size, counter=counter)
    ds = ds.map_batches(Encoder, fn_constructor_kwargs=encoder_args, batch_size=None, batch_format="numpy",
                        **_encoder_resources())
    return ds.map_batches(write_part, fn_kwargs=dict(location=location, meta=meta), batch_size=ROWS_PER_FILE,
                          batch_format="numpy", num_cpus=WRITER_CPUS)


def progress_line(done: int, total: int, rate: float | None) -> str:
    """``[raysys] embedding [#####---------------] 1280/5000 images · 120 img/s · ETA 31 s``."""
    done = min(done, total)  # a restarted actor may encode a batch twice
    filled = round(BAR_WIDTH * done / max(1, total))
    parts = [f"[raysys] embedding [{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done}/{total} images"]
    if rate:
        parts += [f"{rate:.0f} img/s", f"ETA {duration((total - done) / rate)}"]
    return " · ".join(parts)


def _show_progress(counter, total: int, stop: threading.Event) -> None:
    """Poll the encoded count and show the live line; the pace from the first count on, so the start-up of
    Ray and the actors is not counted as embedding time."""
    status, first = Status(), None
    while not stop.wait(PROGRESS_POLL_S):
        done, now = ray.get(counter.value.remote()), time.monotonic()
        if not done:
            continue
        first = first or (now, done)
        rate = (done - first[1]) / (now - first[0]) if done > first[1] else None
        status.show(progress_line(done, total, rate))


@contextmanager
def embedding_progress(total: int, enabled: bool):
    """A :class:`Counter` for the encoder actors and, if ``enabled``, a thread showing the live line from it."""
    counter, stop = Counter.remote(), threading.Event()
    thread = threading.Thread(target=_show_progress, args=(counter, total, stop), daemon=True) if enabled else None
    if thread:
        thread.start()
    try:
        yield counter
    finally:
        stop.set()
        if thread:
            thread.join()
        ray.kill(counter)


def _check_single_node(storage_uri: str | None) -> None:
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    if nodes > 1 and storage_uri is None:
        raise ConfigError(f"the cluster has {nodes} nodes and each writes the parts it embeds; pass --storage "
                          "(s3://bucket/prefix, gs://..., or a folder every node mounts)")


def _location(out: Path, storage_uri: str | None) -> str:
    """Where the parts are written: ``--storage`` when given (checked reachable), else ``--out``."""
    if out.is_file():
        raise ConfigError(f"--out {out} is a file; the embeddings are a Parquet dataset (a folder of part files): "
                          f"pass a folder name such as {out.with_name(out.stem + '-embeddings.parquet')}")
    if storage_uri is None:
        return storage.check_storage(out, "--out")
    location = storage.check_storage(storage_uri)
    storage.check_reachable(location)
    return location


def embed_images(model, data, out, storage_uri: str | None = None, layout: str | None = None,
                 image_size: int | None = None, batch_size: int = 256, progress: bool = True,
                 verbose: bool = False) -> dict:
    """Embed every image of ``data`` that the dataset at ``out`` (or ``storage_uri``) lacks. Every input is
    checked before Ray starts. ``progress``: a line saying what is embedded, then the live progress line.
    Ray's output goes to ``ray-output.log`` beside ``out`` unless ``verbose``.
    Returns ``{"embedded", "already", "skipped": [(path, reason)], "out"}``."""
    out = Path(out).expanduser().resolve()
    with quiet_console(out.parent, verbose):  # a rejected input leaves no log behind
        if batch_size < 1:
            raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
        location = _location(out, storage_uri)
        _, preprocessing = load_encoder(model)
        files = encoder_files(model)
        size = image_size or preprocessing.image_size
        manifest = read_images(data, layout)
        digest = encoder_digest(files, size)
        done = done_ids(location, digest)
        todo = manifest.filter(pc.invert(pc.is_in(manifest.column("image_id"), pa.array(sorted(done), pa.string()))))
        summary = {"embedded": 0, "already": manifest.num_rows - todo.num_rows, "skipped": [], "out": out}
        if todo.num_rows:
            if progress:
                say(f"[raysys] embedding {todo.num_rows} images of {Path(data).resolve()} ({summary['already']} "
                    f"already there) into {out}; Ray's own output in {out.parent / LOG_FILE} (--verbose shows it here)")
            init_ray()
            _check_single_node(storage_uri)
            meta = part_metadata(manifest, digest, size, model)
            report = FileReport.remote()
            with progress_bars(progress), embedding_progress(todo.num_rows, progress) as counter:
                stream = embedding_stream(todo.select(kept_columns(manifest)), files, size, batch_size, location,
                                          meta, report, counter)
                summary["embedded"] = sum(int(b["rows"].sum()) for b in stream.iter_batches(batch_size=None))
            (out / REPORT_DIR).mkdir(parents=True, exist_ok=True)
            summary["skipped"] = write_file_report(report, out / REPORT_DIR)["skipped"]
            ray.kill(report)
        if storage_uri is not None and location != str(out):
            storage.download_dir(location, out)
    return summary


# ----------------------------------------------------------------------------- command line


def configure_parser(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Options of ``raysys embed``."""
    p.add_argument("--model", required=True, help="run folder, model.pt, or a file written by raysys export")
    p.add_argument("--data", required=True, help="a dataset folder: MSL v2.1, HiRISE v3.2, ImageFolder, or a plain "
                                                 "folder of images (with its positions.csv when it has one)")
    p.add_argument("--out", required=True, help="the Parquet dataset to write (a folder of part files); a rerun "
                                                "embeds only the images it lacks")
    p.add_argument("--layout", help=f"the data's layout, one of {', '.join(formats.FORMATS)} (default: detected)")
    p.add_argument("--storage", help="shared storage on a multi-node cluster (s3://bucket/prefix, gs://..., a shared "
                                     "folder): the nodes write the parts there; they are copied to --out at the end")
    p.add_argument("--image-size", type=int, help="input size in px (default: the encoder's)")
    p.add_argument("--batch-size", type=int, default=256,
                   help=f"images per encoder call (fewer where they would decode to over {DECODE_BYTES >> 20} MiB)")
    p.add_argument("--verbose", action="store_true", help=f"show Ray's own output (Data progress, actor logs) on the "
                                                         f"console; default: in {LOG_FILE} beside --out")
    return p


def run(args: argparse.Namespace) -> int:
    """``raysys embed``: print what was embedded (the unreadable files are listed by a warning)."""
    s = embed_images(args.model, args.data, args.out, args.storage, args.layout, args.image_size, args.batch_size,
                     verbose=args.verbose)
    print(f"embedded {s['embedded']} images into {s['out']} ({s['already']} already there)")
    return 0
