"""When things happen in a pretraining run, in optimizer steps: the unit that survives a change of pool size.

A run is cut into **rounds**. A report ends each (loss, the kNN monitor, TensorBoard's per-round scalars, Tune's
time step) and so does a checkpoint, and the epoch-counted options count rounds: the learning-rate warm-up
(``warmup_epochs``) and self-clustering's warm-up and interval (``self_cluster_warmup``, ``self_cluster_every``).

A round is an epoch -- so a run on a pool its budget covers many times trains as it always did, step for step --
except in a step-budget run too short for :data:`ROUNDS` epochs of its pool: there a round is 1/:data:`ROUNDS` of
the budget (never under :data:`MIN_ROUND_STEPS` steps). A run on an archive that its budget cannot cover even once
then still warms up, re-clusters and checkpoints as often as the demo preset does in its 15 epochs, instead of
refusing to start or clustering once at the end. ``round_steps`` sets the length outright.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from raysys.errors import ConfigError

ROUNDS = 15  # the demo preset's epochs: a short step-budget run is cut into as many rounds
# A shorter round re-clusters features of a model barely changed since the last clustering, at the cost of a
# pass over the whole pool each time.
MIN_ROUND_STEPS = 10


@dataclass(frozen=True)
class Schedule:
    """One run's steps: per epoch of its pool, in all, and per round."""

    steps_per_epoch: int
    total_steps: int
    round_steps: int

    @classmethod
    def of(cls, cfg, num_images: int) -> "Schedule":
        """The schedule of ``cfg`` (a :class:`~raysys.config.PretrainConfig`) on a pool of ``num_images``."""
        per_epoch = max(1, num_images // cfg.batch_size)
        if cfg.max_steps is None:
            total, length = cfg.epochs * per_epoch, per_epoch
        else:
            total = cfg.max_steps
            length = min(per_epoch, max(MIN_ROUND_STEPS, total // ROUNDS))
        return cls(per_epoch, total, cfg.round_steps or length)

    @property
    def rounds(self) -> int:
        return math.ceil(self.total_steps / self.round_steps)

    @property
    def unit(self) -> str:
        """What a round is called on the console: ``epoch`` where it is one, else ``round``."""
        return "epoch" if self.round_steps == self.steps_per_epoch else "round"

    def steps(self, rounds: int) -> int:
        """Optimizer steps in ``rounds`` rounds (a warm-up given in rounds)."""
        return rounds * self.round_steps

    def describe(self) -> str:
        """The console's line on it, where rounds are not epochs."""
        return (f"schedule: {self.rounds} rounds of {self.round_steps} steps (an epoch of this pool is "
                f"{self.steps_per_epoch} steps, the budget {self.total_steps}); warm-ups and re-clustering count "
                f"rounds, and each ends with a report and a checkpoint")

    def check(self, cfg) -> None:
        """Refuse, in one line, an epoch-counted option that the run is too short for."""
        unit, total = self.unit, f"{self.total_steps} steps"
        if cfg.warmup_epochs and self.steps(cfg.warmup_epochs) >= self.total_steps:
            raise ConfigError(f"--warmup-epochs {cfg.warmup_epochs}{_preset_note(cfg, 'warmup_epochs')} is "
                              f"{cfg.warmup_epochs} {unit}(s) of {self.round_steps} steps, not shorter than the whole "
                              f"run ({total}); lower it, or raise --epochs / --max-steps")
        if cfg.self_cluster_k and cfg.self_cluster_warmup >= self.rounds:
            raise ConfigError(f"--self-cluster-warmup {cfg.self_cluster_warmup} must be below the run's {self.rounds} "
                              f"{unit}(s) of {self.round_steps} steps (else no {unit} uses the clusters); lower it, "
                              "or raise --epochs / --max-steps")


def _preset_note(cfg, field: str) -> str:
    """`` (the demo preset's)`` where the value is the preset's own, so a refusal says where it came from."""
    from raysys.config.presets import PRESETS

    return f" (the {cfg.preset} preset's)" if PRESETS.get(cfg.preset, {}).get(field) == getattr(cfg, field) else ""
