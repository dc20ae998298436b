"""Ray Tune sweeps. One trial = (cluster-aware: cluster with K, cached) -> pretrain on Ray Train ->
linear and kNN evaluation (optionally fine-tuning, place recognition) -> one final report.

Experiment scripts declare the variants (a method and the parameters it sets: K, temperature, lr, mix
ratio, ESS radius and sigma; see :func:`variant`) and call :func:`main`. Each trial is a Tune *function*
trainable that builds a ``TorchTrainer`` (Train V2 cannot be passed to a ``Tuner`` directly), forwards
its per-epoch metrics (the kNN monitor among them, which ``--asha`` stops trials on) to Tune, evaluates
the encoder and ends with one ``tune.report`` holding every final metric. Trial run folders are named
from the trial's parameters, so a restored or relaunched sweep resumes a trial's training from its
checkpoint, and a trial that already finished (``final.json``) is reported again, not rerun.

This module runs the Tuner of each stage with the trials' resources, scheduler and the results writer that
keeps ``results.csv`` current; the spec and its flags are :mod:`.sweep_spec`, one trial :mod:`.sweep_trial`,
the summary :mod:`.sweep_summary`. What experiment scripts use is importable from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import asdict
from pathlib import Path

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from raysys import storage
from raysys.config import PretrainConfig
from raysys.config.presets import SWEEP_PRESETS
from raysys.config.schedule import Schedule
from raysys.data.sources import Sources, data_sources
from raysys.distributed.console import LOG_FILE, quiet_console, say
from raysys.distributed.progress import SweepProgress
from raysys.distributed.runtime import check_cluster, init_ray
from raysys.distributed.sweep_spec import (
    METHODS,
    PRETEXT_METHODS,
    SUPERVISED_METHODS,
    TRIAL_DRIVER_CPUS,
    SweepSpec,
    add_budget_arguments,
    add_sweep_arguments,
    spec_from_args,
    study_budget,
    trial_config,
    trial_name,
    trial_params,
    variant,
    what_ran,
)
from raysys.distributed.sweep_summary import study_curves, write_study_summary, write_summary
from raysys.distributed.sweep_trial import prepare_clusters, run_trial
from raysys.errors import ConfigError, run_command
from raysys.reporting import fn_study
from raysys.reporting import results as report
from raysys.reporting.html import write_report

__all__ = ["METHODS", "PRETEXT_METHODS", "ResultsWriter", "SweepSpec", "add_budget_arguments", "add_sweep_arguments",
           "main", "run_sweep", "spec_from_args", "study_budget", "trial_config", "trial_name", "variant"]


class ResultsWriter(tune.Callback):
    """Rewrites ``results.csv`` after every finished trial, so an interrupted sweep keeps its results.
    ``write``: how the trials' rows become the file (:func:`results_writer`)."""

    def __init__(self, path: Path, storage_root: str | None, write=report.write_results_csv):
        self.path, self.write = path, write
        self.storage_root = storage_root
        self.rows = {row["trial"]: row for row in report.read_results_csv(path)}

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.last_result:
            row = result_row(trial.config, trial.last_result)
            self.rows[row["trial"]] = row
            self.write(list(self.rows.values()), self.path)
            publish_files(self.path.parent, self.storage_root, [self.path.name])


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


def result_row(config: dict, result: dict) -> dict:
    """A trial's results.csv row: its final report, or -- when the scheduler stopped it early -- its
    parameters, the round it reached and its last monitor accuracy."""
    if "trial" in result:
        return result
    params = trial_params(config)
    return {"trial": trial_name(params), **params, "stopped_at_round": result.get("round"),
            "knn_acc": result.get("knn_acc")}


def publish_files(out: Path, storage_root: str | None, names: list[str]) -> None:
    """Copy the sweep's own files (results, summary, plots) from ``out`` to shared storage, atomically each."""
    if not storage_root:
        return
    for name in names:
        storage.write_bytes_atomic(storage.join(storage_root, name), (out / name).read_bytes())


def _tune_trial_name(trial) -> str:
    """Readable trial names in Tune's status table and folders (``cluster-k10-t0.5-s1``)."""
    return trial_name(trial_params(trial.config))


