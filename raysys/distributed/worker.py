"""One Ray Train worker: the contrastive training loop, in named steps.

:func:`train_loop` = :func:`set_up` (model, optimizer, schedule, objective; resume from the latest
checkpoint) -> per round (:mod:`raysys.config.schedule`: an epoch, or a share of a step budget) :func:`run_round`
(each batch through :func:`train_step`) -> :func:`round_metrics` -> :func:`checkpoint_state` + :func:`report`. A new method plugs in as an objective class in
:data:`raysys.methods.objectives.OBJECTIVES`; gradient accumulation would go in :func:`train_step`.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import math
import os
import resource
import socket
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from torch.utils.tensorboard import SummaryWriter

from raysys import storage
from raysys.config import PretrainConfig
from raysys.config.schedule import Schedule
from raysys.data.augment import to_float, two_views
from raysys.data.paired import PairedBatches, view_seed
from raysys.data.schema import BATCH_META, VIEW1, VIEW2
from raysys.distributed.pipeline import train_batches
from raysys.distributed.runtime import torch_threads
from raysys.errors import StorageError
from raysys.eval.knn import knn_curve_point, knn_monitor_score
from raysys.methods.objectives import DIAGNOSTICS, ObjectiveContext, make_objective
from raysys.methods.self_clusters import SOURCES, SelfClusters
from raysys.models import ContrastiveModel, load_init_weights
from raysys.models.sync_bn import convert_sync_batchnorm
from raysys.models.texture import cluster_quality

STATE_FILE = "state.pt"
LOSS_LOG_EVERY = 10  # steps between TensorBoard's per-step loss points: each one waits for the device


def lr_lambda(cfg: PretrainConfig, schedule: Schedule):
    """Multiplier of the base lr at a given step: linear warm-up over ``warmup_epochs`` rounds, then constant or
    cosine to zero at the run's last step."""
    warmup, total = schedule.steps(cfg.warmup_epochs), schedule.total_steps

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


