"""The Ray runtime: joining or starting a cluster, what it can give, and publishing a run folder.

Sizing rules live here so a pretraining run, a sweep's trials and the clustering step agree on them.
"""

from __future__ import annotations

import os
from pathlib import Path

import ray

from raysys.errors import ConfigError
from raysys.storage import is_local, join, upload_dir


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. under ``ray job submit``) or start a local one."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # Local: the dashboard on 127.0.0.1 only. It must run: Ray Train's PlacementGroupCleaner asks its state
        # API whether a controller died (e.g. a trial stopped by ASHA), or that trial's CPUs are never freed.
        local = {} if address else {"include_dashboard": True, "dashboard_host": "127.0.0.1"}
        ray.init(address=address, log_to_driver=True, **local)


def worker_resources(cfg, cluster_cpus: float, reserved_cpus: float = 0.0, concurrent: int = 1) -> dict:
    """Resources per Train worker of ``cfg`` (a PretrainConfig), derived from the cluster's CPU count.

    ``concurrent`` runs share the cluster, each after ``reserved_cpus`` (e.g. a Tune trial's driver).
    Train workers must leave at least one CPU for Ray Data's decode/augment tasks, or the pipeline
    can wait forever for a CPU (observed with Ray 2.60).
    """
    workers = cfg.workers * concurrent
    spare = max(cluster_cpus - 1.0 - reserved_cpus * concurrent, 0.25 * workers)
    cpus = cfg.cpus_per_worker or min(2.0, max(0.25, spare / workers))
    resources = {"CPU": round(cpus, 3)}
    if cfg.gpus_per_worker:
        resources["GPU"] = cfg.gpus_per_worker
    return resources


def torch_threads(local_workers: int) -> int:
    """Intra-op threads per worker: this node's cores shared by the workers placed on it."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_workers))


def check_cluster(cfg, concurrent: int = 1) -> None:
    """Refuse GPU requests the cluster can never meet (it would wait forever). An autoscaling cluster
    counts with the most its node types can reach, not with the nodes up now."""
    need = cfg.gpus_per_worker * cfg.workers * concurrent
    if not need:
        return
    try:
        from ray._private.state import (
            state,  # private, but what Ray Train itself checks against
        )

        most = state.get_max_resources_from_cluster_config() or ray.cluster_resources()
    except Exception:  # noqa: BLE001 - a moved private API must not block training
        most = ray.cluster_resources()
    if most.get("GPU", 0) < need:
        raise ConfigError(f"--gpus-per-worker {cfg.gpus_per_worker} x {cfg.workers} worker(s) needs {need:g} GPU(s) but the "
                          f"cluster has at most {most.get('GPU', 0):g}; drop --gpus-per-worker to train on CPU or add GPU nodes")


def shared_copy(out: Path, storage: str | None, *parts: str) -> str | None:
    """Where the run folder ``out`` (or ``parts`` of it) is published: under ``storage``, unless that is
    ``out`` itself or unset (None)."""
    if not storage or (is_local(storage) and Path(storage).resolve() == Path(out).resolve()):
        return None
    return join(storage, *parts) if parts else storage


def publish_run(out: Path, storage: str | None) -> None:
    """Copy the run folder to ``storage`` (beside its checkpoints), where every node and the user can reach it."""
    if shared := shared_copy(out, storage):
        upload_dir(out, shared)
