"""Command-line flags of a pretraining run (``raysys pretrain``, ``experiments/pretrain.py``)."""

from __future__ import annotations

import dataclasses

from raysys.config.presets import PRESETS, make_config
from raysys.config.schema import (
    AMP_MODES,
    AUGMENT_ON,
    BACKBONES,
    CLUSTER_MODES,
    FRAMEWORKS,
    PAIR_RULES,
    PLACEMENTS,
    SCHEDULES,
    STEMS,
    SYNC_BN_MODES,
    PretrainConfig,
)
from raysys.methods.self_clusters import SOURCES


def add_pretrain_arguments(p) -> None:
    """The option names shared by ``raysys pretrain`` and ``experiments/pretrain.py``.

    Defaults are None so the preset decides; an option given on the command line wins.
    """
    p.add_argument("--data", help="folder of pretraining images, or a folder holding datasets side by side "
                   "(rover pool + MSL/HiRISE benchmarks); default: built-in simulated data")
    p.add_argument("--out", default="runs/pretrain", help="run folder: config, TensorBoard, checkpoints, "
                   "model.pt, eval-*.json; rerunning with the same folder resumes (default: %(default)s)")
    p.add_argument("--storage", help="where checkpoints go: a folder or a URI every node can reach "
                   "(s3://bucket/prefix, gs://..., file://...); default: inside --out")
    p.add_argument("--preset", default="demo",
                   help=f"one of {', '.join(sorted(PRESETS))}: smoke (tests, ~2 min CPU), demo (laptop, ~15 min CPU), paper (Appendix A, GPUs) "
                   "(default: %(default)s)")
    _add_source_arguments(p)
    _add_model_arguments(p)
    p.add_argument("--image-size", type=int, help="training image side in pixels")
    p.add_argument("--epochs", type=int, help="pretraining epochs")
    p.add_argument("--batch-size", type=int, help="global batch size (split across workers)")
    p.add_argument("--temperature", type=float, help="InfoNCE temperature (paper: 0.5)")
    p.add_argument("--lr", type=float, help="Adam learning rate (paper: 3e-4)")
    _add_schedule_arguments(p)
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (0: CPU with gloo)")
    p.add_argument("--placement", choices=PLACEMENTS, help="spread the workers over nodes (SPREAD) or pack them "
                   "(PACK, default: fastest when one node holds them all)")
    p.add_argument("--amp", choices=AMP_MODES, help="autocast dtype on GPU (default bf16; CPU runs stay fp32)")
    p.add_argument("--sync-bn", choices=SYNC_BN_MODES, help="SimCLR's global batch norm over every worker's images "
                   "(auto, the default: on when --workers > 1; MoCo keeps shuffle-BN)")
    p.add_argument("--augment-on", choices=AUGMENT_ON, help="make the two views in each Train worker on its "
                   "device (worker: on GPU, augmentation off the CPUs) or in Ray Data's CPU tasks (data); auto, the "
                   "default: the worker on GPUs and on CPU-only clusters (where it measured faster)")
    p.add_argument("--decode-scale", type=float, help="decode images at this many times --image-size, so small "
                   "random crops upsample less (default 1.25; memory of the decode cache grows with its square)")
    p.add_argument("--max-images", type=int, help="use at most this many pretraining images")
    p.add_argument("--mix-ratio", type=float, help="mixed-domain pretraining: fraction of the pool drawn from "
                   "--mix-data (0: Mars only, 1: out-of-domain only); the pool size stays the same")
    p.add_argument("--mix-data", help="out-of-domain ImageFolder for --mix-ratio (e.g. ImageNet); default: "
                   "the built-in diverse/ dataset, or a diverse/ folder beside --data")
    p.add_argument("--init-weights", help="initialise the backbone from this weights file (torch.save'd state dict)")
    p.add_argument("--pair-rule", choices=PAIR_RULES, help="instance (SimCLR, default), cluster (cluster-aware: "
                   "needs --cluster-ids), label (oracle: uses true labels, a diagnostic upper bound), ess-mb / "
                   "ess-mw (spatial positives from capture positions: needs a positions sidecar), fnc (label-free: each "
                   "anchor's most similar images of the batch, see --fnc-k)")
    _add_detector_arguments(p)
    _add_study_arguments(p)
    p.add_argument("--framework", choices=FRAMEWORKS, help="simclr (in-batch negatives, default), moco "
                   "(MoCo v2: momentum key encoder, queue of negatives; temperature 0.2), or a pretext task: "
                   "rotation, relative-position, jigsaw, colorization (colour pools only)")
    p.add_argument("--jigsaw-permutations", type=int, help="jigsaw: size of the permutation set (default 100)")
    p.add_argument("--queue-size", type=int, help="MoCo queue length (default 65536, clamped below the pool size)")
    p.add_argument("--ess-radius", type=float, help="ESS rules: positives within this distance in metres "
                   "(default: 2 x the median step between frames)")
    p.add_argument("--ess-sigma", type=float, help="ESS-MW: weight exp(-d^2/2 sigma^2) (default: the median step)")
    p.add_argument("--ess-theta", type=float, help="ESS rules: also require headings within this many degrees")
    p.add_argument("--seed", type=int, help="random seed of the initial weights and the pretraining subset (the built-in data has its own, fixed seed)")
    p.add_argument("--knn-monitor", help="benchmark whose train/val splits feed the per-epoch kNN monitor "
                   "(default msl; 'none' turns it off)")
    p.add_argument("--no-eval", action="store_true", help="skip the linear evaluation after pretraining")