def default_concurrency(base: PretrainConfig) -> int:
    """GPU clusters: as many trials as the GPUs hold. CPU: one. On 2 cores, two demo trials at once trained
    at 62 images/s each (125 together, against 133 for one alone) and their start-up and evaluation
    slowed as much: packing CPU trials buys nothing (``--max-concurrent`` still can)."""
    gpus = ray.cluster_resources().get("GPU", 0)
    if base.gpus_per_worker and gpus:
        return max(1, int(gpus // (base.workers * base.gpus_per_worker)))
    return 1


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


def _check_ks(spec: SweepSpec, pool_size: int) -> None:
    too_big = [v["k"] for v in spec.variants if v["method"] == "cluster" and v.get("k", 0) > pool_size]
    if too_big:
        raise ConfigError(f"--k {too_big} exceed the {pool_size} images of the pretraining pool; choose K below the pool size")


def _scheduler(spec: SweepSpec, base: PretrainConfig, pool_size: int):
    """ASHA on the kNN monitor's validation accuracy, one rung per round from round 1 (or Tune's FIFO)."""
    if not spec.asha:
        return None
    rounds = Schedule.of(base, pool_size).rounds
    return ASHAScheduler(metric="knn_acc", mode="max", time_attr="training_iteration", grace_period=1,
                         reduction_factor=2, max_t=rounds + 1)  # + 1: the trial's final report


def _checked(spec: SweepSpec, resume: bool) -> tuple[SweepSpec, list[str], Sources]:
    """The spec with an absolute ``out`` and its stages' Tune experiments, after every check that needs no Ray."""
    spec = dataclasses.replace(spec, out=str(Path(spec.out).resolve()))
    if spec.storage:
        storage.check_reachable(spec.storage)
    experiments = [storage.join(spec.storage_root, stage.name) for stage in spec.stages()]
    started = [e for e in experiments if storage.exists(e)]
    if started and not resume:
        raise ConfigError(f"{started[0]} already holds a sweep; pass --resume to continue it or a new --out/--storage")
    if resume and not started:
        raise ConfigError(f"--resume: no sweep to resume at {experiments[0]}; drop --resume to start one")
    base = PretrainConfig.from_dict(spec.base)
    sources = data_sources(base)  # writes the built-in data once, before trials race to do it; fails fast
    _check_ks(spec, sources.manifest.num_rows)
    for params in spec.grid():  # each trial's schedule fits its budget on this pool
        cfg = trial_config(spec, {**params, "seed": base.seed})
        Schedule.of(cfg, sources.manifest.num_rows).check(cfg)
    if spec.asha and (not base.knn_monitor or base.eval_every):
        raise ConfigError("--asha stops trials on the per-epoch kNN monitor, which is off here (--knn-monitor none, "
                          "or a study's evaluation curve in its place); drop --asha")
    return spec, experiments, sources


def _header(spec: SweepSpec, concurrent: int, sources: tuple[str, ...]) -> None:
    """What runs and where everything goes, before the first trial."""
    out, configs = Path(spec.out), len(spec.grid())
    resources = ray.cluster_resources()
    gpus = f" and {resources['GPU']:g} GPU(s)" if resources.get("GPU") else ""
    say(f"[raysys] {spec.name}: {configs * spec.seeds} trial(s) ({configs} configuration(s) x {spec.seeds} seed(s)), "
        f"{concurrent} at a time on {resources.get('CPU', 0):g} CPU(s){gpus}")
    say(f"[raysys] results.csv, summary.md and report.html go to {out}; Ray's own output to {out / LOG_FILE} "
        "(--verbose shows it here)")
    say(f"[raysys] TensorBoard: tensorboard --logdir {spec.storage_root}")
    for line in sources:
        say(f"[raysys] {line}")


def run_sweep(spec: SweepSpec, resume: bool = False, verbose: bool = False) -> list[dict]:
    """Run (or resume) the sweep; write results.csv, summary.md and plots; return the result rows. Ray's own
    output goes to the sweep folder's log file unless ``verbose``."""
    spec, experiments, sources = _checked(spec, resume)
    out = Path(spec.out)
    with quiet_console(out, verbose):
        init_ray()
        base = PretrainConfig.from_dict(spec.base)
        concurrent = spec.max_concurrent or default_concurrency(base)
        check_cluster(base, concurrent)
        if spec.asha:  # supervised trials never report the monitor's metric: don't let Tune's strict check fail them
            os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        out.mkdir(parents=True, exist_ok=True)
        (out / "sweep.json").write_text(json.dumps(asdict(spec), indent=2))
        _header(spec, concurrent, sources.lines)
        write = results_writer(spec)
        writer = ResultsWriter(out / "results.csv", spec.storage, write=write)
        progress = SweepProgress(len(spec.grid()) * spec.seeds, len(writer.rows), _tune_trial_name, result_row)
        results = []
        for stage, experiment in zip(spec.stages(), experiments):
            prepare_clusters(stage)
            tuner = _tuner(stage, concurrent, [writer, progress], experiment if storage.exists(experiment) else None,
                           sources.manifest.num_rows)
            results += list(tuner.fit())
        rows = [result_row(r.config, r.metrics) for r in results if r.metrics]
        errors = [str(r.error).splitlines()[0] for r in results if r.error]
        write(rows, out / "results.csv")
        files = (write_study_summary if spec.plot == "steps" else write_summary)(spec, rows, errors)
        say(f"report: {write_report(out)}")
        publish_files(out, spec.storage, ["sweep.json", "results.csv", "report.html", *files])
    return rows


def _tuner(spec: SweepSpec, concurrent: int, callbacks: list, restore: str | None, pool_size: int) -> tune.Tuner:
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
                                    trial_dirname_creator=_tune_trial_name, scheduler=_scheduler(spec, base, pool_size)),
        run_config=tune.RunConfig(name=spec.name, storage_path=spec.storage_root, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )


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
        run_sweep(spec_from_args(name, args, **build(args, SWEEP_PRESETS[args.preset])), resume=args.resume,
                  verbose=args.verbose)
        return 0

    return run_command(name, sweep)
