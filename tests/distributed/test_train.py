"""End to end on Ray Train: the smoke pretraining run, its run folder, and recovery from a killed worker.

These are the slow tests (each ``TorchTrainer.fit`` costs ~20 s of fixed overhead here): few and small.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import REPO, bucket_keys

from raysys.config import make_config


@pytest.fixture(scope="module")
def builtin_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("builtin"))


def _scalars(tb_dir: Path) -> set[str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def _user_root(tmp_path: Path) -> tuple[Path, Path]:
    """A ``--data`` root as a user lays it out: the benchmarks beside a pool folder of another name than the
    simulator's (the built-in smoke data, linked)."""
    from raysys.data.sources import builtin_roots

    builtin = builtin_roots(REPO / "data" / "builtin" / "smoke", "smoke", 0)
    root = tmp_path / "DATA"
    root.mkdir()
    for key, name in (("msl", "msl-labeled-data-set-v2.1"), ("hirise", "hirise-map-proj-v3_2"), ("rover", "real-unlabeled")):
        (root / name).symlink_to(builtin[key], target_is_directory=True)
    return root, Path(builtin["rover"])


def test_smoke_pretrain_and_linear_eval(ray_session, s3_bucket, tmp_path):
    """``raysys pretrain`` as a user runs it (its own process, joining this Ray) on their own ``--data`` root, with
    ``--storage`` on the live object store: a line per source, then one line per epoch on the console and Ray's own
    output in the run folder's log; it pretrains on the pool folder's images only; the run folder (evaluations and
    report included), checkpoints and TensorBoard events land in the bucket."""
    from raysys.data.formats import read_folder
    from raysys.data.sources import read_holdout

    shared = f"{s3_bucket}/run"
    root, pool = _user_root(tmp_path)
    cfg = make_config("smoke", out=str(tmp_path / "run"), storage=shared).validate()
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "raysys.cli", "pretrain", "--preset", "smoke", "--out", cfg.out,
                           "--storage", shared, "--data", str(root)], env=env, cwd=REPO, text=True, timeout=600,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.returncode == 0, proc.stdout
    out = tmp_path / "run"
    sources = [line for line in proc.stdout.splitlines() if line.startswith(("[raysys] pretraining pool:",
                                                                             "[raysys] evaluation:"))]
    assert len(sources) == 3 and str(root / "real-unlabeled") in sources[0], proc.stdout
    assert "MSL v2.1" in sources[1] and "HiRISE v3.2" in sources[2]
    import pyarrow.parquet as pq  # pretrained on: the pool's images (bar its held-out traverses), capped by the preset

    seen = pq.read_table(out / "pretrain-images.parquet").column("path").to_pylist()
    on_disk = read_folder(pool)
    held = set(read_holdout(pool))
    eligible = {p for p, t in zip(on_disk.column("path").to_pylist(), on_disk.column("traverse").to_pylist()) if t not in held}
    assert len(seen) == min(cfg.max_images, len(eligible)) and set(seen) <= eligible
    summary = json.loads((out / "summary.json").read_text())
    epochs = [line for line in proc.stdout.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == [f"{e}/{cfg.epochs}" for e in range(1, cfg.epochs + 1)], proc.stdout
    assert all(" loss " in line and " img/s" in line for line in epochs)
    assert "TrainingReport(" not in proc.stdout and "TrainingReport(" in (out / "ray-output.log").read_text()
    stored = {k.removeprefix("run/") for k in bucket_keys(s3_bucket)}
    assert {"config.json", "model.pt", "eval-msl.json", "eval-hirise.json", "summary.json", "report.html"} <= stored
    assert any(k.startswith("tb/events.out.tfevents") for k in stored), sorted(stored)
    assert any(k.startswith("pretrain/checkpoint_") and k.endswith("/state.pt") for k in stored), sorted(stored)

    assert summary["metrics"]["round"] == cfg.epochs
    assert json.loads((out / "config.json").read_text())["epochs"] == cfg.epochs
    scalars = _scalars(out / "tb")
    for tag in ("train/loss", "train/lr", "train/images_per_s", "train/data_wait_fraction",
                "train/false_negative_fraction"):
        assert tag in scalars
    saved = torch.load(out / "model.pt", weights_only=True)
    assert saved["data_position"]["round"] == cfg.epochs
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


def test_one_epoch_run_reclusters_as_planned_and_resumes_mid_epoch(ray_session, builtin_root, tmp_path):
    """Cluster-aware self-clustering on a pool its step budget cannot cover once (the archive case, at batch 16 on
    the smoke pool: 25 steps of its 29 an epoch): the run is cut into rounds, re-clusters at the
    planned steps and checkpoints inside its one epoch; a Train worker killed once the first checkpoint is
    registered resumes from it, mid-epoch, and no step is counted twice."""
    from raysys.config.schedule import Schedule
    from raysys.data.sources import resolve_data
    from raysys.distributed.trainer import pretrain

    cfg = make_config("smoke", builtin_root=builtin_root, out=str(tmp_path / "run"), batch_size=16, max_steps=25,
                      pair_rule="cluster", self_cluster_k=4, knn_monitor="").validate()
    plan = Schedule.of(cfg, resolve_data(cfg)[0].num_rows)
    assert plan.total_steps < plan.steps_per_epoch and plan.round_steps == 10, plan  # 1/15 of 25, floored at 10
    killed = threading.Event()
    watcher = _on_first_checkpoint(str(tmp_path / "run" / "ray"), lambda: killed.set() or _kill_a_train_worker())
    result = {}
    thread = threading.Thread(target=lambda: result.update(pretrain(cfg)))
    thread.start()
    thread.join(timeout=600)
    watcher.join(timeout=5)
    assert not thread.is_alive() and killed.is_set(), "the run must finish after its worker was killed"

    metrics = result["metrics"]
    assert metrics["step"] == cfg.max_steps, "the budget is spent once: no step counted twice"
    assert metrics["start_round"] >= 1 and metrics["round"] == plan.rounds, "the restarted group resumes from a round"
    states = [torch.load(c / "state.pt", weights_only=True) for c in _checkpoints(tmp_path / "run" / "ray")]
    assert all(0 < s["data_position"]["step"] < plan.steps_per_epoch for s in states), "checkpoints inside the epoch"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tb = EventAccumulator(str(tmp_path / "run" / "tb"))
    tb.Reload()
    reclustered = sorted({event.step for event in tb.Scalars("self_clusters/nmi")})
    every, first = cfg.self_cluster_every, cfg.self_cluster_warmup
    assert reclustered == [plan.steps(r) for r in range(first, plan.rounds, every)] == [10, 20]


def _kill_a_train_worker() -> None:
    pids = _train_worker_pids()
    assert pids, "no Train worker found to kill"
    os.kill(pids[0], signal.SIGKILL)


def _stored_states(uri: str) -> dict[int, dict]:
    """{epoch: state} of every complete checkpoint in storage (``uri``: the run's ``--storage``), read back
    through pyarrow; a checkpoint whose upload was cut off has no ``state.pt`` and is left out."""
    import io

    import pyarrow.fs as pafs

    from raysys import storage

    fs, path = storage.filesystem(storage.join(uri, "pretrain"))
    states = {}
    for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True)):
        file = f"{info.path}/state.pt"
        if info.base_name.startswith("checkpoint_") and fs.get_file_info(file).type == pafs.FileType.File:
            with fs.open_input_stream(file) as stream:
                state = torch.load(io.BytesIO(stream.read()), weights_only=True)
            states[state["data_position"]["round"]] = state
    return states


