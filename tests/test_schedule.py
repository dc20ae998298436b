"""The schedule in rounds: unchanged where the budget covers the pool many times, cut into rounds where it cannot,
and refusals that name what does not fit. References: the epoch-counted formulas the schedule replaced."""

import math

import pytest

from raysys.config import make_config
from raysys.config.schedule import MIN_ROUND_STEPS, ROUNDS, Schedule
from raysys.distributed.worker import lr_lambda
from raysys.errors import ConfigError
from raysys.methods.self_clusters import SelfClusters


def _epoch_lr(cfg, steps_per_epoch: int):
    """The learning rate as it was computed in epochs (the reference a run on the demo pool must keep)."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, cfg.max_steps or cfg.epochs * steps_per_epoch
    return lambda step: ((step + 1) / warmup if step < warmup else
                         0.5 * (1 + math.cos(math.pi * min((step - warmup) / max(1, total - warmup), 1.0))))


@pytest.mark.parametrize("overrides, pool", [
    ({}, 4500),  # raysys pretrain --preset demo: 15 epochs of the demo pool
    ({"epochs": 2, "max_images": 2048}, 2048),  # the Quickstart's K sweep
    ({"max_steps": 600, "max_images": 2048}, 2048),  # the K sweep's default budget and the study's
    ({"max_steps": 600}, 4500),  # a 600-step encoder on the whole demo pool (the search bench's)
])
def test_on_the_demo_pool_rounds_are_epochs_and_nothing_moves(overrides, pool):
    cfg = make_config("demo", pair_rule="cluster", self_cluster_k=20, **overrides)
    plan, per_epoch = Schedule.of(cfg, pool), pool // cfg.batch_size
    assert plan.round_steps == per_epoch and plan.unit == "epoch"
    assert plan.rounds == (math.ceil(cfg.max_steps / per_epoch) if cfg.max_steps else cfg.epochs)
    reference, now = _epoch_lr(cfg, per_epoch), lr_lambda(cfg, plan)
    assert [now(s) for s in range(plan.total_steps)] == [reference(s) for s in range(plan.total_steps)]
    clusters = SelfClusters(20, cfg.self_cluster_warmup, cfg.self_cluster_every)
    assert [plan.steps(r) for r in range(plan.rounds) if clusters.due(r)] == list(range(per_epoch, plan.total_steps, per_epoch))


@pytest.mark.parametrize("budget, pool, expected", [
    (600, 77_000, 40),  # the K sweep's budget on an archive: 15 rounds of 1/15 of it
    (40, 50_000, MIN_ROUND_STEPS),  # a short budget: rounds never under 10 steps
    (5000, 1_000_000, 5000 // ROUNDS),
])
def test_a_budget_under_fifteen_epochs_is_cut_into_rounds_that_warm_up_and_recluster(budget, pool, expected):
    cfg = make_config("demo", max_steps=budget, pair_rule="cluster", self_cluster_k=20)
    plan = Schedule.of(cfg, pool)
    assert plan.round_steps == expected and plan.unit == "round"
    plan.check(cfg)  # the demo preset's one-round warm-ups fit: the run starts
    now = lr_lambda(cfg, plan)
    assert now(expected - 2) < 1.0 and now(expected) == pytest.approx(1.0, abs=0.02)  # one round of warm-up
    assert plan.rounds == math.ceil(budget / expected)


def test_round_steps_sets_the_unit_and_refusals_name_what_does_not_fit():
    cfg = make_config("demo", max_steps=30, round_steps=7)
    assert Schedule.of(cfg, 50_000).round_steps == 7 and Schedule.of(cfg, 50_000).rounds == 5
    short = make_config("demo", max_steps=8)  # one round of 10 steps: the preset's warm-up is the whole run
    with pytest.raises(ConfigError, match=r"--warmup-epochs 1 \(the demo preset's\) is 1 round\(s\) of 10 steps"):
        Schedule.of(short, 50_000).check(short)
    never = make_config("demo", epochs=2, pair_rule="cluster", self_cluster_k=4, self_cluster_warmup=2)
    with pytest.raises(ConfigError, match=r"--self-cluster-warmup 2 must be below the run's 2 epoch\(s\)"):
        Schedule.of(never, 4500).check(never)
