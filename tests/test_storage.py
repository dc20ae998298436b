"""raysys.storage: offline URI checks, atomic writes, round trips and folder copies.

No network: local paths and file:// URIs use the real local filesystem; the remote code path is
exercised by pointing ``storage.filesystem`` at a pyarrow filesystem over a temporary folder
(a SubTreeFileSystem, or a PyFileSystem wrapping one to inject failures / missing ``move``).
"""

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pytest

from raysys import storage
from raysys.config import ConfigError
from raysys.errors import StorageError


def tree(root):
    """{relative path: bytes} of every file under root, read back independently with os.walk."""
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            full = os.path.join(folder, name)
            with open(full, "rb") as f:
                out[os.path.relpath(full, root)] = f.read()
    return out


def make_tree(root):
    files = {"a.txt": b"alpha\n", "sub/b.bin": bytes(range(256)) * 3, "sub/deeper/c.csv": "k,acc\n5,0.8\n".encode()}
    for rel, data in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return files


# --- check_storage / is_local / join ------------------------------------------------------------

def test_local_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.check_storage("results/run1") == str(tmp_path / "results" / "run1")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.check_storage("~/res") == str(tmp_path / "res")
    assert storage.check_storage(tmp_path / "p") == str(tmp_path / "p")  # PathLike accepted


def test_file_uri_becomes_plain_path(tmp_path):
    target = tmp_path / "with space" / "out"
    assert storage.check_storage("file://" + str(tmp_path) + "/with%20space/out") == str(target)
    assert storage.check_storage("FILE://" + str(target)) == str(target)
    with pytest.raises(ConfigError, match="remote host"):
        storage.check_storage("file://otherhost/data")


def test_local_parent_must_be_creatable(tmp_path):
    (tmp_path / "afile").write_text("x")
    assert storage.check_storage(str(tmp_path / "new" / "deep" / "folder")) == str(tmp_path / "new" / "deep" / "folder")
    with pytest.raises(ConfigError, match="is a file"):
        storage.check_storage(str(tmp_path / "afile"))
    with pytest.raises(ConfigError, match="cannot be created.*afile is a file"):
        storage.check_storage(str(tmp_path / "afile" / "below"))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_local_parent_must_be_writable(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="not writable"):
            storage.check_storage(str(locked / "out"))
    finally:
        locked.chmod(0o700)


def test_unknown_scheme_names_problem_and_fix():
    with pytest.raises(ConfigError) as info:
        storage.check_storage("foo://bucket/x")
    message = str(info.value)
    assert "\n" not in message and "--storage" in message and "'foo://'" in message
    for scheme in ("file://", "s3://", "gs://", "gcs://", "abfs://", "hdfs://"):
        assert scheme in message
    assert isinstance(info.value, ValueError)
    with pytest.raises(ConfigError, match="--out"):
        storage.check_storage("mock:///x", option="--out")  # in-memory mock:// keeps nothing between calls


def test_remote_uris_checked_offline(monkeypatch):
    monkeypatch.setattr(storage, "pafs", None)  # any filesystem construction would now fail
    assert storage.check_storage("s3://my-bucket/raysys/") == "s3://my-bucket/raysys"
    assert storage.check_storage("s3://my-bucket/raysys?region=eu-west-1") == "s3://my-bucket/raysys?region=eu-west-1"
    assert storage.check_storage("gs://b") == "gs://b"
    for bad in ("s3:///prefix", "gs://", ""):
        with pytest.raises(ConfigError, match="bucket|empty"):
            storage.check_storage(bad)


def test_is_local():
    assert storage.is_local("runs/x") and storage.is_local("/abs/x") and storage.is_local("file:///x")
    assert not storage.is_local("s3://b/x") and not storage.is_local("gs://b/x")


def test_join():
    assert storage.join("/r", "a", "b.txt") == "/r/a/b.txt"
    assert storage.join("s3://b/p/", "a/", "c.txt") == "s3://b/p/a/c.txt"
    assert storage.join("s3://b/p?region=us-east-1", "x") == "s3://b/p/x?region=us-east-1"
    assert storage.join("file:///r", "x") == "file:///r/x"
    for bad in ("/abs", ""):
        with pytest.raises(ValueError, match="relative"):
            storage.join("s3://b/p", bad)