def _on_first_checkpoint(uri: str, action) -> threading.Thread:
    """Run ``action`` once Train has registered a checkpoint (its snapshot in storage names one): the point a
    resumed run is sure to start from."""
    from raysys import storage

    snapshot = storage.join(uri, "pretrain", "checkpoint_manager_snapshot.json")

    def watch():
        while True:
            try:
                if "checkpoint_" in storage.read_text(snapshot):
                    action()
                    return
            except (OSError, ValueError):  # not written yet
                pass
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return watcher


def test_store_lost_mid_run_then_a_fresh_node_continues_moco_with_its_queue(ray_session, builtin_root, object_store,
                                                                           s3_bucket, tmp_path):
    """MoCo v2 + ESS-MB with ``--storage`` on the live object store, which stops once Train has registered the
    first checkpoint: the run ends with StorageError (not a hang, not a bare Ray traceback), its checkpoint
    intact in storage. With the store back, a rerun with a new, empty ``--out`` (a fresh node) continues from
    that checkpoint, and so does the key queue (its pointer advances from where it stopped instead of from 0).
    The views come from Ray Data's tasks here (``augment_on="data"``), from the worker elsewhere."""
    from raysys.data.sources import resolve_data
    from raysys.distributed.trainer import pretrain
    from raysys.errors import StorageError

    shared, epochs = f"{s3_bucket}/run", 10  # 10: still training when the store stops, seconds after a checkpoint
    options = dict(builtin_root=builtin_root, framework="moco", pair_rule="ess-mb", queue_size=1000,
                   augment_on="data", storage=shared, max_failures=0, epochs=epochs)
    watcher = _on_first_checkpoint(shared, object_store.stop)
    try:
        with pytest.raises(StorageError, match=r"training stopped: --storage s3://.*: storage cannot be reached"):
            pretrain(make_config("smoke", out=str(tmp_path / "node-a"), **options).validate())
    finally:
        watcher.join(timeout=120)
        object_store.start()
    kept = _stored_states(shared)
    assert kept, "the checkpoint written before the store went down is intact"

    again = pretrain(make_config("smoke", out=str(tmp_path / "node-b"), **options).validate())
    resumed = again["metrics"]["start_round"]
    assert resumed in kept and resumed < epochs, "a rerun with the same storage must continue, not restart"
    assert again["metrics"]["round"] == epochs
    assert again["metrics"]["positives_per_anchor"] > 1, "ESS-MB must add spatial positives to the instance one"
    keys = {k.removeprefix("run/") for k in bucket_keys(s3_bucket)}
    assert any(k.startswith("tb/events.out.tfevents") for k in keys), sorted(keys)
    assert {"model.pt", "config.json"} <= keys

    cfg = make_config("smoke", **options)
    pool = resolve_data(cfg)[0].num_rows
    size = pool - cfg.batch_size  # clamped: the queue can never hold an image twice
    keys_per_epoch = (pool // cfg.batch_size) * cfg.batch_size
    queue1, queue2 = kept[resumed]["objective"]["queue"], _stored_states(shared)[epochs]["objective"]["queue"]
    assert len(queue1["keys"]) == size and int(queue1["filled"]) == min(size, resumed * keys_per_epoch)
    assert int(queue1["ptr"]) == resumed * keys_per_epoch % size
    assert int(queue2["ptr"]) == epochs * keys_per_epoch % size, "the queue must continue, not restart"
