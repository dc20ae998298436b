"""Ray Tune sweeps. One trial = (cluster-aware: cluster with K, cached) -> pretrain on Ray Train ->
linear and kNN evaluation (optionally fine-tuning, place recognition) -> one final report.

Experiment scripts declare the variants (a method and the parameters it sets: K, temperature, lr, mix
ratio, ESS radius and sigma; see :func:`variant`) and call :func:`main`. Each trial is a Tune *function*
trainable that builds a ``TorchTrainer`` (Train V2 cannot be passed to a ``Tuner`` directly), forwards
its per-epoch metrics (the kNN monitor among them, which ``--asha`` stops trials on) to Tune, evaluates
the encoder and ends with one ``tune.report`` holding every final metric. Trial run folders are named
from the trial's parameters, so a restored or relaunched sweep resumes a trial's training from its
checkpoint, and a trial that already finished (``final.json``) is reported again, not rerun.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler
from torch.utils.tensorboard import SummaryWriter

from raysys import storage
from raysys.config import PretrainConfig, make_config
from raysys.config.presets import FN_STUDY_PRESETS, SWEEP_PRESETS
from raysys.config.schema import check_saved
from raysys.data.augment import AugmentConfig
from raysys.data.formats import discover
from raysys.data.sources import (
    attach_clusters,
    heldout_manifest,
    is_simulated,
    resolve_data,
)
from raysys.distributed.clustering import ENCODERS, cluster_assignments, cluster_quality
from raysys.distributed.runtime import (
    check_cluster,
    init_ray,
    publish_run,
    torch_threads,
)
from raysys.distributed.trainer import CURVE_FILE, SELF_CLUSTERS_FILE, pretrain
from raysys.errors import ConfigError, run_command
from raysys.eval.knn import evaluate_knn
from raysys.eval.linear import evaluate
from raysys.eval.place_recognition import evaluate_place_recognition
from raysys.eval.supervised import fine_tune, train_supervised
from raysys.methods.objectives import OBJECTIVES
from raysys.methods.pairs import RULES
from raysys.methods.self_clusters import SOURCES as SELF_SOURCES
from raysys.models import ContrastiveModel
from raysys.models.io import MODEL_FILE, load_model, save_model
from raysys.models.texture import TextureConfig
from raysys.reporting import fn_study
from raysys.reporting import results as report
from raysys.reporting.html import write_report

log = logging.getLogger(__name__)

# Every registered objective but SimCLR (the baseline's) is a method under its own name: MoCo v2 (its own
# recipe: blur augmentation, temperature 0.2) and the pretext tasks.
METHOD_FRAMEWORKS = {name: name for name in OBJECTIVES if name != "simclr"}
# Method -> its pair rule: every registered rule is a method under its own name, beside the SimCLR baseline,
# mixed-domain pretraining (a pool, not a rule), the pretext tasks, the untrained encoder (random-init) and
# the supervised reference. Every contrastive method runs in the base config's framework (SimCLR or MoCo v2).
METHOD_RULES = {"baseline": "instance", "mixed": "instance", **{name: name for name in RULES if name != "instance"},
                **{name: "instance" for name in METHOD_FRAMEWORKS}, "random-init": "instance", "supervised": None,
                "supervised-transfer": None}
# The supervised references: from scratch, or from a weights file (--supervised-weights: Wagstaff et al.'s
# transfer learning, the benchmark authors' baseline). Both train in the trial's own process.
SUPERVISED_METHODS = ("supervised", "supervised-transfer")
PRETEXT_METHODS = tuple(name for name in METHOD_FRAMEWORKS if not OBJECTIVES[name].contrastive)
METHODS = tuple(METHOD_RULES)
# What a variant may set (PretrainConfig fields, and the clustering's own: K and the noisy oracle's noise);
# the rest comes from the base config.
PARAMS = ("k", "noise", "temperature", "lr", "mix_ratio", "ess_radius", "ess_sigma", "cluster_mode", "decoupled",
          "encoder", "arm")
CLUSTER_PARAMS = ("k", "noise")
# Not config fields: the clustering's own, the cluster source of one variant (beside the sweep's --encoder:
# the false-negative study's oracle and self-clustering arms) and a study arm's name (it names the trial).
TRIAL_PARAMS = (*CLUSTER_PARAMS, "encoder", "arm")
SWEEP_VERSION = 2  # 2: the supervised reference's step budget replaces its epoch count. Bump when a SweepSpec field changes meaning or goes; from_dict then reads the old form
FINAL_FILE = "final.json"  # a finished trial's result, in its run folder
TRIAL_DRIVER_CPUS = 0.1  # a trial's own process mostly waits on its TorchTrainer
BENCHMARKS = ("msl", "hirise")
SWEEP_ENCODERS = (*ENCODERS, *SELF_SOURCES, "baseline")  # or a saved raysys model


def variant(method: str, **params) -> dict:
    """One configuration of a sweep: a method and the parameters it sets (K, temperature, mix_ratio, ...)."""
    if method not in METHODS:
        raise ConfigError(f"unknown method {method!r}; choose one of {list(METHODS)}")
    unknown = set(params) - set(PARAMS)
    if unknown:
        raise ConfigError(f"a sweep variant can set {list(PARAMS)}, not {sorted(unknown)}")
    return {"method": method, **{k: v for k, v in params.items() if v is not None}}


@dataclass
class SweepSpec:
    """What a sweep runs; travels into every trial unchanged.

    ``variants`` are the configurations (see :func:`variant`), each run with ``seeds`` seeds; ``param``
    is the swept parameter (the table column and the plots' x axis) and ``swept`` the methods drawn
    against it, every other method being a reference. ``plot="bars"`` draws one bar per method instead.
    """

    name: str
    out: str
    base: dict  # PretrainConfig of every trial, before the trial's own parameters
    variants: list = field(default_factory=list)
    param: str = "k"
    swept: list = field(default_factory=lambda: ["cluster"])
    plot: str = "line"
    seeds: int = 1
    encoder: str = "texture"
    encoder_settings: dict = field(default_factory=dict)  # texture encoder (TextureConfig fields); {}: its defaults
    supervised_steps: int = 1000  # optimizer steps per benchmark, whatever its size (the preset's)
    supervised_weights: str | None = None  # start the supervised reference from this backbone weights file
    max_concurrent: int | None = None
    storage: str | None = None  # Tune state, trial checkpoints and results for every node; None: ``out``
    place_recognition: bool = False  # also score each encoder by place recognition on held-out traverses
    asha: bool = False  # stop unpromising trials early on the per-epoch kNN monitor (validation split)
    fine_tune_epochs: int = 0  # also fine-tune every pretrained encoder on each benchmark (0: off)
    command: str = ""
    version: int = SWEEP_VERSION  # of this schema, saved with the sweep (sweep.json, Tune's trial configs)

    @classmethod
    def from_dict(cls, d: dict) -> "SweepSpec":
        """A saved spec; a newer version or an unknown key is an error naming it. Files without a version are
        version 1. The base config is checked the same way (:meth:`PretrainConfig.from_dict`). A version-1
        sweep's supervised epoch count is dropped: its unfinished supervised trials train on the step budget."""
        if d.get("version", 1) < 2:
            d = {k: v for k, v in d.items() if k != "supervised_epochs"}
        check_saved(cls, d, d.get("version", 1), SWEEP_VERSION, "sweep", "start a new sweep (a new --out)")
        PretrainConfig.from_dict(d["base"])
        return cls(**{**d, "version": SWEEP_VERSION})

    @property
    def storage_root(self) -> str:
        return self.storage or self.out

    def grid_defaults(self) -> dict:
        """What a variant's unset parameters are: the base config's (lr and noise only where a variant sets them)."""
        base = PretrainConfig.from_dict(self.base)
        return {"k": 0, **{p: getattr(base, p) for p in PARAMS if p not in (*TRIAL_PARAMS, "lr")}}

    def grid(self) -> list[dict]:
        """Every variant with all of :data:`PARAMS` filled in from the base config (what Tune shows)."""
        return [{**self.grid_defaults(), **v} for v in self.variants]

    def stages(self) -> list["SweepSpec"]:
        """The Tune runs of this sweep in order: one, or with ``--encoder baseline`` two -- the baselines first
        (experiment ``<name>-encoders``), whose encoders then cluster the pool for the other trials."""
        if self.encoder != "baseline":
            return [self]
        first = [v for v in self.variants if v["method"] == "baseline"]
        return [dataclasses.replace(self, name=f"{self.name}-encoders", variants=first),
                dataclasses.replace(self, variants=[v for v in self.variants if v["method"] != "baseline"])]


def encoder_of(spec: SweepSpec, params: dict) -> str:
    """Where a cluster-aware variant's cluster ids come from: its own ``encoder``, else the sweep's."""
    return params.get("encoder") or spec.encoder


def _trial_params(config: dict) -> dict:
    """A trial's method, parameters and seed: what names its folders."""
    return {**config["variant"], "seed": config["seed"]}


def trial_name(params: dict) -> str:
    """``cluster-k10-t0.5-s1``, ``mixed-r0.25-t0.5-s0``, ``baseline-t0.1-s0``, ``cluster-attract-n0.5-t0.5-s0``,
    ``baseline-dcl-t0.5-s0`` (decoupled); a named study arm: ``oracle-elim-s2``."""
    if params.get("arm"):
        return f"{params['arm']}-s{params['seed']}"
    method = params["method"]
    parts = [method]
    if method == "cluster" and params.get("cluster_mode", "eliminate") != "eliminate":
        parts.append(params["cluster_mode"])
    if method == "mixed":
        parts.append(f"r{params['mix_ratio']:g}")
    if METHOD_RULES.get(method):
        parts += [f"{tag}{params[p]:g}" for tag, p in RULES[METHOD_RULES[method]].trial_tags
                  if params.get(p) is not None and not (p == "k" and params[p] == 0)]  # k 0: the oracle's own K
    if params.get("noise") is not None:
        parts.append(f"n{params['noise']:g}")
    if params.get("encoder"):  # a variant's own cluster source
        parts.append(params["encoder"])
    if params.get("decoupled") and method not in (*PRETEXT_METHODS, *SUPERVISED_METHODS, "random-init"):
        parts.append("dcl")
    if params.get("lr") is not None:
        parts.append(f"lr{params['lr']:g}")
    if method not in (*PRETEXT_METHODS, "random-init"):  # no temperature without a contrastive loss
        parts.append(f"t{params['temperature']:g}")
    return "-".join(parts + [f"s{params['seed']}"])


# ------------------------------------------------------------------------------------------ trial


def _trial_resources(spec: SweepSpec, concurrent: int):
    """A pretraining trial's driver needs a sliver of CPU; a supervised trial trains in-process."""
    base = PretrainConfig.from_dict(spec.base)
    cpus = ray.cluster_resources().get("CPU", 1.0)

    def resources(config: dict) -> tune.PlacementGroupFactory:
        if config["variant"]["method"] in SUPERVISED_METHODS:
            bundle = {"CPU": max(TRIAL_DRIVER_CPUS, min(1.0, (cpus - 1.0) / concurrent))}
            if base.gpus_per_worker:
                bundle["GPU"] = base.gpus_per_worker
            return tune.PlacementGroupFactory([bundle])
        return tune.PlacementGroupFactory([{"CPU": TRIAL_DRIVER_CPUS}])

    return resources


def _accuracies(name: str, metrics: dict) -> dict:
    return {f"{name}_acc": metrics["accuracy"], f"{name}_balanced_acc": metrics["balanced_accuracy"]}


def _evaluate(model_dir: Path, benchmarks: dict, cfg: PretrainConfig) -> dict:
    """Linear evaluation and kNN (k = 20, T = 0.07, train split as the bank, test split as the queries) of
    the trial's encoder on every benchmark; both read the same cached features."""
    model, cache = load_model(model_dir), model_dir / "feature-cache"
    metrics = {}
    for name, root in benchmarks.items():
        result = evaluate(model, root, model_dir, name, cfg.image_size, hidden=cfg.eval_hidden, activation=cfg.eval_activation,
                          epochs=cfg.eval_epochs, seed=cfg.seed, cache_dir=cache, progress=False)
        metrics.update(_accuracies(name, result["metrics"]))
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


def trial_config(spec: SweepSpec, params: dict) -> PretrainConfig:
    """The base config with the trial's seed, parameters, its method's pair rule and (pretext) framework."""
    values = {p: params[p] for p in PARAMS if p not in TRIAL_PARAMS and p in params}  # absent: an older sweep
    method = params["method"]
    framework = METHOD_FRAMEWORKS.get(method, spec.base["framework"])
    recipe = {"augment": AugmentConfig.moco_v2().to_dict()} if framework == "moco" != spec.base["framework"] else {}
    encoder = encoder_of(spec, params)
    own = ({"self_cluster_k": params["k"], "self_cluster_source": encoder}
           if encoder in SELF_SOURCES and method == "cluster" else {})
    return PretrainConfig.from_dict({**spec.base, **recipe, **values, **own, "seed": params["seed"],
                                     "pair_rule": METHOD_RULES[method] or "instance", "framework": framework})


def what_ran(method: str, cfg: PretrainConfig) -> dict:
    """The framework and pair rule a trial trained with, so that a MoCo v2 baseline is never read as SimCLR's;
    the references without a pretraining objective have neither."""
    if method in (*SUPERVISED_METHODS, "random-init"):
        return {"framework": None, "pair_rule": None}
    return {"framework": cfg.framework, "pair_rule": cfg.pair_rule if cfg.objective.contrastive else None}


def _supervised(cfg: PretrainConfig, benchmarks: dict, out: Path, steps: int, weights: str | None) -> dict:
    """The supervised reference: the same backbone trained on each benchmark's labels for the same number of
    steps, from scratch or from a weights file."""
    metrics = {}
    for name, root in benchmarks.items():
        result = train_supervised(root, out / name, backbone=cfg.backbone, width=cfg.width,
                                  small_stem=cfg.small_stem, image_size=cfg.image_size, steps=steps,
                                  seed=cfg.seed, progress=False, init_weights=weights)
        metrics.update(_accuracies(name, result["metrics"]))
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
    params = _trial_params(config)
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
        resumed_from_epoch=metrics.get("start_epoch"),
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
    print(f"[raysys] clustering for {len(clusterings) * spec.seeds} trial(s), shared: "
          f"{time.perf_counter() - start:.0f} s", flush=True)


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


# ------------------------------------------------------------------------------------------ sweep


class ResultsWriter(tune.Callback):
    """Rewrites ``results.csv`` after every finished trial, so an interrupted sweep keeps its results, and
    prints one line per finished trial with an ETA for the sweep (from this session's pace). ``write``:
    how the trials' rows become the file (:func:`results_writer`)."""

    def __init__(self, path: Path, storage_root: str | None, total: int, write=report.write_results_csv):
        self.path, self.write = path, write
        self.storage_root = storage_root
        self.rows = {row["trial"]: row for row in report.read_results_csv(path)}
        self.total, self.done_before, self.started = total, len(self.rows), time.perf_counter()

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.last_result:
            row = result_row(trial.config, trial.last_result)
            self.rows[row["trial"]] = row
            self.write(list(self.rows.values()), self.path)
            publish_files(self.path.parent, self.storage_root, [self.path.name])
            print(self.progress_line(row), flush=True)

    def progress_line(self, row: dict) -> str:
        done = len(self.rows)
        left = max(0, self.total - done)
        pace = (time.perf_counter() - self.started) / max(1, done - self.done_before)
        score = f", MSL {row['msl_acc']:.1%}" if isinstance(row.get("msl_acc"), float) else ""
        eta = f"ETA {left * pace / 60:.0f} min for the {left} left" if left else "all trials done"
        return f"[raysys] trial {done}/{self.total} done: {row['trial']}{score}; {eta}"


def results_writer(spec: SweepSpec):
    """How a sweep writes ``results.csv`` from its trials' rows: one row per trial, or for a study of steps
    (``plot="steps"``) one row per trial and evaluation step, read from each trial's ``curve.json``."""
    if spec.plot != "steps":
        return report.write_results_csv

    curves = {}  # a finished trial's curve never changes: read each once

    def write(rows: list[dict], path: Path) -> None:
        curves.update(study_curves(spec, [row["trial"] for row in rows if row["trial"] not in curves]))
        fn_study.write_study_csv([r for row in rows if row["trial"] in curves
                                  for r in fn_study.study_rows(row, curves[row["trial"]])], path)

    return write


def study_curves(spec: SweepSpec, trials: list[str]) -> dict[str, dict]:
    """The ``curve.json`` of each finished trial that has one, by trial name (from shared storage when set)."""
    uris = {trial: storage.join(spec.storage_root, "trials", trial, CURVE_FILE) for trial in trials}
    return {trial: json.loads(storage.read_text(uri)) for trial, uri in uris.items() if storage.exists(uri)}


def result_row(config: dict, result: dict) -> dict:
    """A trial's results.csv row: its final report, or -- when the scheduler stopped it early -- its
    parameters, the epoch it reached and its last monitor accuracy."""
    if "trial" in result:
        return result
    params = _trial_params(config)
    return {"trial": trial_name(params), **params, "stopped_at_epoch": result.get("epoch"),
            "knn_acc": result.get("knn_acc")}


def publish_files(out: Path, storage_root: str | None, names: list[str]) -> None:
    """Copy the sweep's own files (results, summary, plots) from ``out`` to shared storage, atomically each."""
    if not storage_root:
        return
    for name in names:
        storage.write_bytes_atomic(storage.join(storage_root, name), (out / name).read_bytes())


def _tune_trial_name(trial) -> str:
    """Readable trial names in Tune's status table and folders (``cluster-k10-t0.5-s1``)."""
    return trial_name(_trial_params(trial.config))


def default_concurrency(base: PretrainConfig) -> int:
    """GPU clusters: as many trials as the GPUs hold. CPU: one. On 2 cores, two demo trials at once trained
    at 62 images/s each (125 together, against 133 for one alone) and their start-up and evaluation
    slowed as much: packing CPU trials buys nothing (``--max-concurrent`` still can)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if base.gpus_per_worker and gpus:
        return max(1, int(gpus // (base.workers * base.gpus_per_worker)))
    return 1


def _check_ks(spec: SweepSpec, pool_size: int) -> None:
    too_big = [v["k"] for v in spec.variants if v["method"] == "cluster" and v.get("k", 0) > pool_size]
    if too_big:
        raise ConfigError(f"--k {too_big} exceed the {pool_size} images of the pretraining pool; choose K below the pool size")


def _scheduler(spec: SweepSpec, base: PretrainConfig):
    """ASHA on the kNN monitor's validation accuracy, one rung per epoch from epoch 1 (or Tune's FIFO)."""
    if not spec.asha:
        return None
    return ASHAScheduler(metric="knn_acc", mode="max", time_attr="training_iteration", grace_period=1,
                         reduction_factor=2, max_t=base.epochs + 1)  # + 1: the trial's final report


def run_sweep(spec: SweepSpec, resume: bool = False) -> list[dict]:
    """Run (or resume) the sweep; write results.csv, summary.md and plots; return the result rows."""
    out = Path(spec.out).resolve()
    spec = dataclasses.replace(spec, out=str(out))
    if spec.storage:
        storage.check_reachable(spec.storage)
    experiments = [storage.join(spec.storage_root, stage.name) for stage in spec.stages()]
    started = [e for e in experiments if storage.exists(e)]
    if started and not resume:
        raise ConfigError(f"{started[0]} already holds a sweep; pass --resume to continue it or a new --out/--storage")
    if resume and not started:
        raise ConfigError(f"--resume: no sweep to resume at {experiments[0]}; drop --resume to start one")
    base = PretrainConfig.from_dict(spec.base)
    manifest, _ = resolve_data(base)  # writes the built-in data once, before trials race to do it; fails fast
    _check_ks(spec, manifest.num_rows)
    init_ray()
    concurrent = spec.max_concurrent or default_concurrency(base)
    check_cluster(base, concurrent)
    if spec.asha:
        if not base.knn_monitor or base.eval_every:
            raise ConfigError("--asha stops trials on the per-epoch kNN monitor, which is off here (--knn-monitor none, "
                              "or a study's evaluation curve in its place); drop --asha")
        # Supervised trials never report the monitor's metric: don't let Tune's strict check fail them.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(asdict(spec), indent=2))
    write = results_writer(spec)
    writer = ResultsWriter(out / "results.csv", spec.storage, total=len(spec.grid()) * spec.seeds, write=write)
    results = []
    for stage, experiment in zip(spec.stages(), experiments):
        prepare_clusters(stage)
        results += list(_tuner(stage, concurrent, writer, experiment if storage.exists(experiment) else None).fit())
    rows = [result_row(r.config, r.metrics) for r in results if r.metrics]
    errors = [str(r.error).splitlines()[0] for r in results if r.error]
    write(rows, out / "results.csv")
    files = (write_study_summary if spec.plot == "steps" else write_summary)(spec, rows, errors)
    print(f"report: {write_report(out)}")
    publish_files(out, spec.storage, ["sweep.json", "results.csv", "report.html", *files])
    return rows


def _tuner(spec: SweepSpec, concurrent: int, writer: ResultsWriter, restore: str | None) -> tune.Tuner:
    """The Tune run of one stage: every variant x seed, or the interrupted one at ``restore``."""
    trainable = tune.with_resources(run_trial, _trial_resources(spec, concurrent))
    if restore:
        return tune.Tuner.restore(restore, trainable=trainable, resume_errored=True)
    base = PretrainConfig.from_dict(spec.base)
    return tune.Tuner(
        trainable,
        param_space={
            "spec": asdict(spec),
            "concurrent": concurrent,
            "variant": tune.grid_search([{**v, **what_ran(v["method"], trial_config(spec, {**v, "seed": 0}))}
                                         for v in spec.grid()]),  # framework and rule in Tune's HParams too
            "seed": tune.grid_search(list(range(base.seed, base.seed + spec.seeds))),
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=concurrent, trial_name_creator=_tune_trial_name,
                                    trial_dirname_creator=_tune_trial_name, scheduler=_scheduler(spec, base)),
        run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_root, callbacks=[writer],
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )


def real_benchmarks(spec: SweepSpec) -> set[str]:
    """The benchmarks a sweep evaluated on real datasets (not the simulator's), where published numbers apply."""
    data = PretrainConfig.from_dict(spec.base).data
    if data is None:
        return set()
    return {name for name, root in discover(data).items() if name in BENCHMARKS and not is_simulated(root)}


def write_summary(spec: SweepSpec, rows: list[dict], errors: list[str]) -> list[str]:
    """``summary.md`` (the reproduce command, the grouped table, the best trial) and one plot per benchmark;
    returns the names of the files written."""
    out = Path(spec.out)
    groups = report.group(rows)
    table = report.grouped_table(groups, spec.plot, spec.param, spec.swept, spec.place_recognition, rows)
    plots, readings, real = [], [], real_benchmarks(spec)
    for bench in BENCHMARKS:
        if any(g.get(f"{bench}_acc") is not None for g in groups):
            path = out / f"{spec.name}-{bench}.png"
            if spec.plot == "bars":
                report.plot_methods(groups, bench, path, f"{bench.upper()}: methods compared ({spec.name})",
                                    published=bench in real)
            elif spec.plot == "precision":
                report.plot_vs_precision(groups, bench, path, f"{bench.upper()}: accuracy vs removed-pair precision")
                readings.append(report.precision_reading(groups, bench))
            else:
                report.plot_vs_param(groups, bench, spec.param, path,
                                     f"{bench.upper()}: accuracy vs {spec.param} ({spec.name})", spec.swept,
                                     published=bench in real)
            plots.append(path.name)
    if spec.plot == "precision" and any(g.get("pool_knn_acc") is not None for g in groups):
        path, name = out / f"{spec.name}-pool-knn.png", "kNN on unseen pool images"
        report.plot_vs_precision(groups, "pool_knn", path, f"{name} at the step budget vs removed-pair precision",
                                 ylabel=f"{name} (%)")
        readings.append(report.precision_reading(groups, "pool_knn", name))
        plots.append(path.name)
    if spec.place_recognition and any(g.get("place_recall1") is not None for g in groups):
        path = out / f"{spec.name}-place.png"
        report.plot_methods(groups, "place", path, f"Place recognition on held-out traverses ({spec.name})",
                            metric="place_recall1", ylabel="recall@1 within the radius (%)")
        plots.append(path.name)
    best = max((r for r in rows if r.get("msl_acc") is not None), key=lambda r: r["msl_acc"], default=None)
    lines = [f"# {spec.name}", "", f"Reproduce: `{spec.command}`", "", table, ""] + [f"{r}\n" for r in readings]
    if real:
        lines += [report.published_note(sorted(real)), ""]
    if best:
        lines += [f"Best trial on MSL: **{best['trial']}** ({100 * best['msl_acc']:.1f} %).", ""]
    return _write_summary_file(out, lines, plots, errors, [table, *readings])


def _write_summary_file(out: Path, lines: list[str], plots: list[str], errors: list[str],
                        shown: list[str]) -> list[str]:
    """``summary.md`` from its ``lines`` plus the plots and any failed trials; print ``shown`` and where things
    are; return the names of the files written."""
    lines = [*lines, *[f"![{p}]({p})" for p in plots]]
    if errors:
        lines += ["", f"{len(errors)} trial(s) failed:"] + [f"- {e}" for e in errors]
    report.write_atomic(out / "summary.md", "\n".join(lines) + "\n")
    print(*shown, sep="\n")
    print(f"\nresults: {out / 'results.csv'}\nsummary: {out / 'summary.md'}\nTensorBoard: tensorboard --logdir {out}")
    return ["summary.md", *plots]


def write_study_summary(spec: SweepSpec, rows: list[dict], errors: list[str]) -> list[str]:
    """A study of steps (the false-negative study): ``summary.md`` with the final-step table and its reading,
    the accuracy and paired-gap plots, and the removed-pair precision/recall plot of label-free arms."""
    out = Path(spec.out)
    long = report.read_results_csv(out / "results.csv")
    arms = [v["arm"] for v in spec.variants]
    describe = {v["arm"]: fn_study.describe(v) for v in spec.variants}
    table, reading = fn_study.study_table(long, arms, describe), fn_study.study_reading(long, arms)
    plots = []
    for metric, label in (("knn_acc", "kNN accuracy"), ("knn_balanced_acc", "kNN balanced accuracy")):
        if any(r.get(metric) is not None for r in long):
            plots.append(f"{spec.name}-{metric}.png")
            fn_study.plot_study(long, arms, out / plots[-1], metric, label)
    if fn_study.plot_removed_pairs(long, out / f"{spec.name}-removed-pairs.png"):
        plots.append(f"{spec.name}-removed-pairs.png")
    lines = [f"# {spec.name}", "", f"Reproduce: `{spec.command}`", "", table, "", *reading, "",
             "Gaps are paired: each seed's arm minus the same seed's baseline, which started from the same weights "
             "and saw the same batches and views; the interval is Student's t over seeds.", "",
             "Paired kNN-accuracy gap to the baseline at every evaluation step (points, [95 % interval]):", "",
             fn_study.gap_table(long, arms), ""]
    arm_seed = {r["trial"]: (r["arm"], r["seed"]) for r in long}
    lines += [fn_study.pairing_check(study_curves(spec, list(arm_seed)), arm_seed), ""]
    return _write_summary_file(out, lines, plots, errors, [table, *reading])


# ------------------------------------------------------------------------------------- command line


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="demo",
                   help=f"one of {', '.join(SWEEP_PRESETS)}: smoke (tests), demo (2-core laptop, ~14 min for sweep_k), paper (GPU cluster), gpu (the demo model, trials sharing GPUs) (default: %(default)s)")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/<sweep name>)")
    p.add_argument("--data", help="folder holding the pretraining pool and benchmarks (default: built-in data)")
    p.add_argument("--seeds", type=int, help="seeds per configuration")
    p.add_argument("--epochs", type=int, help="pretraining epochs per trial")
    p.add_argument("--workers", type=int, help="Ray Train workers per trial")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per Train worker")
    p.add_argument("--cpus-per-worker", type=float, help="CPUs per Train worker (default: derived from the cluster)")
    p.add_argument("--max-concurrent", type=int, help="trials at once (default: derived from the cluster)")
    p.add_argument("--storage", help="shared storage for Tune state, trial checkpoints and results: a folder or a "
                   "URI every node can reach (s3://bucket/prefix, gs://..., file://...); default: --out. "
                   "Needed on a cluster of several machines")
    p.add_argument("--placement", choices=("PACK", "SPREAD", "STRICT_SPREAD"),
                   help="placement of each trial's Train workers over nodes (default PACK)")
    p.add_argument("--fine-tune-epochs", type=int, help="also fine-tune each pretrained encoder for this many "
                   "epochs per benchmark (beside the linear probe and the supervised baseline; default off)")
    p.add_argument("--asha", action="store_true", help="stop unpromising trials early (ASHA on the per-epoch "
                   "kNN monitor accuracy, measured on the validation split, never on test)")
    p.add_argument("--decoupled", action="store_true", default=None, help="take the positives out of the loss's "
                   "denominator (decoupling): the cluster rule then reads as the paper's Eq. 2 as printed, the "
                   "baseline as DCL; default off, so that cluster-aware trials differ from the baseline only in "
                   "the negatives they remove (see docs/results.md)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out (and --storage)")
    p.add_argument("--supervised", action=argparse.BooleanOptionalAction, default=None,
                   help="add (or, --no-supervised, skip) the supervised reference runs (default: the preset's; "
                        "the demo preset skips them to finish in 15 minutes)")
    p.add_argument("--supervised-weights", help="start the supervised reference from this backbone weights file "
                   "(e.g. ImageNet weights of the same architecture: the benchmark authors' transfer learning) "
                   "instead of from scratch; implies --supervised")


