"""The K sweep on Ray Tune, end to end at smoke scale: results, false-negative accounting, TensorBoard
HParams over HTTP, interrupt + --resume, and submission with ``ray job submit`` to a ``ray start`` cluster."""

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from helpers import REPO, batch_mean_tolerance, free_port, same_class_share

from raysys.reporting import results as report

SWEEP_K = str(REPO / "experiments" / "sweep_k.py")


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture(scope="module")
def smoke_sweep(ray_session, tmp_path_factory):
    """One smoke sweep with oracle clusters: baseline, cluster-aware (K ignored by oracle), supervised."""
    from raysys.distributed.sweep import main, variant

    out = tmp_path_factory.mktemp("sweep") / "sweep_k"
    grid = dict(variants=[variant("baseline"), variant("cluster", k=4)], encoder="oracle")
    code = main("sweep_k", "test", lambda p: (lambda args, preset: grid), ["--preset", "smoke", "--out", str(out)])
    assert code == 0
    return out


def test_sweep_writes_results_summary_and_plots(smoke_sweep):
    rows = report.read_results_csv(smoke_sweep / "results.csv")
    assert sorted(r["method"] for r in rows) == ["baseline", "cluster", "supervised"]
    for r in rows:
        for key in ("msl_acc", "msl_balanced_acc", "hirise_acc", "hirise_balanced_acc", "pretrain_seconds"):
            assert r[key] is not None and r[key] >= 0, (r["trial"], key)
        for key in ("msl_knn_acc", "hirise_knn_acc") if r["method"] != "supervised" else ():
            assert r[key] is not None and r[key] >= 0, (r["trial"], key)
    summary = (smoke_sweep / "summary.md").read_text()
    assert "| cluster |" in summary and "Reproduce:" in summary
    for bench in ("msl", "hirise"):
        png = smoke_sweep / f"sweep_k-{bench}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_oracle_clusters_remove_false_negatives(smoke_sweep):
    rows = {r["method"]: r for r in report.read_results_csv(smoke_sweep / "results.csv")}
    baseline, cluster = rows["baseline"]["fn_fraction"], rows["cluster"]["fn_fraction"]
    # The clean oracle (clusters = the hidden classes) removes exactly the false negatives.
    assert cluster == 0.0 and rows["cluster"]["cluster_nmi"] == pytest.approx(1.0)
    assert rows["cluster"]["removed_precision"] == pytest.approx(1.0) and rows["cluster"]["removed_recall"] == 1.0
    # Independent reference: the chance that two distinct images of the pool the baseline actually trained on
    # (held-out traverses removed, capped) share a hidden class; the reported fraction is the mean over the
    # last epoch's batches, so the tolerance is four standard errors of a mean over that many batches.
    from raysys.config import PretrainConfig
    from raysys.data.sources import resolve_data

    cfg = PretrainConfig.from_dict(json.loads((smoke_sweep / "trials" / rows["baseline"]["trial"] / "config.json").read_text()))
    labels = resolve_data(cfg)[0].column("label").to_numpy()
    expected, batches = same_class_share(labels), len(labels) // cfg.batch_size
    assert abs(baseline - expected) < batch_mean_tolerance(labels, cfg.batch_size, batches), (baseline, expected)


def test_tensorboard_serves_hparams_with_k_and_accuracies(smoke_sweep):
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(smoke_sweep), "--host", "127.0.0.1",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def experiment():
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/data/plugin/hparams/experiment",
                data=json.dumps({"experimentName": ""}).encode(), headers={"Content-Type": "application/json"},
            )
            try:
                body = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                return None
            return body if body.get("hparamInfos") else None

        body = _wait_for(experiment, 120, "the HParams plugin to list the sweep")
        hparams = {h["name"] for h in body["hparamInfos"]}
        metrics = {m["name"]["tag"] for m in body["metricInfos"]}
        assert any(name.endswith("k") for name in hparams), hparams
        assert any(tag.endswith("msl_acc") for tag in metrics) and any(tag.endswith("hirise_acc") for tag in metrics)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _sweep_cmd(out, *extra):
    return [sys.executable, SWEEP_K, "--preset", "smoke", "--out", str(out), "--encoder", "oracle",
            "--no-supervised", "--k", "4", *extra]


