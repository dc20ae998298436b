"""Contrastive pretraining on Ray Train, driver side: a ``TorchTrainer`` running DDP (gloo on CPU, nccl on GPU).

:func:`pretrain`: find the data (:mod:`raysys.data.sources`), build the Ray Data two-view stream, size the
workers from what the cluster has, fit (:func:`raysys.distributed.worker.train_loop` on every rank),
export ``model.pt``. Rerunning with the same output folder resumes from the latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
import ray.train
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raysys import storage
from raysys.config import PretrainConfig
from raysys.config.schedule import Schedule
from raysys.data.decode import load_images
from raysys.data.schema import image_key
from raysys.data.sources import resolve_data, unseen_pool
from raysys.distributed.console import say
from raysys.distributed.pipeline import FileReport, decoded_pool, pretrain_dataset, write_file_report
from raysys.distributed.progress import round_progress
from raysys.distributed.runtime import (
    check_cluster,
    init_ray,
    publish_run,
    shared_copy,
    worker_resources,
)
from raysys.distributed.worker import STATE_FILE, train_loop
from raysys.errors import ConfigError, StorageError
from raysys.eval.knn import load_curve_data, load_monitor_data
from raysys.methods.pairs import RULES, default_radius
from raysys.methods.pretext import has_colour
from raysys.models.io import MODEL_FILE, save_model

log = logging.getLogger(__name__)

RUN_NAME = "pretrain"
SELF_CLUSTERS_FILE = "clusters.parquet"  # a self-clustering run's last cluster table
IMAGES_FILE = "pretrain-images.parquet"  # the pretraining manifest: image_id, path, split, domain
CURVE_FILE = "curve.json"  # eval_every: the evaluation curve, the initial weights' digest and the first batch


def _knn_monitor_data(cfg: PretrainConfig, benchmarks: dict):
    """The kNN monitor's decoded images in the object store (workers fetch them), or None when off -- or when
    the evaluation curve (``eval_every``) scores the model more often and on more images."""
    if not cfg.knn_monitor or cfg.eval_every:
        return None
    if cfg.knn_monitor not in benchmarks:
        log.warning("kNN monitor: no %s benchmark beside the pretraining data; monitor off", cfg.knn_monitor)
        return None
    return ray.put(load_monitor_data(benchmarks[cfg.knn_monitor], cfg.image_size, seed=cfg.seed))


def _curve_data(cfg: PretrainConfig, manifest: pa.Table):
    """The evaluation curve's decoded images in the object store, or None when ``eval_every`` is 0."""
    if not cfg.eval_every:
        return None
    try:
        data = load_curve_data(unseen_pool(cfg, manifest), cfg.image_size, seed=cfg.seed)
    except ValueError as exc:
        raise ConfigError(f"evaluation curve: {exc}; it needs a pool with hidden labels (the built-in data)") from None
    return ray.put(data)


