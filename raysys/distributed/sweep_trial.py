"""One Tune trial: (cluster-aware: cluster with K, cached) -> pretrain on Ray Train -> linear and kNN evaluation
(optionally fine-tuning, place recognition) -> one final report.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from torch.utils.tensorboard import SummaryWriter

from raysys import storage
from raysys.config import PretrainConfig
from raysys.data.sources import attach_clusters, heldout_manifest, resolve_data
from raysys.distributed.clustering import cluster_assignments, cluster_quality
from raysys.distributed.console import say
from raysys.distributed.runtime import publish_run, torch_threads
from raysys.distributed.sweep_spec import (
    SUPERVISED_METHODS,
    SweepSpec,
    TRIAL_DRIVER_CPUS,
    encoder_of,
    trial_config,
    trial_name,
    trial_params,
    what_ran,
)
from raysys.distributed.trainer import CURVE_FILE, SELF_CLUSTERS_FILE, pretrain
from raysys.errors import ConfigError
from raysys.eval.knn import evaluate_knn
from raysys.eval.linear import evaluate
from raysys.eval.place_recognition import evaluate_place_recognition
from raysys.eval.supervised import fine_tune, train_supervised
from raysys.methods.self_clusters import SOURCES as SELF_SOURCES
from raysys.models import ContrastiveModel
from raysys.models.io import MODEL_FILE, load_model, save_model
from raysys.reporting import results as report


FINAL_FILE = "final.json"  # a finished trial's result, in its run folder


def _accuracies(name: str, metrics: dict) -> dict:
    return {f"{name}_acc": metrics["accuracy"], f"{name}_balanced_acc": metrics["balanced_accuracy"]}


def _floor(name: str, evaluation: dict) -> dict:
    """What a benchmark gives without learning, for the figures' reference lines: always predicting the majority
    train class, and chance (one over the classes)."""
    return {**_accuracies(f"{name}_majority", evaluation["majority"]),
            f"{name}_chance_acc": 1 / len(evaluation["class_names"])}


def _evaluate(model_dir: Path, benchmarks: dict, cfg: PretrainConfig) -> dict:
    """Linear evaluation and kNN (k = 20, T = 0.07, train split as the bank, test split as the queries) of
    the trial's encoder on every benchmark; both read the same cached features."""
    model, cache = load_model(model_dir), model_dir / "feature-cache"
    metrics = {}
    for name, root in benchmarks.items():
        result = evaluate(model, root, model_dir, name, cfg.image_size, hidden=cfg.eval_hidden, activation=cfg.eval_activation,
                          epochs=cfg.eval_epochs, seed=cfg.seed, cache_dir=cache, progress=False)
        metrics.update(_accuracies(name, result["metrics"]))
        metrics.update(_floor(name, result))
        knn = evaluate_knn(model, root, cfg.image_size, cache_dir=cache, progress=False)
        metrics.update(_accuracies(f"{name}_knn", knn["metrics"]))
    return metrics


def _fine_tune(model_dir: Path, benchmarks: dict, cfg: PretrainConfig, epochs: int) -> dict:
    """Fine-tuning evaluation: the encoder unfrozen (backbone at a tenth of the head's lr) on each benchmark."""
    metrics = {}
    for name, root in benchmarks.items():
        result = fine_tune(model_dir, root, model_dir / f"fine-tune-{name}", epochs, seed=cfg.seed, progress=False)
        metrics[f"{name}_ft_acc"] = result["metrics"]["accuracy"]
    return metrics


def _place_recognition(model_dir: Path, cfg: PretrainConfig) -> dict:
    """Place recognition of the trial's encoder on the held-out traverses (never pretrained on)."""
    held = heldout_manifest(cfg)
    if held is None or held.num_rows == 0:
        return {}
    result = evaluate_place_recognition(load_model(model_dir), held, cfg.image_size, out_dir=model_dir, progress=False)
    return {"place_recall1": result["recall@1"], "place_recall5": result["recall@5"],
            "place_median_error": result["median_error"], "place_chance_recall1": result["chance_recall@1"]}


def _supervised(cfg: PretrainConfig, benchmarks: dict, out: Path, steps: int, weights: str | None) -> dict:
    """The supervised reference: the same backbone trained on each benchmark's labels for the same number of
    steps, from scratch or from a weights file."""
    metrics = {}
    for name, root in benchmarks.items():
        result = train_supervised(root, out / name, backbone=cfg.backbone, width=cfg.width,
                                  small_stem=cfg.small_stem, image_size=cfg.image_size, steps=steps,
                                  seed=cfg.seed, progress=False, init_weights=weights)
        metrics.update({**_accuracies(name, result["metrics"]), **_floor(name, result)})
    return metrics


def _random_init(cfg: PretrainConfig, benchmarks: dict, out: Path) -> dict:
    """The untrained reference: the same architecture at its seed's initial weights, evaluated like the rest."""
    torch.manual_seed(cfg.seed)
    model = ContrastiveModel(cfg.backbone, cfg.width, cfg.small_stem, cfg.proj_dim, cfg.proj_layers)
    save_model(out / MODEL_FILE, model.state_dict(), model.spec, cfg.to_dict())
    return _evaluate(out, benchmarks, cfg)