def _check_cluster_variants(variants: list[dict], encoder: str) -> None:
    """Every cluster-aware variant has a K >= 2, except with the oracle (one cluster per class), the only
    encoder that takes a noise fraction; the two-stage encoder needs the baselines it clusters with."""
    if encoder not in SWEEP_ENCODERS and not Path(encoder).exists():
        raise ConfigError(f"--encoder {encoder}: no such file or folder; pass one of {list(SWEEP_ENCODERS)} or a saved model")
    clustered = [v for v in variants if v["method"] == "cluster"]
    ks = [v["k"] for v in clustered if "k" in v]
    if any(k < 2 for k in ks):
        raise ConfigError(f"--k values must be at least 2 (got {ks}): one cluster removes every negative")
    for v in clustered:
        own = v.get("encoder") or encoder
        if own != "oracle" and "k" not in v:
            raise ConfigError(f"a cluster-aware variant has no K and --encoder {own} needs one; pass --k")
        if own != "oracle" and v.get("noise"):
            raise ConfigError(f"--noise applies only to --encoder oracle (the noisy oracle), not {own}")
    if encoder == "baseline" and clustered and not any(v["method"] == "baseline" for v in variants):
        raise ConfigError("--encoder baseline clusters with the baseline trials' encoders; drop --no-baseline")


