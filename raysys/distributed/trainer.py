"""Contrastive pretraining on Ray Train: a ``TorchTrainer`` running DDP (gloo on CPU, nccl on GPU).

Driver side (:func:`pretrain`): resolve the data, build the Ray Data two-view stream, size the workers
from what the cluster has, fit, export ``model.pt``. Worker side (:func:`train_loop`): the training
loop, which checkpoints and reports every epoch and resumes from the latest checkpoint after a worker
failure or when rerun with the same output folder.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from torch.utils.tensorboard import SummaryWriter

from raysys.config import ConfigError, PretrainConfig
from raysys.data import formats
from raysys.data.mixing import mix_domains
from raysys.distributed.pipeline import FileReport, pretrain_dataset, train_batches, write_file_report
from raysys.data.schema import BATCH_META, VIEW1, VIEW2
from raysys.eval.knn import knn_monitor_score
from raysys.models import ContrastiveModel, load_init_weights
from raysys.methods.objectives import DIAGNOSTICS, make_objective
from raysys.methods.pairs import default_radius
from raysys.eval.place_recognition import holdout_split, read_holdout
from raysys.storage import is_local, upload_dir

log = logging.getLogger(__name__)

RUN_NAME = "pretrain"
STATE_FILE = "state.pt"

# ----------------------------------------------------------------------------------------- data


def resolve_data(cfg: PretrainConfig) -> tuple[pa.Table, dict[str, Path]]:
    """The pretraining manifest and the labeled benchmarks found beside it.

    ``cfg.data`` None: the built-in simulated datasets (written once under ``cfg.builtin_dir``).
    A folder holding datasets side by side: its rover pool is pretrained on, its benchmarks evaluated.
    Any other folder: read as one dataset (auto-detected format) and pretrained on.
    With ``cfg.mix_ratio`` > 0 that fraction of the pool is replaced by out-of-domain images; with
    ``cfg.cluster_ids`` the cluster table is attached.
    """
    if cfg.data is None:
        from raysys.data.simulate import simulate

        roots = {k: Path(v) for k, v in simulate(cfg.builtin_dir, preset=cfg.sim_preset, seed=cfg.sim_seed).items()}
    else:
        roots = formats.discover(cfg.data)
    pool_root = roots.get("rover", Path(cfg.data) if cfg.data else None)
    if cfg.data is None or "rover" in roots:
        manifest = formats.read_folder(pool_root, hidden_labels=cfg.data is None)
        # Held-out traverses ("unfamiliar environments") are never pretrained on: place recognition uses them.
        manifest, _ = holdout_split(manifest, read_holdout(pool_root))
    else:
        manifest = formats.read_manifest(pool_root)
    if cfg.max_images is not None and manifest.num_rows > cfg.max_images:
        rows = np.random.default_rng(cfg.seed).choice(manifest.num_rows, cfg.max_images, replace=False)
        manifest = manifest.take(np.sort(rows))
    if cfg.mix_ratio > 0:
        manifest = mix_domains(manifest, formats.read_imagefolder(_mix_root(cfg, roots)), cfg.mix_ratio,
                               seed=cfg.seed)
    if cfg.cluster_ids:
        manifest = attach_cluster_file(manifest, cfg.cluster_ids)
    if manifest.num_rows < cfg.batch_size:
        raise ConfigError(
            f"the pretraining pool at {pool_root} has {manifest.num_rows} images, fewer than one batch "
            f"({cfg.batch_size}); lower --batch-size or add images"
        )
    benchmarks = {k: v for k, v in roots.items() if k in cfg.eval_benchmarks}
    return manifest, benchmarks


def attach_cluster_file(manifest: pa.Table, path: str) -> pa.Table:
    """Attach ``image_id,cluster_id`` from a Parquet or CSV file, which must cover every pool image."""
    import pyarrow.csv
    import pyarrow.parquet as pq

    try:
        table = pyarrow.csv.read_csv(path) if str(path).endswith(".csv") else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ConfigError(f"--cluster-ids {path} is not a readable Parquet/CSV table ({exc}); "
                          f"write it with `raysys cluster --out FILE.parquet`") from None
    if not {"image_id", "cluster_id"} <= set(table.column_names):
        raise ConfigError(f"--cluster-ids {path} has columns {table.column_names}; it needs image_id and cluster_id")
    table = table.select(["image_id", "cluster_id"]).cast(pa.schema([("image_id", pa.string()), ("cluster_id", pa.int64())]))
    missing = pc.invert(pc.is_in(manifest.column("image_id"), value_set=table.column("image_id")))
    n_missing = pc.sum(missing).as_py() or 0
    if n_missing:
        first = manifest.filter(missing).column("image_id").to_pylist()[:3]
        raise ConfigError(f"--cluster-ids {path} covers {manifest.num_rows - n_missing} of {manifest.num_rows} pool "
                          f"images (missing e.g. {first}); rerun `raysys cluster` on this pool")
    from raysys.distributed.clustering import attach_clusters

    return attach_clusters(manifest, table)


def heldout_manifest(cfg: PretrainConfig) -> pa.Table | None:
    """The pool's held-out traverses (``holdout-traverses.txt``), for place recognition; None without a pool."""
    roots = formats.discover(cfg.data) if cfg.data else {"rover": cfg.builtin_dir / formats.ROVER_DIR}
    if "rover" not in roots:
        return None
    pool = formats.read_folder(roots["rover"], hidden_labels=cfg.data is None)
    return holdout_split(pool, read_holdout(roots["rover"]))[1]