def _reference(method: str, spec: SweepSpec, cfg: PretrainConfig, benchmarks: dict, out: Path) -> dict:
    """The results of a reference trial, which pretrains nothing: supervised (from scratch or from weights), or
    the untrained encoder (with place recognition when the sweep scores it: what pretraining must beat)."""
    if method in SUPERVISED_METHODS:
        start = time.perf_counter()
        weights = spec.supervised_weights if method == "supervised-transfer" else None
        return {**_supervised(cfg, benchmarks, out, spec.supervised_steps, weights),
                "pretrain_seconds": time.perf_counter() - start}
    metrics = _random_init(cfg, benchmarks, out)
    return {**metrics, **(_place_recognition(out, cfg) if spec.place_recognition else {})}


def run_trial(config: dict) -> None:
    """One Tune trial: cluster (for cluster-aware runs) -> pretrain -> evaluate -> one final report."""
    spec = SweepSpec.from_dict(config["spec"])
    params = trial_params(config)
    method, k = params["method"], params["k"]
    name = trial_name(params)
    cfg = trial_config(spec, params)
    cfg = cfg.replace(out=str(Path(spec.out) / "trials" / name),
                      storage=storage.join(spec.storage, "trials", name) if spec.storage else cfg.storage)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    durable = storage.join(spec.storage_root, "trials", name, FINAL_FILE)
    if storage.exists(durable):
        # Finished before the driver died, but Tune's state was saved too early to know: report, don't rerun.
        tune.report(json.loads(storage.read_text(durable)))
        return
    with open(out / "attempts.log", "a") as f:  # one line per start: shows what a resume reran
        f.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} start\n")
    began = time.perf_counter()
    torch.set_num_threads(torch_threads(config["concurrent"]))  # clustering, evaluation, supervised runs
    manifest, benchmarks = resolve_data(cfg)
    final = {"trial": name, **params, "lr": cfg.lr, **what_ran(method, cfg)}

    if method in (*SUPERVISED_METHODS, "random-init"):
        final.update(_reference(method, spec, cfg, benchmarks, out))
        _finish(out, cfg.storage, final)
        return
    encoder = encoder_of(spec, params)
    if method == "cluster" and encoder not in SELF_SOURCES:
        manifest = attach_clusters(manifest, trial_clusters(spec, manifest, k, cfg.seed, params.get("noise"), encoder=encoder))
    run = pretrain(cfg, manifest, benchmarks, callbacks=[TuneReportCallback()],
                   reserved_cpus=TRIAL_DRIVER_CPUS, concurrent=config["concurrent"])
    metrics, cfg = run["metrics"] or {}, run["config"]
    if method == "cluster":
        final.update(clustering_scores(encoder, manifest, out, metrics.get("step", 0)))
    final.update(
        fn_fraction=metrics.get("false_negative_fraction"),
        removed_precision=metrics.get("removed_pair_precision"),
        removed_recall=metrics.get("removed_pair_recall"),
        pretrain_seconds=run["seconds"],
        final_loss=metrics.get("loss"),
        resumed_from_round=metrics.get("start_round"),
        positives_per_anchor=metrics.get("positives_per_anchor"),
        knn_acc=metrics.get("knn_acc"),
        pretext_accuracy=metrics.get("pretext_accuracy"),
        ess_radius_m=cfg.ess_radius,  # as used (derived from the pool when the variant left it unset), beside
        ess_sigma_m=cfg.ess_sigma,    # the variant's own ess_radius / ess_sigma, which group the seeds
    )
    final.update(_last_curve_point(out))
    final.update(_evaluate(out, benchmarks, cfg))
    if spec.fine_tune_epochs:
        final.update(_fine_tune(out, benchmarks, cfg, spec.fine_tune_epochs))
    if spec.place_recognition:
        final.update(_place_recognition(out, cfg))
    final.update(trial_timing(name, time.perf_counter() - began, run["timing"]))
    _finish(out, cfg.storage, final)


def _last_curve_point(out: Path) -> dict:
    """A trial with an evaluation curve: its last point's kNN accuracies on the unseen pool images."""
    if not (out / CURVE_FILE).is_file():
        return {}
    points = json.loads((out / CURVE_FILE).read_text())["points"]
    return {f"pool_{key}": points[-1][key] for key in ("knn_acc", "knn_balanced_acc")} if points else {}


