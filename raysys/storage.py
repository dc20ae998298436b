"""Storage anywhere: ``--storage`` is a local folder or a URI that pyarrow's filesystems resolve.

On one machine a local folder is enough; on a cluster every node must see the same results, feature
and cluster caches, so ``--storage`` names shared storage (``s3://bucket/prefix``, ``gs://…``, an NFS
mount). Everything here goes through ``pyarrow.fs`` (the layer Ray Train/Tune use for
``storage_path``), so one code path serves local folders, ``file://`` URIs and object stores.

Two checks: :func:`check_storage` looks at the URI's form only, offline, while arguments are parsed;
:func:`check_reachable` then contacts remote storage once, before any training (the bucket exists and
takes a write). Endpoint and credentials come from the platform's usual chain -- the AWS variables
(``AWS_ENDPOINT_URL`` for an S3-compatible store such as MinIO or Ceph, ``AWS_ACCESS_KEY_ID``, ...),
``~/.aws``, an instance profile -- and are never passed through this module.

Remote operations are retried with exponential backoff (:data:`RETRIES` attempts, on top of the AWS
SDK's own); when all fail they raise :class:`~raysys.errors.StorageError`, and what storage already
holds is untouched: every write is atomic.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from raysys.errors import ConfigError, StorageError

log = logging.getLogger(__name__)

# Schemes pyarrow.fs.FileSystem.from_uri resolves natively. (``mock://`` is left out on purpose:
# every from_uri call returns a fresh, empty in-memory filesystem, so nothing written survives.)
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
SCHEMES = ("file",) + REMOTE_SCHEMES

# Schemes whose URI's host is a bucket, and how their users create one.
MAKE_BUCKET = {"s3": "aws s3 mb s3://{}", "gs": "gcloud storage buckets create gs://{}",
               "gcs": "gcloud storage buckets create gs://{}"}
RETRIES = 4  # attempts per remote operation
BACKOFF_S = 1.0  # the wait after the first failed attempt, doubled after each further one

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def _scheme(uri: str) -> str | None:
    """The URI's scheme in lower case, or None for a plain path."""
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else None


def _file_uri_path(uri: str) -> str:
    """``file:///abs/path`` -> ``/abs/path`` (percent-escapes decoded)."""
    parts = urlsplit(uri)
    if parts.netloc not in ("", "localhost"):
        raise ConfigError(f"{uri!r} names a remote host; a file:// URI must be file:///absolute/path")
    return unquote(parts.path)


def _local_path(uri: str) -> str:
    """Absolute local path of a plain path or ``file://`` URI."""
    path = _file_uri_path(uri) if _scheme(uri) == "file" else uri
    return os.path.abspath(os.path.expanduser(path))


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URIs: storage on this machine's filesystem."""
    return _scheme(str(uri)) in (None, "file")


def check_storage(uri: str | os.PathLike, option: str = "--storage") -> str:
    """Validate a storage location without touching the network and return it normalized.

    Local paths and ``file://`` URIs come back as absolute plain paths; the folder itself may not
    exist yet, but its nearest existing ancestor must be a writable folder (so it can be created).
    Remote URIs must use a scheme pyarrow resolves and name a bucket/container/host; they come back
    with any trailing slash removed. Raises :class:`ConfigError` (one line: problem and fix).
    """
    text = os.fspath(uri).strip() if uri is not None else ""
    if not text:
        raise ConfigError(f"{option} is empty; pass a local folder or a URI such as s3://bucket/prefix")
    scheme = _scheme(text)
    if scheme is None or scheme == "file":
        return _check_local_folder(_local_path(text), option)
    if scheme not in REMOTE_SCHEMES:
        supported = ", ".join(f"{s}://" for s in SCHEMES)
        raise ConfigError(f"{option} {text!r}: unknown scheme '{scheme}://'; pass a local folder or a URI "
                          f"with one of {supported}")
    if not urlsplit(text).netloc:
        raise ConfigError(f"{option} {text!r} names no bucket or host; write it as {scheme}://bucket/prefix")
    return text.rstrip("/")