def spec_from_args(name: str, args, variants: list[dict], pretrain: dict | None = None, supervised: bool = True,
                   texture: dict | None = None, **fields) -> SweepSpec:
    """Build and validate a sweep spec from the shared options plus the script's variants.

    ``pretrain`` overrides the preset's pretraining values (explicit options still win), ``texture`` the
    preset's texture-encoder settings; the supervised reference is appended when the script allows it and
    ``--supervised`` (default: the preset's) says so; ``fields`` go to :class:`SweepSpec` as they are.
    """
    preset = SWEEP_PRESETS[args.preset]
    overrides = {**preset["pretrain"], **(pretrain or {}), **{k: v for k, v in dict(
        data=args.data, epochs=args.epochs, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        placement=args.placement, cpus_per_worker=args.cpus_per_worker, decoupled=args.decoupled,
    ).items() if v is not None}}
    # Absolute paths: Tune runs each trial with its own working directory.
    out = str(Path(args.out or f"runs/{name}").resolve())
    for key in ("data", "mix_data"):
        if overrides.get(key):
            overrides[key] = str(Path(overrides[key]).resolve())
    base = make_config(preset.get("base", args.preset), out=out, builtin_root=str(Path("data/builtin").resolve()), **overrides).validate()
    seeds = args.seeds if args.seeds is not None else preset["seeds"]
    if seeds < 1:
        raise ConfigError(f"--seeds must be at least 1 (got {seeds})")
    if args.fine_tune_epochs is not None and args.fine_tune_epochs < 0:
        raise ConfigError(f"--fine-tune-epochs must be >= 0 (got {args.fine_tune_epochs})")
    if args.max_concurrent is not None and args.max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be at least 1 (got {args.max_concurrent})")
    encoder = fields.get("encoder", "texture")
    _check_cluster_variants(variants, encoder)
    if texture and encoder != "texture":
        raise ConfigError(f"the --texture-* options apply only to --encoder texture, not {encoder}")
    encoder_settings = {**preset["texture"], **(texture or {})} if encoder == "texture" else {}
    TextureConfig.from_dict(encoder_settings)  # a bad texture setting stops here, before Ray starts
    if args.fine_tune_epochs is not None:  # the option wins over the script's default
        fields["fine_tune_epochs"] = args.fine_tune_epochs
    if args.supervised_weights and not Path(args.supervised_weights).is_file():
        raise ConfigError(f"--supervised-weights {args.supervised_weights} is not a file; pass a backbone weights file")
    if args.supervised_weights and supervised:
        variants = [*variants, variant("supervised-transfer")]
        fields["supervised_weights"] = str(Path(args.supervised_weights).resolve())
    elif supervised and (preset["supervised"] if args.supervised is None else args.supervised):
        variants = [*variants, variant("supervised")]
    spec = SweepSpec(
        name=name, out=out, base=base.to_dict(), variants=variants, seeds=seeds,
        storage=storage.check_storage(args.storage) if args.storage else None, asha=args.asha,
        supervised_steps=preset["supervised_steps"], max_concurrent=args.max_concurrent,
        encoder_settings=encoder_settings,
        command=" ".join(["python", *map(shlex.quote, sys.argv)]), **fields,
    )
    for params in spec.grid():  # every trial's own config must be valid before anything starts
        trial_config(spec, {**params, "seed": base.seed}).validate()
    return spec


