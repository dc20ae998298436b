"""Ray Tune sweeps. One trial = (cluster-aware: cluster with K, cached) -> pretrain on Ray Train ->
linear and kNN evaluation (optionally fine-tuning, place recognition) -> one final report.

Experiment scripts declare the variants (a method and the parameters it sets: K, temperature, lr, mix
ratio, ESS radius and sigma; see :func:`variant`) and call :func:`main`. Each trial is a Tune *function*
trainable that builds a ``TorchTrainer`` (Train V2 cannot be passed to a ``Tuner`` directly), forwards
its per-epoch metrics (the kNN monitor among them, which ``--asha`` stops trials on) to Tune, evaluates
the encoder and ends with one ``tune.report`` holding every final metric. Trial run folders are named
from the trial's parameters, so a restored or relaunched sweep resumes a trial's training from its
checkpoint, and a trial that already finished (``final.json``) is reported again, not rerun.

The package holds the sweep's spec and flags (:mod:`.spec`), one trial (:mod:`.trial`), running the Tuner
with its results writer (:mod:`.tuner`) and the summary (:mod:`.summary`); what scripts use is here.
"""

from raysys.distributed.sweep.spec import (
    METHODS,
    PRETEXT_METHODS,
    SweepSpec,
    add_budget_arguments,
    add_sweep_arguments,
    spec_from_args,
    study_budget,
    trial_config,
    trial_name,
    variant,
)
from raysys.distributed.sweep.trial import trial_timing
from raysys.distributed.sweep.tuner import ResultsWriter, main, run_sweep

__all__ = ["METHODS", "PRETEXT_METHODS", "ResultsWriter", "SweepSpec", "add_budget_arguments", "add_sweep_arguments",
           "main", "run_sweep", "spec_from_args", "study_budget", "trial_config", "trial_name", "trial_timing", "variant"]