# --- local files ----------------------------------------------------------------------------------

@pytest.mark.parametrize("as_uri", [False, True])
def test_write_read_round_trip_local(tmp_path, as_uri):
    target = tmp_path / "new" / "folder" / "summary.md"
    uri = ("file://" + str(target)) if as_uri else str(target)
    assert not storage.exists(uri)
    text = "K sweep — résumé ✓\nline 2\n"
    storage.write_text_atomic(uri, text)
    assert target.read_bytes() == text.encode("utf-8")  # read back independently
    assert storage.read_text(uri) == text and storage.exists(uri)
    assert storage.exists(str(tmp_path / "new"))  # folders count too
    assert (target.stat().st_mode & 0o777) == 0o644  # not mkstemp's 0600: others can read results
    storage.write_text_atomic(uri, "v2")
    assert target.read_text() == "v2"
    assert sorted(os.listdir(target.parent)) == ["summary.md"]  # no temporary files left behind


def test_existing_mode_is_kept(tmp_path):
    target = tmp_path / "r.csv"
    target.write_text("old")
    target.chmod(0o600)
    storage.write_text_atomic(str(target), "new")
    assert target.read_text() == "new" and (target.stat().st_mode & 0o777) == 0o600


def test_read_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_text(str(tmp_path / "nope.txt"))
    with pytest.raises(FileNotFoundError):
        storage.read_text(str(tmp_path))  # a folder is not a file


def test_local_failure_mid_write_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "results.csv"
    target.write_text("old,complete\n")
    real_fdopen = os.fdopen

    class HalfWriter:
        """Writes half of the data to the real temporary file, then fails (disk full, killed...)."""

        def __init__(self, fd, mode):
            self.f = real_fdopen(fd, mode)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError("No space left on device")

    monkeypatch.setattr(storage.os, "fdopen", HalfWriter)
    with pytest.raises(OSError, match="No space"):
        storage.write_text_atomic(str(target), "new,content,that,is,longer\n" * 100)
    assert target.read_text() == "old,complete\n"
    assert os.listdir(tmp_path) == ["results.csv"]


def test_local_failure_before_rename_keeps_old_content(tmp_path, monkeypatch):
    target = tmp_path / "state.json"
    target.write_text('{"old": 1}')

    def broken_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(storage.os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="I/O error"):
        storage.write_text_atomic(str(target), '{"new": 2}')
    assert target.read_text() == '{"old": 1}' and os.listdir(tmp_path) == ["state.json"]


# --- the remote code path, on pyarrow filesystems over a temporary folder -------------------------

class Delegating(pafs.FileSystemHandler):
    """A pyarrow FileSystemHandler that forwards to ``inner``; tests override single methods."""

    def __init__(self, inner):
        self.inner = inner

    def get_type_name(self):
        return "delegating"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def equals(self, other):
        return self is other

    def get_file_info(self, paths):
        return self.inner.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.inner.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.inner.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.inner.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.inner.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        self.inner.delete_dir_contents("", accept_root_dir=True)

    def delete_file(self, path):
        self.inner.delete_file(path)

    def move(self, src, dest):
        self.inner.move(src, dest)

    def copy_file(self, src, dest):
        self.inner.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.inner.open_input_stream(path)

    def open_input_file(self, path):
        return self.inner.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return self.inner.open_output_stream(path, metadata=metadata)

    def open_append_stream(self, path, metadata):
        return self.inner.open_append_stream(path, metadata=metadata)


@pytest.fixture
def bucket(tmp_path, monkeypatch):
    """Make ``s3://bucket/<key>`` resolve to ``<tmp>/bucket/<key>`` through a filesystem the test picks."""
    root = tmp_path / "bucket"
    root.mkdir()
    state = {"fs": pafs.SubTreeFileSystem(str(root), pafs.LocalFileSystem())}

    def fake_filesystem(uri):
        assert uri.startswith("s3://bucket/"), uri
        return state["fs"], uri[len("s3://bucket/"):]

    monkeypatch.setattr(storage, "filesystem", fake_filesystem)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.0)
    state["root"] = root
    return state


