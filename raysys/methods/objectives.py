"""Training objectives: how one batch becomes a loss (plain PyTorch, no Ray), and their registry.

A method is one objective class and one entry of :data:`OBJECTIVES` (``--framework NAME``). The
contrastive ones take a batch of two views: :class:`SimCLRObjective` scores both views of the batch
against each other (in-batch negatives); :class:`MoCoObjective` scores queries (view 1, the trained
encoder) against keys (view 2, a momentum encoder) of the batch and a queue of earlier keys. Both take
any pair rule, so instance, cluster-aware, spatial (ESS) and oracle positives work with either. The
pretext tasks (:class:`PretextObjective`'s subclasses) take the decoded images and build their own task
batch (:mod:`raysys.methods.pretext`); their head replaces the projection head (:meth:`head`).

The trainer builds an objective with :meth:`build`, feeds it what :attr:`inputs` names, calls ``loss``
before and ``after_step`` after the optimizer step, and checkpoints ``state_dict``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
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
from raysys.methods.pretext import (
    ab_bins,
    colorization_loss,
    colour_targets,
    jigsaw_batch,
    permutation_set,
    random_flip,
    rebalancing_weights,
    relative_position_batch,
    rotation_batch,
    smoothing_kernel,
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
    "task_accuracy": "pretext_accuracy",
}


@dataclass
class ObjectiveContext:
    """What the trainer knows beyond the config when it builds an objective."""

    pool_size: int
    world: int = 1
    with_labels: bool = False  # hidden labels in the batch: false-negative diagnostics
    device: torch.device | None = None
    autocast: Callable = contextlib.nullcontext
    generator: torch.Generator | None = None  # the rank's own stream for the task's random choices


class Objective:
    """What every method shares: its input, its head, its model input, and no state by default."""

    name: str
    inputs = "views"  # "views": two augmented views per image; "images": the decoded images
    contrastive = True  # pairs and negatives: pair rules and false-negative diagnostics apply
    gray_input = False  # the model sees luminance only (colorization), at evaluation too
    needs_colour = False  # refuses a one-channel pool before training starts

    @classmethod
    def head(cls, cfg) -> dict | None:
        """The model head's spec (:func:`raysys.models.heads.build_head`); None: the projection head."""
        return None

    def after_step(self) -> None:
        pass

    def relabel_clusters(self, lookup: Callable[[Tensor], Tensor]) -> None:
        """New cluster ids (self-clustering): image ids -> cluster ids. Only state that stores ids cares."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class SimCLRObjective(Objective):
    """SimCLR (paper Eq. 1) and its pair-rule variants: one forward over both views, so batch norm sees
    the whole 2B batch; negatives are the other views of the global batch."""

    name = "simclr"

    @classmethod
    def build(cls, cfg, model: nn.Module, ctx: ObjectiveContext) -> "SimCLRObjective":
        return cls(model, make_rule(cfg.pair_rule, **cfg.rule_kwargs), cfg.temperature, ctx.autocast, cfg.decoupled)

    def __init__(self, model: nn.Module, rule: Rule, temperature: float, autocast=contextlib.nullcontext,
                 decoupled: bool = False):
        self.model, self.rule, self.temperature, self.autocast = model, rule, temperature, autocast
        self.decoupled = decoupled
        self.baseline = make_rule("instance")  # what a rule removed is judged against SimCLR's pairs

    def loss(self, view1: Tensor, view2: Tensor, meta: dict) -> tuple[Tensor, dict]:
        with self.autocast():
            _, z = self.model(torch.cat([view1, view2]))
        z1, z2 = z.float().chunk(2)
        if "support" in self.rule.requires:  # per-anchor detection (fnc): each image's views, detached
            meta = {**meta, "support": support_embedding(z1, z2)}
        loss, pairs, global_meta = contrastive_loss(z1, z2, meta, self.rule, self.temperature, self.decoupled)
        stats = positives_per_anchor(pairs) if self.rule.spatial else {}
        if "label" in global_meta:  # hidden labels: a diagnostic, never used by the loss
            baseline = self.baseline(global_meta) if self.rule.name != "instance" else None
            stats |= false_negative_stats(pairs, global_meta["label"], baseline)
        return loss, stats


def support_embedding(*views: Tensor) -> Tensor:
    """``[B, D]``: the mean of each image's L2-normalized view embeddings, without gradient; the dot product of
    two of them is the mean cosine similarity over all pairs of their views."""
    return torch.stack([F.normalize(v.detach(), dim=1) for v in views]).mean(0)


class MoCoObjective(Objective):
    """MoCo v2: queries from the trained encoder, keys from its momentum copy with shuffle-BN, negatives
    from the batch's keys and a queue that carries each key's metadata, so every pair rule also applies
    to queue entries. The queue is clamped below the pool size (with a warning): a queue holding the same
    image twice would manufacture false negatives."""

    name = "moco"

    @classmethod
    def build(cls, cfg, model: nn.Module, ctx: ObjectiveContext) -> "MoCoObjective":
        return cls(model, make_rule(cfg.pair_rule, **cfg.rule_kwargs), cfg.temperature, cfg.queue_size, ctx.pool_size,
                   cfg.batch_size, cfg.proj_dim, cfg.moco_momentum, cfg.bn_splits if ctx.world == 1 else 1,
                   ctx.with_labels, ctx.device, ctx.autocast, cfg.decoupled)

    def __init__(self, model: nn.Module, rule: Rule, temperature: float, queue_size: int, pool_size: int,
                 batch_size: int, dim: int, momentum: float = 0.999, bn_splits: int = 1, with_labels: bool = False,
                 device=None, autocast=contextlib.nullcontext, decoupled: bool = False):
        self.model, self.rule, self.temperature, self.autocast = model, rule, temperature, autocast
        self.decoupled = decoupled
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
        loss, pairs, global_meta = moco_loss(q.float(), k.float(), meta, self.queue, self.rule, self.temperature,
                                              self.decoupled)
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

    def relabel_clusters(self, lookup: Callable[[Tensor], Tensor]) -> None:
        if "cluster_id" in self.queue.meta_keys:  # queued keys would otherwise pair by the old clustering
            self.queue.relabel("cluster_id", lookup)

    def state_dict(self) -> dict:
        return {"key_model": self.key_model.state_dict(), "queue": self.queue.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.key_model.load_state_dict(state["key_model"])
        self.queue.load_state_dict(state["queue"])


class PretextObjective(Objective):
    """A pretext task: the model classifies what :meth:`task` did to a (randomly mirrored) batch of images;
    cross-entropy, no pairs and no negatives."""

    inputs, contrastive = "images", False

    def __init__(self, model: nn.Module, ctx: ObjectiveContext):
        self.model, self.autocast, self.generator = model, ctx.autocast, ctx.generator

    @classmethod
    def build(cls, cfg, model: nn.Module, ctx: ObjectiveContext) -> "PretextObjective":
        return cls(model, ctx)

    def task(self, x: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def loss(self, images: Tensor, meta: dict) -> tuple[Tensor, dict]:
        inputs, labels = self.task(random_flip(images, self.generator))
        with self.autocast():
            _, scores = self.model(inputs.contiguous(memory_format=torch.channels_last))
        scores = scores.float()
        return F.cross_entropy(scores, labels), {"task_accuracy": (scores.argmax(1) == labels).float().mean()}


class RotationObjective(PretextObjective):
    """RotNet (Gidaris et al. 2018): which of 0/90/180/270 degrees each image was rotated by, all four
    rotations of every image in the batch."""

    name = "rotation"

    @classmethod
    def head(cls, cfg) -> dict:
        return {"kind": "tiles", "tiles": 1, "classes": 4}

    def task(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return rotation_batch(x)


class RelativePositionObjective(PretextObjective):
    """Doersch et al. 2015: where a neighbouring patch sits relative to the centre patch (8 ways), from
    the pair's features fused late; gap, jitter and colour dropping guard against trivial cues."""

    name = "relative-position"

    @classmethod
    def head(cls, cfg) -> dict:
        return {"kind": "tiles", "tiles": 2, "classes": 8}

    def task(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return relative_position_batch(x, self.generator)


class JigsawObjective(PretextObjective):
    """Noroozi & Favaro 2016: which permutation of a fixed set (``--jigsaw-permutations``, 100 by default)
    shuffled the 3x3 tiles, from a shared-weight network over the 9 tiles."""

    name = "jigsaw"

    def __init__(self, model: nn.Module, ctx: ObjectiveContext, permutations: int):
        super().__init__(model, ctx)
        self.permutations = torch.from_numpy(permutation_set(permutations)).to(ctx.device)

    @classmethod
    def build(cls, cfg, model: nn.Module, ctx: ObjectiveContext) -> "JigsawObjective":
        return cls(model, ctx, cfg.jigsaw_permutations)

    @classmethod
    def head(cls, cfg) -> dict:
        return {"kind": "tiles", "tiles": 9, "classes": cfg.jigsaw_permutations}

    def task(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return jigsaw_batch(x, self.permutations, self.generator)


class ColorizationObjective(PretextObjective):
    """Zhang et al. 2016: the quantized ab colour of every cell from luminance alone, soft-encoded, with
    rare colours up-weighted. Zhang et al. take the colour distribution from the whole training set
    beforehand; here it is counted over the batches seen so far (checkpointed with the run). Their network
    keeps 1/4 of the input's resolution with dilated convolutions; on the ResNet trunk every method shares,
    the scores come at its output stride and are upsampled to 1/4 (:func:`head`)."""

    name = "colorization"
    gray_input, needs_colour = True, True

    def __init__(self, model: nn.Module, ctx: ObjectiveContext):
        super().__init__(model, ctx)
        self.bins = ab_bins().to(ctx.device)
        self.kernel = smoothing_kernel(self.bins)
        self.counts = torch.zeros(len(self.bins), device=ctx.device)

    @classmethod
    def head(cls, cfg) -> dict:
        stride = 8 if cfg.small_stem else 32  # the ResNet trunk's output stride
        return {"kind": "dense", "classes": len(ab_bins()), "scale": stride // 4}

    def loss(self, images: Tensor, meta: dict) -> tuple[Tensor, dict]:
        x = random_flip(images, self.generator)
        with self.autocast():
            _, scores = self.model(x.contiguous(memory_format=torch.channels_last))
        soft, nearest = colour_targets(x, tuple(scores.shape[-2:]), self.bins)
        self.counts += torch.bincount(nearest, minlength=len(self.bins))
        loss = colorization_loss(scores, soft, nearest, rebalancing_weights(self.counts, self.kernel))
        predicted = scores.argmax(1).flatten()
        return loss, {"task_accuracy": (predicted == nearest).float().mean()}

    def state_dict(self) -> dict:
        return {"counts": self.counts.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.counts = state["counts"].to(self.counts.device)


# The registry: --framework NAME -> its objective class.
OBJECTIVES: dict[str, type[Objective]] = {cls.name: cls for cls in (
    SimCLRObjective, MoCoObjective, RotationObjective, RelativePositionObjective, JigsawObjective,
    ColorizationObjective)}


def make_objective(cfg, model: nn.Module, ctx: ObjectiveContext) -> Objective:
    """The objective of ``cfg`` (a :class:`raysys.config.PretrainConfig`) for ``model``."""
    return OBJECTIVES[cfg.framework].build(cfg, model, ctx)