def _mix_root(cfg: PretrainConfig, roots: dict[str, Path]) -> Path:
    if cfg.mix_data:
        return Path(cfg.mix_data)
    if "diverse" not in roots:
        raise ConfigError(f"--mix-ratio {cfg.mix_ratio} needs an out-of-domain dataset but {cfg.data} has no "
                          f"diverse/ folder; pass --mix-data PATH (an ImageFolder such as ImageNet's train/)")
    return roots["diverse"]


# -------------------------------------------------------------------------------------- workers


def worker_resources(cfg: PretrainConfig, cluster_cpus: float, reserved_cpus: float = 0.0, concurrent: int = 1) -> dict:
    """Resources per Train worker, derived from the cluster's CPU count.

    ``concurrent`` runs share the cluster, each after ``reserved_cpus`` (e.g. a Tune trial's driver).
    Train workers must leave at least one CPU for Ray Data's decode/augment tasks, or the pipeline
    can wait forever for a CPU (see shared/facts/ray-2.60-notes.md).
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


def lr_lambda(cfg: PretrainConfig, steps_per_epoch: int):
    """Multiplier of the base lr at a given step: linear warm-up, then constant or cosine to zero."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    total = cfg.epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "cosine":
            progress = (step - warmup) / max(1, total - warmup)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return 1.0

    return factor


def _autocast(cfg: PretrainConfig, device: torch.device):
    enabled = cfg.amp != "none" and device.type == "cuda"
    dtype = torch.bfloat16 if cfg.amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled)


def _load_state(model, optimizer, scheduler, scaler) -> dict:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"epoch": 0, "step": 0}
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    return {**state["data_position"], "objective": state.get("objective")}


def _worker_placements(rank: int, world: int) -> list[dict]:
    """Where every rank runs (node id, host, pid), gathered to all ranks; saved with the checkpoint so
    the driver can list it even when the workers ran on other machines."""
    mine = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "host": socket.gethostname(),
            "pid": os.getpid()}
    if world == 1:
        return [mine]
    everyone = [None] * world
    torch.distributed.all_gather_object(everyone, mine)
    return everyone