def test_remote_round_trip(bucket):
    uri = "s3://bucket/raysys/sweep_k/results.csv"
    assert not storage.exists(uri)
    storage.write_text_atomic(uri, "trial,acc\n1,0.5\n")
    target = bucket["root"] / "raysys" / "sweep_k" / "results.csv"
    assert target.read_text() == "trial,acc\n1,0.5\n"
    assert storage.read_text(uri) == "trial,acc\n1,0.5\n" and storage.exists(uri)
    storage.write_text_atomic(uri, "v2")
    assert storage.read_text(uri) == "v2"
    assert os.listdir(target.parent) == ["results.csv"]  # temporary key moved, not left behind


def failing_upload(failures):
    """A Delegating filesystem whose next ``failures[0]`` uploads break halfway (a connection reset)."""
    class FailingUpload(Delegating):
        def open_output_stream(self, path, metadata):
            if failures[0] <= 0:
                return self.inner.open_output_stream(path, metadata=metadata)
            failures[0] -= 1

            class Half:
                def __init__(self, stream):
                    self.stream = stream

                def write(self, data):
                    self.stream.write(bytes(data)[: len(data) // 2])
                    raise ConnectionError("connection reset during upload")

                def close(self):
                    self.stream.close()

                @property
                def closed(self):
                    return self.stream.closed

            return pa.PythonFile(Half(self.inner.open_output_stream(path)), mode="w")
    return FailingUpload


def test_remote_failure_mid_upload_keeps_old_content(bucket):
    uri = "s3://bucket/r/results.csv"
    storage.write_text_atomic(uri, "old\n")
    failures = [storage.RETRIES]
    bucket["fs"] = pafs.PyFileSystem(failing_upload(failures)(bucket["fs"]))
    with pytest.raises(StorageError, match=r"s3://bucket/r/results.csv failed 4 times \(connection reset"):
        storage.write_text_atomic(uri, "new content\n" * 50)
    assert failures == [0], "every attempt was made"
    assert (bucket["root"] / "r" / "results.csv").read_text() == "old\n"
    assert os.listdir(bucket["root"] / "r") == ["results.csv"]


def test_remote_failure_that_passes_is_retried(bucket):
    uri = "s3://bucket/r/results.csv"
    failures = [storage.RETRIES - 1]
    bucket["fs"] = pafs.PyFileSystem(failing_upload(failures)(bucket["fs"]))
    storage.write_text_atomic(uri, "new\n")
    assert (bucket["root"] / "r" / "results.csv").read_text() == "new\n"
    assert os.listdir(bucket["root"] / "r") == ["results.csv"]


def test_remote_without_move_uploads_directly(bucket):
    moves = []

    class NoMove(Delegating):
        def move(self, src, dest):
            moves.append((src, dest))
            raise NotImplementedError("move not supported")

    bucket["fs"] = pafs.PyFileSystem(NoMove(bucket["fs"]))
    storage.write_text_atomic("s3://bucket/x/notes.md", "# notes\n")
    assert len(moves) == 1  # it tried the temporary key first
    assert (bucket["root"] / "x" / "notes.md").read_text() == "# notes\n"
    assert os.listdir(bucket["root"] / "x") == ["notes.md"]


# --- folder copies --------------------------------------------------------------------------------

def test_upload_download_round_trip_file_uri(tmp_path):
    src, dst = tmp_path / "cache", tmp_path / "back"
    files = make_tree(src)
    shared = "file://" + str(tmp_path / "shared" / "features")
    storage.upload_dir(src, shared)
    assert tree(tmp_path / "shared" / "features") == files
    storage.download_dir(shared, dst)
    assert tree(dst) == files


def test_upload_download_round_trip_remote(bucket, tmp_path):
    src, dst = tmp_path / "results", tmp_path / "back"
    files = make_tree(src)
    storage.upload_dir(str(src), "s3://bucket/raysys/sweep")
    assert tree(bucket["root"] / "raysys" / "sweep") == files
    (src / "a.txt").write_bytes(b"changed")  # a second upload replaces same-named files
    storage.upload_dir(str(src), "s3://bucket/raysys/sweep")
    storage.download_dir("s3://bucket/raysys/sweep", dst)
    assert tree(dst) == {**files, "a.txt": b"changed"}


def test_copy_errors(tmp_path):
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        storage.upload_dir(tmp_path / "f.txt", str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="not a folder"):
        storage.download_dir(str(tmp_path / "missing"), tmp_path / "out")