def make_optimizer(cfg: PretrainConfig, model: torch.nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Adam with its multi-tensor update: fused kernels on GPU, ``foreach`` on CPU (the default there is a
    per-parameter Python loop; bench/train_loop.py measures the difference)."""
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, **fast)


@dataclass
class Worker:
    """What one rank carries from step to step."""

    cfg: PretrainConfig
    rank: int
    world: int
    device: torch.device
    model: torch.nn.Module  # DDP-wrapped when world > 1
    raw_model: ContrastiveModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    schedule: Schedule | None = None
    objective: object = None
    start_round: int = 0
    step: int = 0
    placements: list = field(default_factory=list)
    step_seconds: float = 0.0  # time spent inside train_step in this run (resumes start again from 0)
    first_step_at: float | None = None  # wall clock (time.time) when this process's first step began
    generator: torch.Generator | None = None  # the rank's random stream on its device: the objective's draws
    view_generator: torch.Generator | None = None  # the views', drawn one batch ahead (device_batches)
    self_clusters: SelfClusters | None = None  # --self-cluster-k: the cluster ids the model makes itself
    curve: dict = field(default_factory=lambda: {"points": []})  # eval_every: the evaluation curve, with pairing
    window: dict = field(default_factory=dict)  # diagnostics (and loss) summed since the last curve point

    @property
    def budget_spent(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    @property
    def local_batch(self) -> int:
        return self.cfg.batch_size // self.world


def _load_state(w: Worker) -> dict:
    """Model, optimizer, schedule and scaler from the latest checkpoint; its data position (or round 0). A
    checkpoint of an older raysys counted epochs, which were its rounds."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"round": 0, "step": 0}
    with checkpoint.as_directory() as d:
        state = torch.load(Path(d) / STATE_FILE, map_location="cpu", weights_only=True)
    w.raw_model.load_state_dict(state["model"])
    w.optimizer.load_state_dict(state["optimizer"])
    w.scheduler.load_state_dict(state["scheduler"])
    w.scaler.load_state_dict(state["scaler"])
    position = state["data_position"]
    return {"round": position.get("round", position.get("epoch", 0)), "step": position["step"],
            "objective": state.get("objective"), "self_clusters": state.get("self_clusters"), "curve": state.get("curve")}


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


def set_up(config: dict) -> Worker:
    """Build this rank's model, optimizer, schedule and objective, resumed from the latest checkpoint."""
    cfg = PretrainConfig.from_dict(config["cfg"])
    ctx = ray.train.get_context()
    torch.set_num_threads(torch_threads(ctx.get_local_world_size() * config.get("concurrent", 1)))  # runs at once
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    objective = cfg.objective
    raw_model = ContrastiveModel(cfg.backbone, cfg.width, cfg.small_stem, cfg.proj_dim, cfg.proj_layers,
                                 head=objective.head(cfg), gray_input=objective.gray_input)
    # channels_last: the convolution kernels' fast layout on CPU (oneDNN) and GPU (tensor cores); same maths.
    raw_model = raw_model.to(memory_format=torch.channels_last)
    if cfg.init_weights:
        load_init_weights(raw_model.backbone, cfg.init_weights)
    if cfg.synchronized_bn:
        raw_model = convert_sync_batchnorm(raw_model, device)
    model = ray.train.torch.prepare_model(raw_model)
    raw_model = model.module if hasattr(model, "module") else model
    optimizer = make_optimizer(cfg, model, device)
    schedule = Schedule.of(cfg, config["num_images"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, schedule))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16" and device.type == "cuda")
    w = Worker(cfg, rank, world, device, model, raw_model, optimizer, scheduler, scaler, schedule)
    # fresh entropy per rank and start, as the pipeline's tasks draw it
    w.generator, w.view_generator = (torch.Generator(device).manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
                                     for _ in range(2))
    initial_digest = weights_digest(w.raw_model) if cfg.eval_every else None  # before a resume loads others
    position = _load_state(w)
    w.start_round, w.step = position["round"], position["step"]
    if w.start_round:
        print(f"[raysys] rank {rank}: resuming from checkpoint at {schedule.unit} {w.start_round} (step {w.step})")
    w.placements = _worker_placements(rank, world)
    w.objective = make_objective(cfg, model, ObjectiveContext(config["num_images"], world, config["labels"], device,
                                                              lambda: _autocast(cfg, device), w.generator))
    if position.get("objective"):
        w.objective.load_state_dict(position["objective"])
    if cfg.self_cluster_k:
        w.self_clusters = SOURCES[cfg.self_cluster_source].from_config(cfg)
        if position.get("self_clusters"):  # a resumed trial continues with the ids it had
            w.self_clusters.load_state_dict(position["self_clusters"])
    if position.get("curve"):
        w.curve, w.window = position["curve"], position["curve"].pop("window", {})
    elif cfg.eval_every:
        w.curve["init_weights_sha256"] = initial_digest
    return w


def weights_digest(model: torch.nn.Module) -> str:
    """SHA-256 of a model's parameters and buffers, in state-dict order: equal digests, equal weights."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _on_device(w: Worker, views) -> tuple[torch.Tensor, ...]:
    """Views as float32 channels_last on the device: uint8 from Ray Data's tasks turned into [0, 1] there (a
    quarter of the bytes on the wire), float16 from this worker widened (one pass; autocast casts again)."""
    out = []
    for v in views:
        v = v.to(w.device, non_blocking=True)
        if v.dtype == torch.uint8:
            v = v.to(torch.float32, memory_format=torch.channels_last).div_(255.0)
        out.append(v.to(torch.float32, memory_format=torch.channels_last))
    return tuple(out)


def _inputs(w: Worker, batch: dict) -> tuple[torch.Tensor, ...]:
    """What the objective takes, on the device: the two views (from the pipeline, or made here from ``image``,
    in float16 on a GPU), or the decoded images as floats for a pretext task."""
    if VIEW1 in batch:
        return _on_device(w, (batch[VIEW1], batch[VIEW2]))
    images = batch["image"].to(w.device, non_blocking=True)
    if w.objective.inputs == "images":
        return (to_float(images, w.cfg.image_size),)
    half = torch.float16 if w.device.type == "cuda" else torch.float32
    return _on_device(w, two_views(images, w.cfg.augment_config, w.view_generator, dtype=half))


def _prepare(w: Worker, batch: dict, stream, step: int) -> tuple[dict, object]:
    """``batch`` ready for :func:`train_step` (the objective's inputs and the metadata, on the device), its work
    queued on ``stream`` when there is one; with the event marking its end. Paired batches seed the views
    from the step they will train."""
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        if w.cfg.paired_batches:
            w.view_generator.manual_seed(view_seed(w.cfg.seed, step, w.rank))
        ready = {k: batch[k].to(w.device, non_blocking=True) for k in BATCH_META if k in batch}
        ready["inputs"] = _inputs(w, batch)
        return ready, stream.record_event() if stream is not None else None


def _hand_over(w: Worker, prepared: tuple[dict, object]) -> dict:
    """A prepared batch for the current stream: it waits (on the device, not the host) for the side stream's
    work, and the allocator learns the tensors are used here, so the side stream cannot reuse their memory."""
    ready, done = prepared
    if done is not None:
        current = torch.cuda.current_stream(w.device)
        current.wait_event(done)
        for tensor in (*ready["inputs"], *(v for k, v in ready.items() if k != "inputs")):
            tensor.record_stream(current)
    return ready


def device_batches(w: Worker, batches):
    """Each batch of ``batches`` prepared one batch ahead (:func:`_prepare`): on a GPU the next batch's copy and
    views run on a side stream while the current step runs on the main one; on CPU the same code in order."""
    side = torch.cuda.Stream(w.device) if w.device.type == "cuda" else None
    ahead = None
    for batch in batches:
        prepared = _prepare(w, batch, side, w.step + (ahead is not None))  # the step this batch will train
        if ahead is not None:
            yield _hand_over(w, ahead)
        ahead = prepared
    if ahead is not None:
        yield _hand_over(w, ahead)


def train_step(w: Worker, batch: dict) -> tuple[torch.Tensor, dict]:
    """One optimisation step on one batch from :func:`device_batches`: the objective's loss, backward, optimizer
    and schedule. The loss comes back detached on the device, so the step does not wait for it."""
    meta = {k: batch[k] for k in BATCH_META if k in batch}
    if w.cfg.paired_batches:  # the objective's own draws at this step the same in every run of the seed
        w.generator.manual_seed(view_seed(w.cfg.seed, w.step, w.rank))
    if w.self_clusters is not None:
        meta["cluster_id"] = w.self_clusters.lookup(meta["image_id"])
    loss, stats = w.objective.loss(*batch["inputs"], meta)
    w.optimizer.zero_grad(set_to_none=True)
    w.scaler.scale(loss).backward()
    w.scaler.step(w.optimizer)
    w.scaler.update()
    w.scheduler.step()
    w.objective.after_step()
    w.step += 1
    return loss.detach(), stats


def _add(sums: dict, counts: dict, key: str, value) -> None:
    sums[key] = sums.get(key, 0.0) + value
    counts[key] = counts.get(key, 0) + 1


def round_batches(w: Worker, shard):
    """This rank's batches of the round starting at step ``w.step``: paired, the pool's batches at those steps (a
    function of the seed, so a resumed run sees the same); from the Ray Data shard, a pass over the pool that
    :func:`run_round` leaves after the round's steps -- where a round is shorter than an epoch, every round reads
    from a new shuffle of the pool (its blocks come in a new order), and a resumed run reads on from a new one."""
    if isinstance(shard, PairedBatches):
        batches = shard.steps(w.step, w.schedule.round_steps, w.local_batch)
    else:
        batches = train_batches(shard, w.local_batch, w.cfg.shuffle_buffer, pin_memory=w.device.type == "cuda")
    return device_batches(w, batches)


def run_round(w: Worker, batches, writer: SummaryWriter | None, curve_data=None) -> dict:
    """One round: this rank's ``batches`` until the round's steps are done, the pass ends or the budget is spent;
    loss and step totals, data-wait time, per-batch diagnostic means; with ``curve_data``, a curve point every
    ``eval_every`` steps."""
    w.model.train()
    totals = {"loss": torch.zeros((), device=w.device), "steps": 0, "images": 0, "wait": 0.0}
    sums, counts = {}, {}
    window_sums, window_counts = w.window.setdefault("sums", {}), w.window.setdefault("counts", {})
    start = t_ready = time.perf_counter()
    for batch in batches:
        totals["wait"] += time.perf_counter() - t_ready
        w.first_step_at = w.first_step_at or time.time()
        if w.step == 0 and curve_data is not None:  # pairing's promise, checked by the study (this rank's share)
            w.curve["first_batch_image_ids"] = batch["image_id"].tolist()
        loss, stats = train_step(w, batch)
        totals["loss"] += loss
        totals["steps"] += 1
        totals["images"] += w.local_batch
        for key, value in stats.items():  # floats, or tensors left on the device until the round ends
            if key in DIAGNOSTICS and not (isinstance(value, float) and math.isnan(value)):
                _add(sums, counts, key, value)
                if curve_data is not None:
                    _add(window_sums, window_counts, key, value)
        if curve_data is not None:
            _add(window_sums, window_counts, "loss", loss)
            if w.step % w.cfg.eval_every == 0 or w.budget_spent:
                curve_point(w, curve_data, writer)
        if writer is not None and w.step % LOSS_LOG_EVERY == 0:
            writer.add_scalar("train/loss_step", loss.item(), w.step)
        if w.budget_spent or totals["steps"] == w.schedule.round_steps:
            break
        t_ready = time.perf_counter()
    batches.close()  # a pass left early: its prefetch stops here, not when the generator is collected
    totals["loss"] = totals["loss"].item()
    totals["elapsed"] = time.perf_counter() - start
    w.step_seconds += totals["elapsed"] - totals["wait"]
    totals["diagnostics"] = {DIAGNOSTICS[k]: float(sums[k]) / counts[k] for k in sums}
    return totals


def curve_point(w: Worker, data, writer: SummaryWriter | None) -> None:
    """Rank 0 adds a point to the evaluation curve: kNN accuracy and balanced accuracy now, and the training
    loss and false-negative diagnostics averaged since the last point; logged to TensorBoard under study/.
    The other ranks go on and meet rank 0 at the next step's collective."""
    sums, counts = w.window.get("sums", {}), w.window.get("counts", {})
    point = {"step": w.step, **{DIAGNOSTICS.get(k, k): float(sums[k]) / counts[k] for k in sums}}
    sums.clear()  # in place: run_round holds these dicts
    counts.clear()
    if w.rank != 0:
        return
    point |= knn_curve_point(w.raw_model, data, w.device)
    w.curve["points"].append(point)
    if writer is not None:
        for key, value in point.items():
            if key != "step":
                writer.add_scalar(f"study/{key}", value, w.step)


def _embed_shard(w: Worker, shard) -> tuple[np.ndarray, ...]:
    """``(image keys, backbone features, labels)`` of this rank's shard in one pass, eval mode: features of the
    decoded images (of the first view when Ray Data makes the views, ``--augment-on data``)."""
    w.model.eval()
    keys, features, labels = [], [], []
    with torch.no_grad(), _autocast(w.cfg, w.device):
        for batch in shard.iter_torch_batches(batch_size=w.local_batch, drop_last=False):
            images = batch["image"] if "image" in batch else batch[VIEW1]
            x = to_float(images.to(w.device), w.cfg.image_size) if images.dtype == torch.uint8 else images.to(w.device)
            features.append(w.raw_model.features(x).float().cpu())
            keys.append(batch["image_id"].cpu())
            labels.append(batch["label"].cpu())
    return tuple(torch.cat(parts).numpy() for parts in (keys, features, labels))


def recluster(w: Worker, shard, round_: int, writer: SummaryWriter | None) -> None:
    """Self-clustering before round ``round_``: every rank embeds its shard, rank 0 clusters the whole pool, and
    every rank takes the new table, so the next batches carry the new ids without restarting anything."""
    start = time.perf_counter()
    parts = [_embed_shard(w, shard)]
    if w.world > 1:
        everyone = [None] * w.world
        torch.distributed.all_gather_object(everyone, parts[0])
        parts = everyone
    keys, features, labels = (np.concatenate(column) for column in zip(*parts))
    table = [None]
    if w.rank == 0:
        ids = w.self_clusters.update(keys, features, round_, progress=round_ / w.schedule.rounds)
        table = [w.self_clusters.state_dict()]
        clustered = ids >= 0  # a confident source leaves some images without a cluster
        quality = cluster_quality(ids[clustered], labels[clustered])  # hidden labels: a diagnostic only
        for key in ("nmi", "pair_precision", "pair_recall"):
            if key in quality and writer is not None:
                writer.add_scalar(f"self_clusters/{key}", quality[key], w.step)
        shown = f", NMI {quality['nmi']:.3f}, pair precision {quality['pair_precision']:.2f}" if quality else ""
        print(f"[raysys] self-clustering before {w.schedule.unit} {round_ + 1} (step {w.step}): {int(clustered.sum())} "
              f"of {len(keys)} images into "
              f"{w.self_clusters.k} clusters{shown} ({time.perf_counter() - start:.1f} s)", flush=True)
    if w.world > 1:
        torch.distributed.broadcast_object_list(table, src=0)
        w.self_clusters.load_state_dict(table[0])
    w.objective.relabel_clusters(w.self_clusters.lookup)


def round_metrics(w: Worker, round_: int, totals: dict, monitor) -> dict:
    """What every rank reports after round ``round_``: loss, lr, throughput, diagnostics, the kNN monitor."""
    elapsed = max(totals["elapsed"], 1e-9)
    metrics = {
        "round": round_ + 1,
        "rounds": w.schedule.rounds,  # for the console's progress and ETA
        "unit": w.schedule.unit,
        "start_round": w.start_round,
        "step": w.step,
        "epoch": w.step / w.schedule.steps_per_epoch,  # passes over the pool so far
        "loss": totals["loss"] / max(1, totals["steps"]),
        "lr": w.scheduler.get_last_lr()[0],
        "images_per_s": totals["images"] * w.world / elapsed,
        "data_wait_fraction": totals["wait"] / elapsed,
        "step_seconds": w.step_seconds,
        "first_step_at": w.first_step_at,  # the driver's time to the first step (run_timing)
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this worker process's peak memory
        **totals["diagnostics"],
    }
    if monitor is not None:  # every rank, so all report the same keys; the images are few
        metrics["knn_acc"] = knn_monitor_score(w.raw_model, monitor, w.device)
    return metrics


def checkpoint_state(w: Worker, round_: int) -> dict:
    """Everything a resume needs after round ``round_`` (rank 0 only writes it)."""
    return {
        "model": w.raw_model.state_dict(),
        "model_spec": w.raw_model.spec,
        "optimizer": w.optimizer.state_dict(),
        "scheduler": w.scheduler.state_dict(),
        "scaler": w.scaler.state_dict(),
        "data_position": {"round": round_ + 1, "step": w.step},
        "objective": w.objective.state_dict(),  # MoCo: key encoder and queue, so a resume continues them
        "self_clusters": w.self_clusters.state_dict() if w.self_clusters is not None else None,
        # the curve and, for the next point after a resume, the sums since the last one
        "curve": {**w.curve, "window": {part: {k: float(v) for k, v in values.items()} for part, values in
                                        w.window.items()}} if w.cfg.eval_every else None,
        "config": w.cfg.to_dict(),
        "workers": w.placements,
    }


def report(metrics: dict, state: dict | None) -> None:
    """Every rank reports; only rank 0 attaches the checkpoint (Train V2's rule)."""
    if state is None:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as d:
        torch.save(state, Path(d) / STATE_FILE)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d))