def _report(metrics: dict, state: dict | None) -> None:
    """Every rank reports; only rank 0 attaches the checkpoint (Train V2's rule)."""
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def train_loop(config: dict) -> dict:
    """One Ray Train worker: the contrastive training loop with per-epoch checkpoints."""
    cfg = PretrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    torch.set_num_threads(torch_threads(ctx.get_local_world_size()))
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank

    model = ContrastiveModel(cfg.backbone, cfg.width, cfg.small_stem, cfg.proj_dim, cfg.proj_layers)
    if cfg.init_weights:
        load_init_weights(model.backbone, cfg.init_weights)
    spec = model.spec
    model = ray.train.torch.prepare_model(model)
    raw_model = model.module if hasattr(model, "module") else model
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, config["num_images"] // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, steps_per_epoch))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16" and device.type == "cuda")
    position = _load_state(raw_model, optimizer, scheduler, scaler)
    start_epoch, step = position["epoch"], position["step"]
    if start_epoch:
        print(f"[raysys] rank {rank}: resuming from checkpoint at epoch {start_epoch} (step {step})")

    workers = _worker_placements(rank, world)
    objective = make_objective(cfg, model, config["num_images"], world, config["labels"], device,
                               autocast=lambda: _autocast(cfg, device))
    if position.get("objective"):
        objective.load_state_dict(position["objective"])
    monitor = ray.get(config["knn_monitor"]) if config.get("knn_monitor") is not None else None
    writer = SummaryWriter(config["tb_dir"], purge_step=step) if rank == 0 else None
    shard = ray.train.get_dataset_shard("train")
    local_batch = cfg.batch_size // world
    metrics: dict = {"epoch": start_epoch, "start_epoch": start_epoch}

    for epoch in range(start_epoch, cfg.epochs):
        model.train()
        totals = {"loss": 0.0, "steps": 0, "images": 0, "wait": 0.0}
        sums, counts = {}, {}
        epoch_start = t_ready = time.perf_counter()
        for batch in train_batches(shard, local_batch, cfg.shuffle_buffer):
            t_batch = time.perf_counter()
            totals["wait"] += t_batch - t_ready
            meta = {k: batch[k].to(device) for k in BATCH_META if k in batch}
            loss, stats = objective.loss(batch[VIEW1].to(device, non_blocking=True),
                                         batch[VIEW2].to(device, non_blocking=True), meta)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            objective.after_step()
            step += 1
            totals["loss"] += loss.item()
            totals["steps"] += 1
            totals["images"] += local_batch
            for key, value in stats.items():
                if key in DIAGNOSTICS and not math.isnan(value):
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
            if writer is not None:
                writer.add_scalar("train/loss_step", loss.item(), step)
            t_ready = time.perf_counter()
        elapsed = time.perf_counter() - epoch_start
        metrics = {
            "epoch": epoch + 1,
            "start_epoch": start_epoch,
            "step": step,
            "loss": totals["loss"] / max(1, totals["steps"]),
            "lr": scheduler.get_last_lr()[0],
            "images_per_s": totals["images"] * world / max(elapsed, 1e-9),
            "data_wait_fraction": totals["wait"] / max(elapsed, 1e-9),
        }
        metrics.update({DIAGNOSTICS[k]: sums[k] / counts[k] for k in sums})
        if monitor is not None:  # every rank, so all report the same keys; the images are few
            metrics["knn_acc"] = knn_monitor_score(raw_model, monitor, device)
        if writer is not None:
            for key, value in metrics.items():
                if key not in ("epoch", "start_epoch", "step"):
                    writer.add_scalar(f"train/{key}", value, step)
            writer.flush()
        state = None
        if rank == 0:
            state = {
                "model": raw_model.state_dict(),
                "model_spec": spec,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "data_position": {"epoch": epoch + 1, "step": step},
                "objective": objective.state_dict(),  # MoCo: key encoder and queue, so a resume continues them
                "config": cfg.to_dict(),
                "workers": workers,
            }
        _report(metrics, state)
    if writer is not None:
        writer.close()
    return metrics


# --------------------------------------------------------------------------------------- driver


def init_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (e.g. under ``ray job submit``) or start a local one."""
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS")
        # Local: the dashboard on 127.0.0.1 only. It must run: Ray Train's PlacementGroupCleaner asks its state
        # API whether a controller died (e.g. a trial stopped by ASHA), or that trial's CPUs are never freed.
        local = {} if address else {"include_dashboard": True, "dashboard_host": "127.0.0.1"}
        ray.init(address=address, log_to_driver=True, **local)


def _knn_monitor_data(cfg: PretrainConfig, benchmarks: dict):
    """The kNN monitor's decoded images in the object store (workers fetch them), or None when off."""
    if not cfg.knn_monitor:
        return None
    if cfg.knn_monitor not in benchmarks:
        log.warning("kNN monitor: no %s benchmark beside the pretraining data; monitor off", cfg.knn_monitor)
        return None
    from raysys.eval.knn import load_monitor_data

    return ray.put(load_monitor_data(benchmarks[cfg.knn_monitor], cfg.image_size, seed=cfg.seed))


def complete_spatial_defaults(cfg: PretrainConfig, manifest: pa.Table) -> None:
    """ESS rules without an explicit radius: derive it (and sigma) from the pool's frame spacing, and say so."""
    weighted = cfg.pair_rule == "ess-mw"  # only ESS-MW has a sigma
    if not cfg.pair_rule.startswith("ess-") or (cfg.ess_radius is not None and (cfg.ess_sigma is not None or not weighted)):
        return
    try:
        found = default_radius(*(manifest.column(c).to_numpy(zero_copy_only=False) for c in ("x", "y", "traverse", "frame")))
    except ValueError as exc:
        raise ConfigError(f"--pair-rule {cfg.pair_rule}: {exc} (--ess-radius, --ess-sigma); ESS needs a "
                          f"positions sidecar with traverse and frame columns") from None
    cfg.ess_radius = found["r"] if cfg.ess_radius is None else cfg.ess_radius
    if weighted and cfg.ess_sigma is None:
        cfg.ess_sigma = found["sigma"]
    sigma = f", sigma {cfg.ess_sigma:.2f} m" if weighted else ""
    print(f"[raysys] {cfg.pair_rule}: radius {cfg.ess_radius:.2f} m{sigma} "
          f"(median step between frames {found['median_step']:.2f} m)")


