"""Training objectives: how one batch of two views becomes a loss (plain PyTorch, no Ray).

:class:`SimCLRObjective` scores both views of the batch against each other (in-batch negatives);
:class:`MoCoObjective` scores queries (view 1, the trained encoder) against keys (view 2, a momentum
encoder) of the batch and a queue of earlier keys. Both take any pair rule, so instance, cluster-aware,
spatial (ESS) and oracle positives work with either. The trainer calls ``loss`` before and
``after_step`` after the optimizer step, and checkpoints ``state_dict``.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from torch import Tensor, nn

from raysys.methods.losses import contrastive_loss
from raysys.methods.moco import (
    KeyQueue,
    clamp_queue_size,
    forward_keys,
    make_key_encoder,
    moco_false_negative_stats,
    moco_loss,
    momentum_update,
    queue_columns,
)
from raysys.methods.pairs import (
    Rule,
    false_negative_stats,
    make_rule,
    positives_per_anchor,
)

log = logging.getLogger(__name__)

# Per-step diagnostics -> the epoch metric names they average into.
DIAGNOSTICS = {
    "fn_fraction": "false_negative_fraction",
    "removed_precision": "removed_pair_precision",
    "removed_recall": "removed_pair_recall",
    "positives_mean": "positives_per_anchor",
    "positives_min": "positives_per_anchor_min",
    "positives_max": "positives_per_anchor_max",
}


class SimCLRObjective:
    """SimCLR (paper Eq. 1) and its pair-rule variants: one forward over both views, so batch norm sees
    the whole 2B batch; negatives are the other views of the global batch."""

    def __init__(self, model: nn.Module, rule: Rule, temperature: float, autocast=contextlib.nullcontext):
        self.model, self.rule, self.temperature, self.autocast = model, rule, temperature, autocast
        self.baseline = make_rule("instance")  # what a rule removed is judged against SimCLR's pairs

    def loss(self, view1: Tensor, view2: Tensor, meta: dict) -> tuple[Tensor, dict]:
        with self.autocast():
            _, z = self.model(torch.cat([view1, view2]))
        z1, z2 = z.float().chunk(2)
        loss, pairs, global_meta = contrastive_loss(z1, z2, meta, self.rule, self.temperature)
        stats = positives_per_anchor(pairs) if self.rule.spatial else {}
        if "label" in global_meta:  # hidden labels: a diagnostic, never used by the loss
            baseline = self.baseline(global_meta) if self.rule.name != "instance" else None
            stats |= false_negative_stats(pairs, global_meta["label"], baseline)
        return loss, stats

    def after_step(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class MoCoObjective:
    """MoCo v2: queries from the trained encoder, keys from its momentum copy with shuffle-BN, negatives
    from the batch's keys and a queue that carries each key's metadata, so every pair rule also applies
    to queue entries. The queue is clamped below the pool size (with a warning): a queue holding the same
    image twice would manufacture false negatives."""

    def __init__(self, model: nn.Module, rule: Rule, temperature: float, queue_size: int, pool_size: int,
                 batch_size: int, dim: int, momentum: float = 0.999, bn_splits: int = 1, with_labels: bool = False,
                 device=None, autocast=contextlib.nullcontext):
        self.model, self.rule, self.temperature, self.autocast = model, rule, temperature, autocast
        self.momentum, self.bn_splits = momentum, bn_splits
        self.key_model = make_key_encoder(model).to(device)
        size, warning = clamp_queue_size(queue_size, pool_size, batch_size)
        if warning:
            log.warning(warning)
        extra = tuple(c for c in (("label",) if with_labels else ()) if c not in queue_columns(rule))
        self.queue = KeyQueue(size, dim, queue_columns(rule, extra=extra), device=device)
        self._pending = None

    def loss(self, view1: Tensor, view2: Tensor, meta: dict) -> tuple[Tensor, dict]:
        with self.autocast():
            _, q = self.model(view1)
            k = forward_keys(lambda v: self.key_model(v)[1], view2, sub_batches=min(self.bn_splits, len(view2)))
        loss, pairs, global_meta = moco_loss(q.float(), k.float(), meta, self.queue, self.rule, self.temperature)
        stats = positives_per_anchor(pairs) if self.rule.spatial else {}
        if "label" in self.queue.meta_keys:  # before the enqueue: the queue must hold what the loss saw
            stats |= moco_false_negative_stats(pairs, global_meta, self.queue)
        self._pending = (k.detach().float(), {c: meta[c] for c in self.queue.meta_keys})
        return loss, stats

    def after_step(self) -> None:
        momentum_update(self.key_model, self.model, self.momentum)
        keys, meta = self._pending
        self.queue.enqueue(keys, meta)
        self._pending = None

    def state_dict(self) -> dict:
        return {"key_model": self.key_model.state_dict(), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.key_model.load_state_dict(state["key_model"])
        self.queue.load_state_dict(state["queue"])


def make_objective(cfg, model: nn.Module, pool_size: int, world: int, with_labels: bool, device=None,
                   autocast=contextlib.nullcontext):
    """The objective of ``cfg`` (a :class:`raysys.config.PretrainConfig`) for ``model``."""
    rule = make_rule(cfg.pair_rule, **cfg.rule_kwargs)
    if cfg.framework == "moco":
        return MoCoObjective(model, rule, cfg.temperature, cfg.queue_size, pool_size, cfg.batch_size, cfg.proj_dim,
                             cfg.moco_momentum, cfg.bn_splits if world == 1 else 1, with_labels, device, autocast)
    return SimCLRObjective(model, rule, cfg.temperature, autocast)

