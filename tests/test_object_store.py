"""raysys.storage against a live S3-compatible server (moto, started by the ``object_store`` fixture on
127.0.0.1 and reached through the standard AWS variables, as a user's MinIO or Ceph would be): round
trips, folders, put-if-absent, the start-up check, and retries while the server is down."""

import threading

import boto3
import pytest
from helpers import bucket_keys

from raysys import storage
from raysys.errors import ConfigError, StorageError


def keys(bucket_uri: str) -> dict:
    """{key: bytes} of every object in the bucket, read with boto3 (independently of pyarrow)."""
    s3, bucket = boto3.client("s3"), bucket_uri.removeprefix("s3://")
    return {key: s3.get_object(Bucket=bucket, Key=key)["Body"].read() for key in bucket_keys(bucket_uri)}


def test_round_trip_folders_and_put_if_absent(s3_bucket, tmp_path):
    uri = f"{s3_bucket}/sweep/results.csv"
    assert not storage.exists(uri)
    storage.write_text_atomic(uri, "trial,acc\n1,0.5\n")
    storage.write_text_atomic(uri, "trial,acc\n1,0.6\n")
    assert keys(s3_bucket) == {"sweep/results.csv": b"trial,acc\n1,0.6\n"}  # no temporary key left
    assert storage.read_text(uri) == "trial,acc\n1,0.6\n" and storage.exists(uri)

    (tmp_path / "run" / "tb").mkdir(parents=True)
    (tmp_path / "run" / "tb" / "events.out").write_bytes(b"\x00\x01" * 100)
    (tmp_path / "run" / "final.json").write_text("{}")
    storage.upload_dir(tmp_path / "run", f"{s3_bucket}/trials/t0")
    assert keys(s3_bucket)["trials/t0/tb/events.out"] == b"\x00\x01" * 100
    storage.download_dir(f"{s3_bucket}/trials/t0", tmp_path / "copy")
    assert (tmp_path / "copy" / "tb" / "events.out").read_bytes() == b"\x00\x01" * 100

    entry = f"{s3_bucket}/cache/features/abc.npz"
    assert not storage.fetch_if_present(entry, tmp_path / "fetched.npz")
    assert storage.put_if_absent(tmp_path / "run" / "final.json", entry)
    (tmp_path / "other.npz").write_bytes(b"a different computation")
    assert not storage.put_if_absent(tmp_path / "other.npz", entry)  # the first copy stays
    assert storage.fetch_if_present(entry, tmp_path / "fetched.npz")
    assert (tmp_path / "fetched.npz").read_text() == "{}"


def test_start_check_names_the_uri_and_the_fix(s3_bucket, monkeypatch):
    storage.check_reachable(f"{s3_bucket}/run")
    assert keys(s3_bucket) == {}, "the write check cleans up after itself"
    with pytest.raises(ConfigError, match=r"--storage s3://no-such-bucket-x/run: bucket 'no-such-bucket-x' does "
                                          r"not exist; create it \(aws s3 mb s3://no-such-bucket-x\)"):
        storage.check_reachable("s3://no-such-bucket-x/run")
    from helpers import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(ConfigError, match=r"s3://.*/run: storage cannot be reached or written \(.*\); check the "
                                          r"endpoint \(AWS_ENDPOINT_URL"):
        storage.check_reachable(f"{s3_bucket}/run")


def test_server_down_is_retried_then_reported(object_store, s3_bucket, monkeypatch):
    uri = f"{s3_bucket}/sweep/results.csv"
    storage.write_text_atomic(uri, "old\n")
    monkeypatch.setattr(storage, "BACKOFF_S", 2.0)
    object_store.stop()
    restart = threading.Timer(3.0, object_store.start)  # back while the write is still retrying
    restart.start()
    try:
        storage.write_text_atomic(uri, "new\n")
    finally:
        restart.join()
    assert keys(s3_bucket) == {"sweep/results.csv": b"new\n"}

    monkeypatch.setattr(storage, "RETRIES", 2)
    monkeypatch.setattr(storage, "BACKOFF_S", 0.1)
    object_store.stop()
    try:
        with pytest.raises(StorageError, match=r"writing s3://.*/sweep/results.csv failed 2 times .*what storage "
                                               r"already holds is intact"):
            storage.write_text_atomic(uri, "newer\n")
    finally:
        object_store.start()
    assert keys(s3_bucket) == {"sweep/results.csv": b"new\n"}


def test_tensorboard_synced_each_epoch_is_read_from_the_store(object_store, s3_bucket, tmp_path, monkeypatch, capsys):
    """What the workers do after every epoch, and what a user's TensorBoard does with it: read the trial's
    scalars straight from ``s3://`` (TensorBoard's S3 reader uses boto3, which honours AWS_ENDPOINT_URL)."""
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer
    from torch.utils.tensorboard import SummaryWriter

    from raysys.distributed.worker import sync_tensorboard

    tb, uri = tmp_path / "trials" / "t0" / "tb", f"{s3_bucket}/sweep/trials/t0/tb"
    with SummaryWriter(str(tb)) as writer:
        writer.add_scalar("train/loss", 2.0, 0)
        writer.flush()
        sync_tensorboard(str(tb), uri)  # epoch 1
        writer.add_scalar("train/loss", 1.5, 1)
        writer.flush()
        sync_tensorboard(str(tb), uri)  # epoch 2: the grown file replaces the first copy
    runs = EventMultiplexer()
    runs.AddRunsFromDirectory(f"{s3_bucket}/sweep")
    runs.Reload()
    assert [(e.step, e.value) for e in runs.Scalars("trials/t0/tb", "train/loss")] == [(0, 2.0), (1, 1.5)]

    monkeypatch.setattr(storage, "RETRIES", 1)
    object_store.stop()
    try:
        sync_tensorboard(str(tb), uri)  # a warning, not a failed run: the checkpoint is what must not be lost
    finally:
        object_store.start()
    assert "warning: TensorBoard files not synced this round" in capsys.readouterr().out