def add_budget_arguments(parser: argparse.ArgumentParser) -> None:
    """The step budget of a false-negative study (fn_study.py, and fn_precision.py at the study's budget)."""
    parser.add_argument("--steps", type=int, help="optimizer steps per trial (fn_study: default the preset's)")
    parser.add_argument("--eval-every", type=int, help="steps between evaluation points (default: the preset's)")
    parser.add_argument("--batch-size", type=int, help="global batch (default: the preset's)")


def study_budget(args) -> dict:
    """The pretraining values of a study at ``--preset``'s budget (:data:`FN_STUDY_PRESETS`, options win):
    the step budget, the evaluation curve and paired batches on a constant lr; also fills in the preset's
    seeds and GPU share where the command line left them."""
    size = FN_STUDY_PRESETS[args.preset]
    steps, every = (size[key] if value is None else value for key, value in
                    (("steps", args.steps), ("eval_every", args.eval_every)))
    if steps < 1 or every < 1:
        raise ConfigError(f"--steps and --eval-every must be at least 1 (got {steps}, {every})")
    args.seeds = size["seeds"] if args.seeds is None else args.seeds
    args.gpus_per_worker = size.get("gpus_per_worker") if args.gpus_per_worker is None else args.gpus_per_worker
    return dict(max_steps=steps, eval_every=every, paired_batches=True, batch_size=args.batch_size or
                size["batch_size"], max_images=size["max_images"], schedule="constant", warmup_epochs=0)


def main(name: str, description: str, configure, argv=None) -> int:
    """Entry point of a sweep script: ``configure(parser)`` adds its options and returns a function of
    ``(args, preset)`` giving :func:`spec_from_args`'s keyword arguments (variants, param, ...)."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=description)
    add_sweep_arguments(parser)
    build = configure(parser)
    args = parser.parse_args(argv)

    def sweep() -> int:
        if args.preset not in SWEEP_PRESETS:
            raise ConfigError(f"--preset {args.preset!r} is unknown; choose one of {list(SWEEP_PRESETS)}")
        run_sweep(spec_from_args(name, args, **build(args, SWEEP_PRESETS[args.preset])), resume=args.resume)
        return 0

    return run_command(name, sweep)