def _add_model_arguments(p) -> None:
    p.add_argument("--backbone", help=f"one of {', '.join(BACKBONES)}")
    p.add_argument("--stem", choices=STEMS, help="the backbone's first layers: standard (torchvision's 7x7 conv and "
                   "max-pool: an export loads into torchvision.models.resnet*) or small (3x3 conv, no pool: for images "
                   "of 32 px and less); default: the preset's (small for smoke and demo)")
    p.add_argument("--width", type=float, help="channel width multiplier of the backbone")


def _add_schedule_arguments(p) -> None:
    """The learning-rate schedule and the schedule's unit, the round (raysys.config.schedule)."""
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule after warm-up")
    p.add_argument("--warmup-epochs", type=int, help="linear lr warm-up, in rounds (epochs; see --round-steps)")
    p.add_argument("--round-steps", type=int, help="the schedule's unit in optimizer steps: each round ends with a "
                   "report (kNN monitor, TensorBoard) and a checkpoint, and the warm-ups and re-clustering interval "
                   "count rounds (default: an epoch, or 1/15 of a --max-steps budget too short for 15 epochs of the "
                   "pool, at least 10 steps)")


def _add_source_arguments(p) -> None:
    """Which images a run pretrains on, when ``--data`` holds several folders."""
    p.add_argument("--pool", help="the folder of unlabeled images to pretrain on (absolute, or relative to --data): "
                   "needed when --data holds several folders of images beside its benchmarks")
    p.add_argument("--pretrain-on-eval-splits", action="store_true", default=None,
                   help="also pretrain on the benchmarks' val and test images when --data has no pool (they are "
                   "what the linear probe is scored on, so its numbers then overstate; default: train split only)")


def _add_study_arguments(p) -> None:
    p.add_argument("--decoupled", action="store_true", default=None, help="take the positives out of the loss's "
                   "denominator (Yeh et al.'s decoupling): with --pair-rule instance it is DCL, with cluster the "
                   "paper's Eq. 2 as printed; default off (the positive stays: elimination's effect alone)")
    p.add_argument("--max-steps", type=int, help="step budget: stop after this many optimizer steps (the epochs "
                   "are derived from the pool size; the lr schedule ends there)")


def _add_detector_arguments(p) -> None:
    """Where the false negatives come from: cluster ids, self-clustering, the fnc rule."""
    p.add_argument("--cluster-mode", choices=CLUSTER_MODES, help="cluster and fnc rules: eliminate the "
                   "detected false negatives from the negatives (paper Eq. 2, default) or attract them as positives")
    p.add_argument("--cluster-ids", help="cluster table of the pool (image_id,cluster_id; Parquet or CSV), e.g. "
                   "from `raysys cluster --out FILE`")
    p.add_argument("--self-cluster-k", type=int, help="self-clustering (IFND): with --pair-rule cluster, cluster "
                   "the pool into K from the model's own features during training, no --cluster-ids needed")
    p.add_argument("--self-cluster-warmup", type=int, help="self-clustering: rounds (epochs, see --round-steps) of "
                   "plain SimCLR before the first clustering (default 1)")
    p.add_argument("--self-cluster-every", type=int, help="self-clustering: re-cluster every this many rounds "
                   "(epochs, see --round-steps; default 1)")
    p.add_argument("--self-cluster-source", choices=list(SOURCES), help="self-clustering: self (every image in "
                   "its cluster, default) or self-confident (IFND: only the most confident share, growing in training)")
    p.add_argument("--self-cluster-accept", type=float, help="self-confident: the share of images clustered by the "
                   "end of training (default 1: IFND's schedule)")
    p.add_argument("--fnc-k", type=int, help="--pair-rule fnc: detected false negatives per anchor, its most "
                   "similar other images of the batch (default 10)")
    p.add_argument("--fnc-threshold", type=float, help="--pair-rule fnc: only candidates above this cosine "
                   "similarity (default 0.5)")


def config_from_args(args) -> PretrainConfig:
    """Build and validate the config from parsed :func:`add_pretrain_arguments` options."""
    names = {f.name for f in dataclasses.fields(PretrainConfig)} - {"preset"}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if getattr(args, "stem", None):
        overrides["small_stem"] = args.stem == "small"
    if overrides.get("knn_monitor") == "none":
        overrides["knn_monitor"] = ""
    return make_config(args.preset, **overrides).validate()