@pytest.mark.e2e
def test_killed_driver_resumes_from_object_storage_alone(object_store, s3_bucket, tmp_path):
    """SIGKILL the sweep driver (no chance to save anything) after its first trial. With the object store down,
    --resume stops at once with one line; once it is back, --resume on a fresh --out (another machine) finishes
    from what is in storage alone, without rerunning the finished trial."""
    from raysys import storage

    shared, out, fresh = f"{s3_bucket}/sweep", tmp_path / "sweep", tmp_path / "fresh-node"
    ray_tmp = tempfile.mkdtemp(prefix="rk", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp}
    proc = subprocess.Popen(_sweep_cmd(out, "--storage", shared), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for(lambda: len(report.read_results_csv(out / "results.csv")) >= 1 or proc.poll() is not None,
                  600, "the first trial to finish")
        assert proc.poll() is None, "the sweep ended before it could be killed"
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        _kill_processes_mentioning(ray_tmp)  # the killed driver's local Ray, if anything outlived it
    finished = {r["trial"] for r in report.read_results_csv(out / "results.csv")}
    assert len(finished) == 1

    object_store.stop()
    try:
        down = subprocess.run(_sweep_cmd(fresh, "--storage", shared, "--resume"), cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    finally:
        object_store.start()
    assert down.returncode == 2, down.stderr[-3000:]
    assert down.stderr.strip().splitlines()[-1].startswith(f"sweep_k: error: --storage {shared}: storage cannot be "
                                                           "reached or written"), down.stderr[-3000:]
    assert not (fresh / "trials").exists(), "nothing started while storage was down"

    resumed = subprocess.run(_sweep_cmd(fresh, "--storage", shared, "--resume"), cwd=REPO, env=env,
                             capture_output=True, text=True, timeout=900)
    _kill_processes_mentioning(ray_tmp)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = report.read_results_csv(fresh / "results.csv")
    assert sorted(r["method"] for r in rows) == ["baseline", "cluster"], "every trial exactly once"
    for name in finished:
        starts = storage.read_text(storage.join(shared, "trials", name, "attempts.log")).splitlines()
        assert len(starts) == 1, f"finished trial {name} was rerun"
        assert not (fresh / "trials" / name / "attempts.log").exists(), f"finished trial {name} was started again"
    assert storage.read_bytes(storage.join(shared, "results.csv")) == (fresh / "results.csv").read_bytes()


def _agent_ports() -> list[str]:
    """Every agent port explicit: the defaults (e.g. 52365) are taken by the test session's own Ray."""
    return [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def _trial_nodes(out: Path, trial: str) -> set:
    return {w["node_id"] for w in json.loads((out / "trials" / trial / "workers.json").read_text())}


def _stored(uri: str) -> list[str]:
    """Every file under ``uri``, relative to it, listed through pyarrow."""
    import pyarrow.fs as pafs

    from raysys import storage

    fs, path = storage.filesystem(uri)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sorted(i.path[len(path) + 1:] for i in infos if i.type == pafs.FileType.File)


@pytest.mark.e2e
def test_job_on_two_nodes_survives_losing_a_node(object_store, s3_bucket, tmp_path):
    """`ray job submit` to a 2-node `ray start` cluster with storage on the object store: the first trial's
    Train workers run on both nodes, and its checkpoints and TensorBoard events land in storage; the worker
    node is then SIGKILLed while the second trial trains, which resumes from storage on the head node."""
    from raysys import storage
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs_port, dash_port, worker_raylet_port = free_port(), free_port(), free_port()
    # Local `ray start` clusters enable token authentication; the CLI must be told to send the token.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token"}
    ray_cli = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray_cli, "start", "--head", f"--port={gcs_port}", "--num-cpus=3", "--include-dashboard=true",
                    "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", f"--temp-dir={temp_dir}",
                    f"--ray-client-server-port={free_port()}", *_agent_ports()],
                   env=env, check=True, capture_output=True, timeout=180)
    job = None
    try:
        subprocess.run([ray_cli, "start", f"--address=127.0.0.1:{gcs_port}", "--num-cpus=2",
                        f"--node-manager-port={worker_raylet_port}", f"--object-manager-port={free_port()}",
                        *_agent_ports()], env=env, check=True, capture_output=True, timeout=180)
        out, shared = tmp_path / "sweep", f"{s3_bucket}/shared-storage"
        # SPREAD (not STRICT_SPREAD): after the node is lost both workers must fit on the head.
        submit = [ray_cli, "job", "submit", "--address", f"http://127.0.0.1:{dash_port}", "--",
                  *_sweep_cmd(out, "--workers", "2", "--cpus-per-worker", "0.5", "--placement", "SPREAD",
                              "--epochs", "8", "--storage", shared)]
        attempts = []

        def submitted():  # the job agent comes up some seconds after `ray start` returns
            proc = subprocess.Popen(submit, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            time.sleep(5)
            if proc.poll() is not None:
                attempts.append(proc.stdout.read()[-500:])
                return None if "No available agent" in attempts[-1] else proc
            return proc

        try:
            job = _wait_for(submitted, 300, "the job agent to accept the submission")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; last answer: {attempts[-1] if attempts else None}") from None
        first, second = "baseline-t0.5-s0", "cluster-k4-t0.5-s0"
        _wait_for(lambda: (out / "trials" / first / "workers.json").exists() or job.poll() is not None, 600,
                  "the first trial to finish")
        checkpoints = storage.join(shared, "trials", second, "pretrain")
        _wait_for(lambda: len({f.split("/")[0] for f in _stored(checkpoints) if f.startswith("checkpoint_")}) >= 2
                  or job.poll() is not None, 600, "the second trial's second checkpoint")
        time.sleep(3)  # Train registers a reported checkpoint on its 2 s poll: let the first one register
        assert not (out / "trials" / second / "final.json").exists(), "the second trial ended before the node loss"
        _kill_processes_mentioning(f"--node_manager_port={worker_raylet_port}")  # the worker node's raylet
        log = job.communicate(timeout=900)[0]
        assert job.returncode == 0 and "succeeded" in log, log[-3000:]
    finally:
        if job is not None and job.poll() is None:
            job.kill()
        _kill_processes_mentioning(temp_dir)  # `ray stop` would also stop the test session's own Ray
    assert sorted(r["trial"] for r in report.read_results_csv(out / "results.csv")) == [first, second]
    assert len(_trial_nodes(out, first)) == 2, "the first trial's workers must span both nodes"
    assert len(_trial_nodes(out, second)) == 1, "after the node loss the workers run on the head alone"
    final = json.loads(storage.read_text(storage.join(shared, "trials", second, "final.json")))
    assert final["resumed_from_round"] >= 1 and final["msl_acc"] is not None, "resumed from a checkpoint, then evaluated"
    assert storage.read_bytes(storage.join(shared, "results.csv")) == (out / "results.csv").read_bytes()
    spanned = _stored(storage.join(shared, "trials", first))
    assert any(f.startswith("tb/events.out.tfevents") for f in spanned), spanned
    assert any(f.startswith("pretrain/checkpoint_") and f.endswith("/state.pt") for f in spanned), spanned


def _kill_processes_mentioning(text: str) -> None:
    """SIGKILL every process whose command line names ``text`` (the cluster's own temp dir), and their
    descendants (Ray's agents rename their command lines)."""
    parents = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit():
                parents[int(proc.name)] = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    doomed = set()
    for pid in parents:
        try:
            if text.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                doomed.add(pid)
        except OSError:
            continue
    while True:
        children = {pid for pid, ppid in parents.items() if ppid in doomed} - doomed
        if not children:
            break
        doomed |= children
    for pid in doomed:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue
