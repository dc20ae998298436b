"""End to end on Ray Train: the smoke pretraining run, its run folder, and recovery from a killed worker.

These are the slow tests (each ``TorchTrainer.fit`` costs ~20 s of fixed overhead here): few and small.
"""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from raysys.config import make_config


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("builtin"))


def _scalars(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_smoke_pretrain_and_linear_eval(ray_session, builtin_root, s3_bucket, tmp_path):
    """The smoke run with ``--storage`` on the live object store: its run folder (evaluations and report
    included), checkpoints and TensorBoard events land in the bucket."""
    import boto3

    from raysys.distributed.experiment import pretrain_and_evaluate

    shared = f"{s3_bucket}/run"
    cfg = make_config("smoke", out=str(tmp_path / "run"), builtin_root=builtin_root, storage=shared).validate()
    summary = pretrain_and_evaluate(cfg)
    out = tmp_path / "run"
    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"))["Contents"]
    stored = {o["Key"].removeprefix("run/") for o in listed}
    assert {"config.json", "model.pt", "eval-msl.json", "eval-hirise.json", "summary.json", "report.html"} <= stored
    assert any(k.startswith("tb/events.out.tfevents") for k in stored), sorted(stored)
    assert any(k.startswith("pretrain/checkpoint_") and k.endswith("/state.pt") for k in stored), sorted(stored)

    assert summary["metrics"]["epoch"] == cfg.epochs
    assert json.loads((out / "config.json").read_text())["epochs"] == cfg.epochs
    scalars = _scalars(out / "tb")
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/data_wait_fraction",
                "train/false_negative_fraction"):
        assert tag in scalars
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["data_position"]["epoch"] == cfg.epochs
    for bench in ("msl", "hirise"):
        result = json.loads((out / f"eval-{bench}.json").read_text())
        assert 0.0 <= result["metrics"]["accuracy"] <= 1.0 and result["backbone_unchanged"]
        assert (out / f"eval-{bench}-random-init.json").exists()
    page = (out / "report.html").read_text()  # the run's one-page report, with its evaluations
    assert "<table" in page and "eval-msl" in page
    encoders = {(r["benchmark"], r["encoder"]) for r in summary["linear_eval"]}
    assert ("msl", "majority class") in encoders and ("hirise", "pretrained") in encoders


def _checkpoints(folder: Path) -> list[Path]:
    """Checkpoint folders (not Train's checkpoint_manager_snapshot.json)."""
    return [p for p in folder.rglob("checkpoint_*") if p.is_dir()]


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray names their process title after the actor class)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and b"TrainWorker" in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