def with_step_budget(cfg: PretrainConfig, pool_size: int) -> PretrainConfig:
    """A step-budget run's config with the epochs that hold its ``max_steps``; any other config as it is."""
    if cfg.max_steps is None:
        return cfg
    return cfg.replace(epochs=math.ceil(cfg.max_steps / (pool_size // cfg.batch_size)))


def check_colour(cfg: PretrainConfig, manifest: pa.Table, sample: int = 64) -> None:
    """A method that predicts colour (colorization) refuses a pool whose images are all one-channel, such as
    HiRISE's, judged from ``sample`` images spread over the pool, before anything starts."""
    if not cfg.objective.needs_colour or manifest.num_rows == 0:
        return
    paths = manifest.column("path").to_pylist()[::max(1, manifest.num_rows // sample)][:sample]
    images, _, _ = load_images(paths, 32)
    if len(images) and not has_colour(images):
        raise ConfigError(f"--framework {cfg.framework} predicts colour, but the pretraining pool is one-channel "
                          f"(grayscale, like HiRISE; {len(images)} images checked): pretrain on colour images "
                          "or choose another method")


def complete_spatial_defaults(cfg: PretrainConfig, manifest: pa.Table) -> PretrainConfig:
    """ESS rules without an explicit radius: the config with it (and sigma) derived from the pool's frame
    spacing, said on stdout; any other config as it is."""
    rule = RULES[cfg.pair_rule]
    weighted = "sigma" in rule.options  # only ESS-MW has a sigma
    if not rule.spatial or (cfg.ess_radius is not None and (cfg.ess_sigma is not None or not weighted)):
        return cfg
    try:
        found = default_radius(*(manifest.column(c).to_numpy(zero_copy_only=False) for c in ("x", "y", "traverse", "frame")))
    except ValueError as exc:
        raise ConfigError(f"--pair-rule {cfg.pair_rule}: {exc} (--ess-radius, --ess-sigma); ESS needs a "
                          f"positions sidecar with traverse and frame columns") from None
    cfg = cfg.replace(ess_radius=found["r"] if cfg.ess_radius is None else cfg.ess_radius,
                      ess_sigma=found["sigma"] if weighted and cfg.ess_sigma is None else cfg.ess_sigma)
    sigma = f", sigma {cfg.ess_sigma:.2f} m" if weighted else ""
    print(f"[raysys] {cfg.pair_rule}: radius {cfg.ess_radius:.2f} m{sigma} "
          f"(median step between frames {found['median_step']:.2f} m)")
    return cfg


def export_model(checkpoint: ray.train.Checkpoint, path: Path, manifest: pa.Table, curve_path: Path) -> None:
    """Write the final weights as a standalone ``model.pt`` (no optimizer state) and, for a self-clustering
    run, its last cluster table as ``clusters.parquet`` beside it; with an evaluation curve, ``curve_path``."""
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    if state.get("curve"):
        curve = {key: value for key, value in state["curve"].items() if key != "window"}
        storage.write_text_atomic(str(curve_path), json.dumps(curve, indent=1))
    save_model(path, state["model"], state["model_spec"], state["config"], data_position=state["data_position"])
    storage.write_text_atomic(str(path.parent / "workers.json"), json.dumps(state.get("workers", []), indent=2))
    if (state.get("self_clusters") or {}).get("round", -1) >= 0:
        export_self_clusters(state["self_clusters"], manifest, path.parent / SELF_CLUSTERS_FILE)


def export_self_clusters(table: dict, manifest: pa.Table, path: Path) -> None:
    """The self-clustering table (image keys -> ids) as ``image_id,cluster_id`` Parquet, the format of
    ``raysys cluster --out`` (so ``--cluster-ids`` can reuse it)."""
    name_of = {image_key(i): i for i in manifest.column("image_id").to_pylist()}
    keys, ids = table["keys"].tolist(), table["ids"].tolist()
    found = [(name_of[key], cluster) for key, cluster in zip(keys, ids) if key in name_of]
    out = pa.table({"image_id": pa.array([f[0] for f in found], pa.string()),
                    "cluster_id": pa.array([f[1] for f in found], pa.int64())})
    with storage.atomic_local_path(path) as tmp:
        pq.write_table(out.replace_schema_metadata({"raysys.encoder": "self", "raysys.round": str(table["round"])}), tmp)


def _run_data(cfg: PretrainConfig, manifest: pa.Table, benchmarks: dict, schedule: Schedule, report) -> dict:
    """What the workers read, for :func:`_trainer`: the two-view stream or the paired pool, the kNN monitor's and
    the evaluation curve's images."""
    data = {"monitor": _knn_monitor_data(cfg, benchmarks), "curve": _curve_data(cfg, manifest)}
    if cfg.paired_batches:
        data["paired_pool"] = ray.put(decoded_pool(manifest, cfg.image_size, report))
    else:
        # The decode cache pays from the second pass; before the first step it costs a whole pass of the pool.
        cache = cfg.cache_decoded and schedule.total_steps > schedule.steps_per_epoch
        data["dataset"] = pretrain_dataset(manifest, cfg.augment_config, cfg.image_size, report, cache=cache,
                                           seed=cfg.seed, views=cfg.views_on == "data" and cfg.objective.inputs == "views",
                                           decode_size=cfg.decode_size)
    return data


def _trainer(cfg: PretrainConfig, manifest: pa.Table, out: Path, data: dict, callbacks, resources: dict,
             concurrent: int):
    """The ``TorchTrainer`` of one run: every rank runs :func:`train_loop`; checkpoints under ``--storage``.
    ``data``: the Ray Data stream (``dataset``) or the paired pool's object (``paired_pool``), and the
    kNN monitor's and the evaluation curve's images (objects or None)."""
    return TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "num_images": manifest.num_rows, "tb_dir": str(out / "tb"),
                           "tb_storage": shared_copy(out, cfg.storage, "tb"),
                           "labels": bool(pc.any(pc.greater_equal(manifest.column("label"), 0)).as_py()),
                           "knn_monitor": data["monitor"], "curve_data": data["curve"],
                           "paired_pool": data.get("paired_pool"), "concurrent": concurrent},
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=cfg.gpus_per_worker > 0,
                                     placement_strategy=cfg.placement, resources_per_worker=resources),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=cfg.storage or str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": data["dataset"]} if "dataset" in data else {},
    )


def pretrain(
    cfg: PretrainConfig,
    manifest: pa.Table | None = None,
    benchmarks: dict[str, Path] | None = None,
    callbacks: list | None = None,
    reserved_cpus: float = 0.0,
    concurrent: int = 1,
    progress: bool = False,
) -> dict:
    """Pretrain per ``cfg``; returns the final metrics, the run folder, the benchmarks found and the config
    that ran (validated, ESS defaults derived).

    ``manifest``/``benchmarks`` default to :func:`resolve_data`; a sweep passes its own (e.g. with
    cluster ids attached), its Train callbacks, and the CPUs its trials reserve. ``progress``: one line per
    epoch on the console.
    """
    cfg = cfg.validate()
    begin, began_at = time.perf_counter(), time.time()
    if cfg.storage:
        storage.check_reachable(cfg.storage)
    if manifest is None:
        manifest, benchmarks = resolve_data(cfg)  # fails fast, before Ray starts
    if cfg.pair_rule == "cluster" and not cfg.self_cluster_k and "cluster_id" not in manifest.column_names:
        raise ConfigError("--pair-rule cluster needs cluster ids; pass --cluster-ids FILE "
                          "(from `raysys cluster --k K --out FILE`) or let the model make them (--self-cluster-k K)")
    check_colour(cfg, manifest)
    cfg = with_step_budget(complete_spatial_defaults(cfg, manifest), manifest.num_rows).validate()
    schedule = Schedule.of(cfg, manifest.num_rows)
    schedule.check(cfg)
    if progress and schedule.unit != "epoch":
        say(f"[raysys] {schedule.describe()}")
    init_ray()
    check_cluster(cfg, concurrent)  # before anything is written: a rejected run leaves the folder as it was
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    with storage.atomic_local_path(out / IMAGES_FILE) as tmp:  # which images this encoder saw, for the record
        pq.write_table(manifest.select(["image_id", "path", "split", "domain"]), tmp)
    report = FileReport.remote()
    data = _run_data(cfg, manifest, benchmarks or {}, schedule, report)
    start = time.perf_counter()
    resources = worker_resources(cfg, ray.cluster_resources().get("CPU", 1.0), reserved_cpus, concurrent)
    with round_progress(progress) as shown:
        trainer = _trainer(cfg, manifest, out, data, [*(callbacks or []), *shown], resources, concurrent)
        try:
            result = trainer.fit()
        except Exception as exc:
            raise _storage_failure(cfg.storage) or exc
    seconds = time.perf_counter() - start
    skipped = write_file_report(report, out)["skipped"]
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint; see the Ray logs under {out / 'ray'}")
    export_model(result.checkpoint, out / MODEL_FILE, manifest, out / CURVE_FILE)
    publish_run(out, cfg.storage)
    return {"metrics": result.metrics, "out": out, "benchmarks": benchmarks or {}, "config": cfg,
            "skipped_files": len(skipped), "seconds": seconds,
            "timing": run_timing(start - begin, seconds, time.perf_counter() - start - seconds, result.metrics or {},
                                 began_at)}


def _storage_failure(uri: str | None) -> StorageError | None:
    """When a run fails, whether lost storage is why (checkpoints can no longer be written): a
    StorageError saying so and how to continue, or None."""
    if not uri or storage.is_local(uri):
        return None
    try:
        storage.check_reachable(uri)
    except ConfigError as exc:
        return StorageError(f"training stopped: {exc}. The checkpoints already in storage are intact; when it is "
                            "back, rerun the same command to continue from the last one")
    return None


def run_timing(before_fit: float, fit: float, after_fit: float, metrics: dict, began_at: float | None = None) -> dict:
    """Where a run's wall time went: train steps, and the fixed cost around them -- before the fit (data,
    Ray start), inside it but outside the steps (Ray Train start, dataset planning, the decode cache's first
    pass, kNN monitor, checkpoints) and after it (export, publishing); with ``began_at`` (the run's start, wall
    clock), the time to the first optimizer step of the worker that finished the run."""
    steps = min(fit, metrics.get("step_seconds", 0.0))
    timing = {"steps": steps, "before_fit": before_fit, "fit_outside_steps": fit - steps, "after_fit": after_fit}
    if began_at is not None and metrics.get("first_step_at"):
        timing["to_first_step"] = metrics["first_step_at"] - began_at
    return timing