def publish_run(out: Path, storage: str | None) -> None:
    """Copy the run folder to ``storage`` (beside its checkpoints), where every node and the user can reach it."""
    if storage and not (is_local(storage) and Path(storage).resolve() == Path(out).resolve()):
        upload_dir(out, storage)


def check_cluster(cfg: PretrainConfig, concurrent: int = 1) -> None:
    """Refuse GPU requests the cluster can never meet (it would wait forever). An autoscaling cluster
    counts with the most its node types can reach, not with the nodes up now."""
    need = cfg.gpus_per_worker * cfg.workers * concurrent
    if not need:
        return
    try:
        from ray._private.state import state  # private, but what Ray Train itself checks against

        most = state.get_max_resources_from_cluster_config() or ray.cluster_resources()
    except Exception:  # noqa: BLE001 - a moved private API must not block training
        most = ray.cluster_resources()
    if most.get("GPU", 0) < need:
        raise ConfigError(f"--gpus-per-worker {cfg.gpus_per_worker} x {cfg.workers} worker(s) needs {need:g} GPU(s) but the "
                          f"cluster has at most {most.get('GPU', 0):g}; drop --gpus-per-worker to train on CPU or add GPU nodes")


def export_model(checkpoint: ray.train.Checkpoint, path: Path) -> dict:
    """Write the final weights as a standalone ``model.pt`` (no optimizer state)."""
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    exported = {k: state[k] for k in ("model", "model_spec", "config", "data_position")}
    torch.save(exported, path)
    (path.parent / "workers.json").write_text(json.dumps(state.get("workers", []), indent=2))
    return exported


def pretrain(
    cfg: PretrainConfig,
    manifest: pa.Table | None = None,
    benchmarks: dict[str, Path] | None = None,
    callbacks: list | None = None,
    reserved_cpus: float = 0.0,
    concurrent: int = 1,
) -> dict:
    """Pretrain per ``cfg``; returns the final metrics, the run folder and the benchmarks found.

    ``manifest``/``benchmarks`` default to :func:`resolve_data`; a sweep passes its own (e.g. with
    cluster ids attached), its Train callbacks, and the CPUs its trials reserve.
    """
    cfg.validate()
    if manifest is None:
        manifest, benchmarks = resolve_data(cfg)  # fails fast, before Ray starts
    if cfg.pair_rule == "cluster" and "cluster_id" not in manifest.column_names:
        raise ConfigError("--pair-rule cluster needs cluster ids; pass --cluster-ids FILE "
                          "(from `raysys cluster --k K --out FILE`)")
    complete_spatial_defaults(cfg, manifest)
    init_ray()
    check_cluster(cfg, concurrent)  # before anything is written: a rejected run leaves the folder as it was
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.json")
    cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
    monitor = _knn_monitor_data(cfg, benchmarks or {})
    report = FileReport.remote()
    dataset = pretrain_dataset(manifest, cfg.augment_config, cfg.image_size, report, cache=cfg.cache_decoded,
                               seed=cfg.seed)
    start = time.perf_counter()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"cfg": cfg.to_dict(), "num_images": manifest.num_rows, "tb_dir": str(out / "tb"),
                           "labels": bool(pc.any(pc.greater_equal(manifest.column("label"), 0)).as_py()),
                           "knn_monitor": monitor},
        scaling_config=ScalingConfig(
            num_workers=cfg.workers,
            use_gpu=cfg.gpus_per_worker > 0,
            placement_strategy=cfg.placement,
            resources_per_worker=worker_resources(cfg, cluster_cpus, reserved_cpus, concurrent),
        ),
        run_config=RunConfig(
            name=RUN_NAME,
            storage_path=cfg.storage or str(out / "ray"),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
        datasets={"train": dataset},
    )
    result = trainer.fit()
    seconds = time.perf_counter() - start
    skipped = write_file_report(report, out)["skipped"]
    if result.checkpoint is None:
        raise RuntimeError(f"training ended without a checkpoint; see the Ray logs under {out / 'ray'}")
    export_model(result.checkpoint, out / "model.pt")
    publish_run(out, cfg.storage)
    return {"metrics": result.metrics, "out": out, "benchmarks": benchmarks or {},
            "skipped_files": len(skipped), "seconds": seconds}