def test_killed_worker_resumes_from_checkpoint(ray_session, builtin_root, tmp_path):
    from raysys.data.sources import resolve_data
    from raysys.distributed.trainer import pretrain

    cfg = make_config("smoke", out=str(tmp_path / "run"), builtin_root=builtin_root, epochs=20).validate()
    result = {}
    thread = threading.Thread(target=lambda: result.update(pretrain(cfg)))
    thread.start()
    storage = tmp_path / "run" / "ray"
    deadline = time.time() + 300
    while len(_checkpoints(storage)) < 2 and time.time() < deadline:
        time.sleep(0.2)
    assert len(_checkpoints(storage)) >= 2, "no checkpoints were written"
    # The controller registers reported checkpoints on its 2 s health-check poll; a checkpoint still
    # unregistered when the worker dies is lost (the epoch is redone), so let one poll pass.
    time.sleep(3)
    pids = _train_worker_pids()
    assert pids, "no Train worker found to kill"
    os.kill(pids[0], signal.SIGKILL)
    thread.join(timeout=600)
    assert not thread.is_alive()

    metrics = result["metrics"]
    assert metrics["epoch"] == cfg.epochs, "the run must finish its configured epochs"
    pool = resolve_data(cfg)[0].num_rows
    assert metrics["step"] == cfg.epochs * (pool // cfg.batch_size), "no epoch may be counted twice"
    assert metrics["start_epoch"] >= 1, "the restarted worker group must resume from a checkpoint"


def _latest_state(uri: str) -> dict:
    """The newest checkpoint's state in storage (``uri``: the run's ``--storage``), read back through pyarrow."""
    import io

    import pyarrow.fs as pafs

    from raysys import storage

    fs, path = storage.filesystem(storage.join(uri, "pretrain"))
    latest = max(i.path for i in fs.get_file_info(pafs.FileSelector(path))
                 if i.base_name.startswith("checkpoint_") and i.type == pafs.FileType.Directory)
    with fs.open_input_stream(f"{latest}/state.pt") as stream:
        return torch.load(io.BytesIO(stream.read()), weights_only=True)


def test_rerun_on_a_fresh_node_resumes_moco_with_its_queue_from_object_storage(ray_session, builtin_root, s3_bucket,
                                                                                tmp_path):
    """MoCo v2 + ESS-MB, 1 epoch with ``--storage`` on the live object store, then rerun for 2 with a new,
    empty ``--out`` (a fresh node): training continues from the checkpoint in storage, and so does the key
    queue (its pointer advances from where it stopped instead of from 0). The views come from Ray Data's
    tasks here (``augment_on="data"``), from the worker elsewhere."""
    import boto3

    from raysys.data.sources import resolve_data
    from raysys.distributed.trainer import pretrain

    shared = f"{s3_bucket}/run"
    options = dict(builtin_root=builtin_root, framework="moco", pair_rule="ess-mb", queue_size=1000,
                   augment_on="data", storage=shared)
    first = pretrain(make_config("smoke", epochs=1, out=str(tmp_path / "node-a"), **options).validate())
    assert first["metrics"]["epoch"] == 1 and first["metrics"]["start_epoch"] == 0
    assert first["metrics"]["positives_per_anchor"] > 1, "ESS-MB must add spatial positives to the instance one"
    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket.removeprefix("s3://"))["Contents"]
    keys = {o["Key"].removeprefix("run/") for o in listed}
    assert any(k.startswith("tb/events.out.tfevents") for k in keys), sorted(keys)
    assert any(k.startswith("pretrain/checkpoint_") and k.endswith("/state.pt") for k in keys), sorted(keys)
    assert {"model.pt", "config.json"} <= keys
    queue1 = _latest_state(shared)["objective"]["queue"]
    again = pretrain(make_config("smoke", epochs=2, out=str(tmp_path / "node-b"), **options).validate())
    assert again["metrics"]["start_epoch"] == 1, "a rerun with the same storage must continue, not restart"
    assert again["metrics"]["epoch"] == 2
    queue2 = _latest_state(shared)["objective"]["queue"]

    cfg = make_config("smoke", **options)
    pool = resolve_data(cfg)[0].num_rows
    size = pool - cfg.batch_size  # clamped: the queue can never hold an image twice
    keys_per_epoch = (pool // cfg.batch_size) * cfg.batch_size
    assert len(queue1["keys"]) == size and int(queue1["filled"]) == min(size, keys_per_epoch)
    assert int(queue1["ptr"]) == keys_per_epoch % size
    assert int(queue2["ptr"]) == (int(queue1["ptr"]) + keys_per_epoch) % size, "the queue must continue, not restart"


def test_storage_lost_mid_run_stops_with_a_clear_error_and_the_rerun_continues(ray_session, builtin_root, object_store,
                                                                              s3_bucket, tmp_path):
    """The object store stops after the first checkpoint: the run ends with StorageError (not a hang, not a
    bare Ray traceback), the checkpoint in storage is intact, and once the store is back the same command
    continues from it."""
    from raysys.distributed.trainer import pretrain
    from raysys.errors import StorageError

    shared = f"{s3_bucket}/run"
    cfg = make_config("smoke", epochs=3, out=str(tmp_path / "run"), builtin_root=builtin_root, storage=shared,
                      max_failures=0).validate()

    def stop_after_first_checkpoint():  # once Train has registered it (its snapshot in storage names it)
        from raysys import storage

        snapshot = storage.join(shared, "pretrain", "checkpoint_manager_snapshot.json")
        while True:
            try:
                if "checkpoint_" in storage.read_text(snapshot):
                    object_store.stop()
                    return
            except (OSError, ValueError):  # not written yet
                pass
            time.sleep(0.5)

    watcher = threading.Thread(target=stop_after_first_checkpoint, daemon=True)
    watcher.start()
    try:
        with pytest.raises(StorageError, match=r"training stopped: --storage s3://.*: storage cannot be reached"):
            pretrain(cfg)
    finally:
        watcher.join(timeout=60)
        object_store.start()
    kept = _checkpoint_names(shared)
    assert kept, "the checkpoint written before the store went down is still there"
    again = pretrain(cfg)
    assert again["metrics"]["start_epoch"] >= 1 and again["metrics"]["epoch"] == 3


def _checkpoint_names(uri: str) -> list[str]:
    import pyarrow.fs as pafs

    from raysys import storage

    fs, path = storage.filesystem(storage.join(uri, "pretrain"))
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return [i.base_name for i in infos if i.base_name.startswith("checkpoint_") and i.type == pafs.FileType.Directory]