def _check_local_folder(path: str, option: str) -> str:
    """Return ``path`` if it is, or can be created as, a folder."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{option} {path} is a file; pass a folder (it is created if missing)")
    ancestor = path
    while not os.path.exists(ancestor):
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ConfigError(f"{option} {path} cannot be created: {ancestor} is a file; pass another folder")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path} cannot be created: {ancestor} is not writable; pass another folder")
    return path


def check_reachable(uri: str, option: str = "--storage") -> None:
    """Contact remote storage once, before any work: its bucket must exist and take a write (a small
    object, deleted again). Raises :class:`ConfigError`, one line naming the URI and the fix; local
    folders were checked by :func:`check_storage` already."""
    if is_local(uri):
        return
    scheme, bucket = _scheme(uri), urlsplit(uri).netloc
    try:
        fs, path = filesystem(uri)
        if scheme in MAKE_BUCKET and fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            raise ConfigError(f"{option} {uri}: bucket {bucket!r} does not exist; create it "
                              f"({MAKE_BUCKET[scheme].format(bucket)}) or name an existing bucket")
        probe = f"{path}/.raysys-write-check-{uuid.uuid4().hex}"
        with fs.open_output_stream(probe) as stream:
            stream.write(b"")
        fs.delete_file(probe)
    except OSError as exc:
        raise ConfigError(f"{option} {uri}: storage cannot be reached or written ({_first_line(exc)}); check the "
                          "endpoint (AWS_ENDPOINT_URL for an S3-compatible store), the credentials and the network, "
                          "or pass a local folder") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def retrying(what: str, uri: str, operation, *args):
    """``operation(*args)``, retried with backoff when remote storage fails (a network error, a stopped
    server); a missing file is an answer, not a failure. After :data:`RETRIES` attempts: StorageError."""
    if is_local(uri):  # a local error (permissions, a full disk) does not pass by waiting
        return operation(*args)
    for attempt in range(1, RETRIES + 1):
        try:
            return operation(*args)
        except FileNotFoundError:
            raise
        except OSError as exc:
            if attempt == RETRIES:
                raise StorageError(f"{what} {uri} failed {RETRIES} times ({_first_line(exc)}); what storage "
                                   "already holds is intact: when it is reachable again, rerun the same command "
                                   "(with --resume for a sweep)") from exc
            wait = BACKOFF_S * 2 ** (attempt - 1)
            log.warning("storage: %s %s failed (%s); retrying in %.0f s", what, uri, _first_line(exc), wait)
            time.sleep(wait)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem holding ``uri`` and the path inside it.

    Local paths use :class:`pyarrow.fs.LocalFileSystem` with an absolute path; URIs go through
    :meth:`pyarrow.fs.FileSystem.from_uri` (for ``s3://bucket`` without ``?region=`` that call asks
    AWS for the bucket's region, which is why nothing else in this module calls it eagerly).
    """
    uri = os.fspath(uri)
    if is_local(uri):
        return pafs.LocalFileSystem(), _local_path(uri)
    return pafs.FileSystem.from_uri(uri)


def join(uri: str, *parts: str) -> str:
    """Append relative path parts to a local path or URI (a URI's ``?query`` stays at the end)."""
    uri = os.fspath(uri)
    for part in parts:
        if not part or os.path.isabs(part):
            raise ValueError(f"storage.join: part {part!r} must be a non-empty relative path")
    if is_local(uri) and _scheme(uri) is None:
        return os.path.join(uri, *parts)
    head, sep, query = uri.partition("?")
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in parts)]) + sep + query


