"""Storage anywhere: ``--storage`` is a local folder or a URI that pyarrow's filesystems resolve.

On one machine a local folder is enough; on a cluster every node must see the same results, feature
and cluster caches, so ``--storage`` names shared storage (``s3://bucket/prefix``, ``gs://…``, an NFS
mount). Everything here goes through ``pyarrow.fs`` (the layer Ray Train/Tune use for
``storage_path``), so one code path serves local folders, ``file://`` URIs and object stores.

Checks are offline: :func:`check_storage` looks at the URI's form only and never contacts S3 or
GCS (that would need credentials and network at argument-parsing time); a filesystem is built only
when :func:`filesystem` is first needed. Credentials come from the platform's usual chain (instance
profile, ``~/.aws``, environment): none are ever passed through this module.
"""

from __future__ import annotations

import os
import re
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow.fs as pafs

from raysys.errors import ConfigError

# Schemes pyarrow.fs.FileSystem.from_uri resolves natively. (``mock://`` is left out on purpose:
# every from_uri call returns a fresh, empty in-memory filesystem, so nothing written survives.)
REMOTE_SCHEMES = ("s3", "gs", "gcs", "abfs", "abfss", "hdfs", "viewfs")
SCHEMES = ("file",) + REMOTE_SCHEMES

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
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_text(uri: str) -> str:
    """The UTF-8 text of the file at ``uri`` (FileNotFoundError if there is none)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{uri}: no such file")
    with fs.open_input_stream(path) as stream:
        return stream.read().decode("utf-8")


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
        _write_remote_atomic(fs, path, data)


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
    fs, path = filesystem(uri)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(src), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


def download_dir(uri: str, local_dir: str | os.PathLike) -> None:
    """Copy the folder at ``uri`` recursively into ``local_dir`` (created if missing)."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"download_dir: {uri} is not a folder")
    dest = Path(local_dir).expanduser().resolve()
    dest.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(dest), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