def sync_tensorboard(tb_dir: str, uri: str | None) -> None:
    """Copy rank 0's TensorBoard files to shared storage after every round: rank 0 may run on any node, and
    the user watches from another. A failed sync is only a warning -- the next round's catches up, and the
    checkpoint (which does fail the run) is what must not be lost."""
    if uri is None or not os.path.isdir(tb_dir):
        return
    try:
        storage.upload_dir(tb_dir, uri)
    except StorageError as exc:
        print(f"[raysys] warning: TensorBoard files not synced this round: {exc}", flush=True)


def train_loop(config: dict) -> dict:
    """One Ray Train worker: the contrastive training loop, a report and a checkpoint every round."""
    w = set_up(config)
    monitor = ray.get(config["knn_monitor"]) if config.get("knn_monitor") is not None else None
    curve_data = ray.get(config["curve_data"]) if config.get("curve_data") is not None else None
    writer = SummaryWriter(config["tb_dir"], purge_step=w.step) if w.rank == 0 else None
    if config.get("paired_pool") is not None:
        shard = PairedBatches(ray.get(config["paired_pool"]), w.cfg.seed, w.rank, w.world)
    else:
        shard = ray.train.get_dataset_shard("train")
    if curve_data is not None and w.step == 0:
        curve_point(w, curve_data, writer)  # step 0: the common start of every arm of a seed
    metrics: dict = {"round": w.start_round, "start_round": w.start_round}
    # A step budget runs rounds until it is spent: decoding may have dropped images, leaving fewer batches.
    rounds = itertools.count(w.start_round) if w.cfg.max_steps else range(w.start_round, w.schedule.rounds)
    for round_ in rounds:
        if w.budget_spent:
            break
        if w.self_clusters is not None and w.self_clusters.due(round_):
            recluster(w, shard, round_, writer)
        totals = run_round(w, round_batches(w, shard), writer, curve_data)
        if not totals["steps"] and w.cfg.max_steps:
            raise RuntimeError(f"round {round_ + 1} gave rank {w.rank} no batch: the step budget cannot be spent")
        metrics = round_metrics(w, round_, totals, monitor)
        if writer is not None:
            for key, value in metrics.items():
                if key not in ("round", "rounds", "unit", "start_round", "step", "first_step_at"):
                    writer.add_scalar(f"train/{key}", value, w.step)
            writer.flush()
            sync_tensorboard(config["tb_dir"], config.get("tb_storage"))
        report(metrics, checkpoint_state(w, round_) if w.rank == 0 else None)
    if writer is not None:
        writer.close()
    return metrics