def clustering_scores(encoder: str, manifest, out: Path, step: int) -> dict:
    """How the clusters a trial trained with (the manifest's ``cluster_id``; self-clustering: its last table)
    match the hidden classes and the traverses: NMI, purity, and the pair precision and recall elimination
    would get; also written to the trial's TensorBoard."""
    if encoder in SELF_SOURCES:
        manifest = attach_clusters(manifest, pq.read_table(out / SELF_CLUSTERS_FILE))
    ids = np.asarray(manifest.column("cluster_id"))
    clustered = ids >= 0  # a confident source (self-confident) leaves the least confident images out
    ids, column = ids[clustered], lambda name: np.asarray(manifest.column(name))[clustered]
    scores = {f"cluster_{key}": value for key, value in cluster_quality(ids, column("label")).items()}
    scores["cluster_clustered_share"] = float(clustered.mean())
    if "traverse" in manifest.column_names:
        by_traverse = cluster_quality(ids, column("traverse"))
        if by_traverse:
            scores["cluster_traverse_nmi"] = by_traverse["nmi"]
    with SummaryWriter(str(out / "tb")) as writer:
        for key, value in scores.items():
            if key != "cluster_n_labeled":
                writer.add_scalar(f"clusters/{key.removeprefix('cluster_')}", value, step)
    return scores


def baseline_encoder(spec: SweepSpec, seed: int) -> str:
    """``--encoder baseline``: the ``model.pt`` of the same seed's baseline trial (fetched from ``--storage``
    when that trial ran on another machine)."""
    name = trial_name({**spec.grid_defaults(), "method": "baseline", "seed": seed})
    folder = Path(spec.out) / "trials" / name
    if not (folder / MODEL_FILE).is_file() and spec.storage:
        storage.download_dir(storage.join(spec.storage, "trials", name), folder)
    if not (folder / MODEL_FILE).is_file():
        raise ConfigError(f"--encoder baseline: the baseline trial {name} left no {MODEL_FILE}; see its errors above")
    return str(folder / MODEL_FILE)


def trial_clusters(spec: SweepSpec, manifest, k: int, seed: int, noise: float | None = None, progress: bool = False,
                   encoder: str | None = None):
    """A cluster-aware trial's cluster ids: k-means with the trial's seed on the features of one encoder per
    pool (trained, for ``texture``, with the sweep's base seed, as the paper trains one; for ``baseline``, the
    same seed's baseline trial's), from the cache; for the noisy oracle, the labels with a fraction ``noise``
    replaced (drawn with the trial's seed). ``encoder``: the variant's own, else the sweep's."""
    encoder = encoder or spec.encoder
    encoder = baseline_encoder(spec, seed) if encoder == "baseline" else encoder
    return cluster_assignments(manifest, encoder, k or None, seed=seed, cache_dir=Path(spec.out) / "cache",
                               image_size=spec.base["image_size"], progress=progress,
                               encoder_seed=spec.base["seed"], noise=noise or 0.0,
                               shared=storage.join(spec.storage, "cache") if spec.storage else None, **spec.encoder_settings)


def prepare_clusters(spec: SweepSpec) -> None:
    """Train the sweep's clustering encoder and run every trial's k-means once, before the trials, with all
    of the driver's cores (trials then read the cache; none waits on another's encoder). Each seed's own
    pool: with ``max_images`` the seed draws the subset, and the encoder is trained once per pool."""
    clusterings = sorted({(v["k"], v.get("noise"), encoder_of(spec, v)) for v in spec.grid()
                          if v["method"] == "cluster" and encoder_of(spec, v) not in SELF_SOURCES}, key=str)
    if not clusterings:  # self-clustering happens inside each trial
        return
    start = time.perf_counter()
    for seed in range(spec.base["seed"], spec.base["seed"] + spec.seeds):
        manifest, _ = resolve_data(PretrainConfig.from_dict({**spec.base, "seed": seed}))
        for k, noise, encoder in clusterings:
            trial_clusters(spec, manifest, k, seed, noise, progress=True, encoder=encoder)
    say(f"[raysys] clustering for {len(clusterings) * spec.seeds} trial(s), shared: {time.perf_counter() - start:.0f} s")


def trial_timing(name: str, total: float, timing: dict) -> dict:
    """Say where a pretraining trial's time went -- train steps vs the fixed cost around them (clustering
    and data before the fit, Ray Train start and checkpoints inside it, evaluation after) -- and return it."""
    fixed = total - timing["steps"]
    outside = total - sum(timing.values())  # clustering, data, evaluation: the trial's own work around pretrain
    print(f"[raysys] {name}: {total:.0f} s, train steps {timing['steps']:.0f} s, fixed cost {fixed:.0f} s "
          f"({fixed / total:.0%}): Ray Train start, planning and checkpoints {timing['fit_outside_steps']:.0f} s, "
          f"before/after the fit {timing['before_fit'] + timing['after_fit']:.0f} s, clustering and evaluation "
          f"{outside:.0f} s", flush=True)
    return {"trial_seconds": total, "step_seconds": timing["steps"], "fixed_seconds": fixed,
            "fixed_fraction": fixed / total}


def _finish(out: Path, trial_storage: str | None, final: dict) -> None:
    """Persist the trial's result beside its run (atomically; published to shared storage), then hand it to Tune."""
    final = {key: value for key, value in final.items() if value is not None}
    report.write_atomic(out / FINAL_FILE, json.dumps(final, indent=2))
    publish_run(out, trial_storage)
    tune.report(final)