def exists(uri: str) -> bool:
    """True if a file or folder exists at ``uri``."""
    def look():
        fs, path = filesystem(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    return retrying("looking up", uri, look)


def read_bytes(uri: str) -> bytes:
    """The bytes of the file at ``uri`` (FileNotFoundError if there is none)."""
    def read():
        fs, path = filesystem(uri)
        if fs.get_file_info(path).type != pafs.FileType.File:
            raise FileNotFoundError(f"{uri}: no such file")
        with fs.open_input_stream(path) as stream:
            return stream.read()
    return retrying("reading", uri, read)


def read_text(uri: str) -> str:
    """The UTF-8 text of the file at ``uri`` (FileNotFoundError if there is none)."""
    return read_bytes(uri).decode("utf-8")


def write_text_atomic(uri: str, text: str) -> None:
    """Write UTF-8 ``text`` to ``uri`` so that readers see the old file or the new one, never a part.

    Local: a temporary file in the same folder, flushed and fsynced, then ``os.replace`` (an atomic
    rename on POSIX). Remote: the text goes to a temporary key next to the target, then
    ``FileSystem.move`` (a rename on HDFS/Azure, copy + delete on S3/GCS: the target object appears
    only complete). Where a filesystem cannot move, the text is uploaded directly: an object store
    publishes an object only once its upload completes, so a PUT is atomic already. On any failure
    the temporary file is removed and the old content survives.
    """
    write_bytes_atomic(uri, text.encode("utf-8"))  # encode first: an encoding error must not leave anything behind


def write_bytes_atomic(uri: str, data: bytes) -> None:
    """:func:`write_text_atomic` for bytes (e.g. a PNG)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        _write_local_atomic(path, data)
    else:
        retrying("writing", uri, _write_remote_atomic, fs, path, data)


def put_if_absent(local_file: str | os.PathLike, uri: str) -> bool:
    """Publish a cache entry: copy ``local_file`` to ``uri`` unless something is there already; True if
    copied. Entries are keyed by what they were computed from, so two nodes racing on one key both
    upload the same content, each upload atomic: a reader sees one complete copy, never a mix."""
    if exists(uri):
        return False
    write_bytes_atomic(uri, Path(local_file).read_bytes())
    return True


def fetch_if_present(uri: str, local_file: str | os.PathLike) -> bool:
    """Copy the file at ``uri`` to ``local_file`` (atomically) if storage has it; True if copied."""
    try:
        data = read_bytes(uri)
    except FileNotFoundError:
        return False
    _write_local_atomic(os.path.abspath(local_file), data)
    return True


def _write_local_atomic(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data does
        # mkstemp makes 0600 files: keep an existing file's mode, else the usual 0644.
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(pafs.LocalFileSystem(), tmp)
        raise


@contextmanager
def atomic_local_path(path: str | os.PathLike):
    """A temporary path beside local ``path`` for a writer that needs a file name (``torch.save``,
    ``np.savez``, Parquet); renamed onto ``path`` when the block succeeds, removed when it fails, so
    readers see the old file or the new one, never a part."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=os.path.splitext(path)[1] or ".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(pafs.LocalFileSystem(), tmp)
        raise


def _write_remote_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    parent, _, name = path.rpartition("/")
    tmp = f"{parent}/.{name}.{uuid.uuid4().hex}.tmp" if parent else f".{name}.{uuid.uuid4().hex}.tmp"
    if parent:
        fs.create_dir(parent, recursive=True)
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except NotImplementedError:  # pyarrow's ArrowNotImplementedError: no move on this filesystem
        _remove_quietly(fs, tmp)
        with fs.open_output_stream(path) as out:
            out.write(data)  # one complete upload: object stores publish it whole or not at all
    except BaseException:
        _remove_quietly(fs, tmp)
        raise


def _remove_quietly(fs: pafs.FileSystem, path: str) -> None:
    """Delete a leftover temporary file; a failure here must not hide the original error."""
    try:
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)
    except OSError:
        pass


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copy the folder ``local_dir`` recursively to ``uri`` (files with the same names are replaced,
    others kept). Used to publish caches and results to shared storage."""
    src = Path(local_dir).expanduser().resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"upload_dir: {local_dir} is not a folder")
    def copy():
        fs, path = filesystem(uri)
        fs.create_dir(path, recursive=True)
        pafs.copy_files(str(src), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    retrying("uploading to", uri, copy)


def download_dir(uri: str, local_dir: str | os.PathLike) -> None:
    """Copy the folder at ``uri`` recursively into ``local_dir`` (created if missing)."""
    dest = Path(local_dir).expanduser().resolve()

    def copy():
        fs, path = filesystem(uri)
        if fs.get_file_info(path).type != pafs.FileType.Directory:
            raise FileNotFoundError(f"download_dir: {uri} is not a folder")
        dest.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    retrying("downloading from", uri, copy)
