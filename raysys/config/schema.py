"""One config object that travels from the command line into the Ray Train workers: its fields, their
validation, and its saved form (``config.json``, a sweep's state), which carries a version.

A config is frozen: :meth:`PretrainConfig.validate` and every later step that completes a value (the
canonical storage URI, a derived ESS radius, a trial's folders) return a new one (:meth:`replace`), so
what was validated is what runs.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from raysys.data.augment import AugmentConfig
from raysys.errors import ConfigError
from raysys.methods.objectives import OBJECTIVES
from raysys.methods.pairs import RULES, ClusterRule
from raysys.methods.self_clusters import SOURCES
from raysys.storage import check_storage, write_text_atomic

BACKBONES = ("resnet18", "resnet50")
STEMS = ("standard", "small")  # --stem: small_stem False / True
SCHEDULES = ("constant", "cosine")
# Between the linear probe's 128-unit dense layer and its class layer (raysys.eval.linear)
PROBE_ACTIVATIONS = ("none", "relu")
AMP_MODES = ("none", "bf16", "fp16")
SYNC_BN_MODES = ("auto", "on", "off")
AUGMENT_ON = ("auto", "data", "worker")
# Where --augment-on auto makes the views without a GPU (bench/gpu_step.py --device cpu, README): on a CPU-only
# cluster the Train workers' own cores made them faster than Ray Data's tasks competing with them for the cores.
CPU_AUGMENT_ON = "worker"
PAIR_RULES = tuple(RULES)
FRAMEWORKS = tuple(OBJECTIVES)  # contrastive (simclr, moco) and the pretext tasks
CLUSTER_MODES = ClusterRule.MODES
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD")
# Saved configs carry it; bump it when a field changes meaning or goes, and teach from_dict the old form.
CONFIG_VERSION = 1
PRESET_NAMES = ("smoke", "demo", "paper")  # their values: raysys.config.presets


def check_saved(cls, saved: dict, version: int, current: int, what: str, fix: str) -> None:
    """Refuse a saved ``cls`` (a dataclass) written by a newer version or holding keys it does not know,
    naming them: resuming with defaults in their place would silently change the run."""
    if version > current:
        raise ConfigError(f"this {what} was saved by a newer raysys ({what} version {version}, this one reads up to "
                          f"{current}); upgrade raysys to resume it")
    unknown = sorted(set(saved) - {f.name for f in dataclasses.fields(cls)})
    if unknown:
        raise ConfigError(f"saved {what} has unknown keys {unknown}; it was written by another raysys version or "
                          f"edited by hand: {fix}")


@dataclass(frozen=True)
class PretrainConfig:
    """Everything one pretraining run needs. Defaults are the paper's Appendix A where it gives one."""

    out: str = "runs/pretrain"
    # Durable state (checkpoints; with a sweep also Tune state and results): a folder or a URI such as
    # s3://bucket/prefix that every node can reach. None: inside ``out``.
    storage: str | None = None
    data: str | None = None  # folder of pretraining images, or a root holding datasets; None: built-in
    # The pool: which folder of ``data`` is pretrained on when it holds several (raysys.data.sources); None: found.
    pool: str | None = None
    # With no pool beside the benchmarks, they are pretrained on: train splits only unless this says otherwise,
    # since val and test are what the probe is scored on.
    pretrain_on_eval_splits: bool = False
    preset: str = "demo"
    seed: int = 0
    # Built-in data (used when ``data`` is None): written once under ``builtin_root/<sim_preset>``.
    builtin_root: str = "data/builtin"
    sim_preset: str = "demo"
    sim_seed: int = 0  # the built-in data's own seed: trials with other training seeds share one dataset
    max_images: int | None = None  # cap on the pretraining pool (None: all)
    # Mixed-domain pretraining (paper Sec. 4.3): this fraction of the pool comes from a diverse domain
    # (``mix_data``, an ImageFolder; default the built-in or discovered ``diverse/``), total unchanged.
    mix_ratio: float = 0.0
    mix_data: str | None = None
    # Model (Appendix A: 3 projection layers, 128-d output).
    backbone: str = "resnet18"
    width: float = 1.0
    small_stem: bool = False
    proj_dim: int = 128
    proj_layers: int = 3
    init_weights: str | None = None
    # Optimisation (Appendix A: Adam, lr 3e-4, weight decay 1e-6, temperature 0.5, batch 128).
    epochs: int = 400
    # A step budget instead: training stops after max_steps optimizer steps, the epochs (and the lr
    # schedule's length) derived from the pool size at start (pretrain). None: ``epochs`` decides.
    max_steps: int | None = None
    # The schedule's unit (raysys.config.schedule): a round ends with a report and a checkpoint, and the
    # epoch-counted options below count rounds. None: an epoch, or 1/15 of a step budget too short for 15 epochs.
    round_steps: int | None = None
    batch_size: int = 128  # global batch: split evenly across workers
    lr: float = 3e-4
    weight_decay: float = 1e-6
    temperature: float = 0.5
    schedule: str = "constant"
    warmup_epochs: int = 0
    pair_rule: str = "instance"  # instance (SimCLR), cluster (needs cluster ids), label (oracle)
    cluster_mode: str = "eliminate"  # cluster rule: eliminate (Eq. 2) or attract
    # Loss reading: True takes the positives out of every denominator (decoupling; with the cluster rule the
    # paper's Eq. 2 as printed, with the instance rule DCL). False keeps them: elimination's effect alone.
    decoupled: bool = False
    cluster_ids: str | None = None  # image_id,cluster_id table (raysys cluster --out) for pair_rule cluster
    # Self-clustering (IFND): pair_rule cluster with ids from the model itself -- K clusters of its backbone
    # features, made before epoch self_cluster_warmup and every self_cluster_every epochs after (0: off).
    self_cluster_k: int = 0
    self_cluster_warmup: int = 1
    self_cluster_every: int = 1
    # Which images get a cluster (raysys.methods.self_clusters.SOURCES): "self" every one; "self-confident"
    # (IFND) only the most confident share, growing with training to self_cluster_accept (1: IFND's schedule).
    self_cluster_source: str = "self"
    self_cluster_accept: float = 1.0
    # Pair rule fnc (per-anchor detection, FNC): the anchor's fnc_k most similar other images of the batch,
    # those above cosine similarity fnc_threshold, are detected false negatives (cluster_mode: eliminate/attract).
    fnc_k: int = 10
    fnc_threshold: float = 0.5
    # ESS (seed 001): positives within ess_radius metres (and ess_theta degrees of heading); ESS-MW weights
    # them by exp(-d^2 / 2 ess_sigma^2). None: derived from the pool's frame spacing at start.
    ess_radius: float | None = None
    ess_theta: float | None = None
    ess_sigma: float | None = None
    # Framework: SimCLR (in-batch negatives), MoCo v2 (momentum key encoder + a queue of keys), or a pretext
    # task (rotation, relative-position, jigsaw, colorization): raysys.methods.objectives.OBJECTIVES.
    framework: str = "simclr"
    jigsaw_permutations: int = 100  # jigsaw: permutations in its fixed, maximally distant set
    queue_size: int = 65536  # MoCo: clamped below the pool size (a queue holding an image twice makes false negatives)
    moco_momentum: float = 0.999
    bn_splits: int = 2  # MoCo on one worker: key batch-norm over this many sub-batches (shuffle-BN's stand-in)
    # SimCLR with several workers: batch norm over the global batch (SimCLR's global BN); auto = on then.
    # MoCo keeps its shuffle-BN (bn_splits on one worker).
    sync_bn: str = "auto"
    amp: str = "bf16"  # autocast dtype on GPU (bf16 / fp16 / none); CPU runs stay in fp32
    # Data pipeline.
    image_size: int = 224
    augment: dict = field(default_factory=lambda: AugmentConfig().to_dict())
    cache_decoded: bool = True  # keep decoded, resized images in the object store across epochs
    # Images are decoded at decode_scale x image_size: RandomResizedCrop's small crops (8 % of the area: 0.28 of
    # the side) then upsample 2.8x instead of 3.5x. Costs decode_scale^2 the pixels: 1.56x at 1.25, i.e. 235 KB
    # instead of 150 KB per 224 px image in the decode cache (23 GB instead of 15 GB per 100,000 images).
    decode_scale: float = 1.25
    # Where the two views are made: in the Train worker on its device (the same batched torch code, on a side
    # stream one batch ahead; on GPU it keeps 224 px augmentation off the CPUs) or in Ray Data's CPU tasks
    # ("data"). auto: the worker on GPUs, CPU_AUGMENT_ON without. Ray Data decodes either way.
    augment_on: str = "auto"
    # Rows Ray Data's local shuffle buffer holds before each epoch's first batch: the pool is permuted once and
    # its small blocks come in a new order every epoch, so a buffer of about one batch varies the batches; a
    # larger one only delays every epoch's start while it fills.
    shuffle_buffer: int = 256
    # Resources: workers=N Ray Train workers; CPUs per worker derived from the cluster when None.
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    placement: str = "PACK"  # Ray placement of the Train workers: PACK, SPREAD or STRICT_SPREAD over nodes
    max_failures: int = 2
    # Evaluation after pretraining (linear probe on the labeled benchmarks).
    eval_benchmarks: list = field(default_factory=lambda: ["msl", "hirise"])
    eval_hidden: int = 0  # 0: one linear layer; 128: the paper's dense layer (raysys.eval.linear)
    eval_activation: str = "none"  # between the dense layer and the class layer: none (the paper's reading) or relu
    eval_epochs: int = 100
    # Online kNN monitor: each epoch, kNN accuracy of the backbone on a small labeled subset of this
    # benchmark's train (bank) and val (queries) splits -- never test -- logged and reported to Tune.
    knn_monitor: str | None = "msl"
    # Evaluation curve (the false-negative study): every eval_every optimizer steps, and at step 0, kNN accuracy
    # of the backbone on pool images never pretrained on (hidden labels), two folds of traverses each the
    # other's bank; saved as curve.json in the run folder and logged to TensorBoard. 0: off (it replaces the
    # per-epoch kNN monitor when on).
    eval_every: int = 0
    # Paired batches (the study): each epoch's batches and views are a function of (seed, epoch, step), not of
    # Ray's scheduling, so two runs of one seed that differ only in the loss see identical data. The decoded
    # pool is held in the object store whole: for pools that fit in memory.
    paired_batches: bool = False

    def __post_init__(self):
        object.__setattr__(self, "augment", {**self.augment, "size": self.image_size})

    @property
    def builtin_dir(self) -> Path:
        """One folder per simulation preset, so a smoke run never overwrites the demo data."""
        return Path(self.builtin_root) / self.sim_preset

    @property
    def rule_kwargs(self) -> dict:
        """Keyword arguments of :func:`raysys.methods.pairs.make_rule` for ``pair_rule`` (its ``options``)."""
        return {arg: getattr(self, field) for arg, field in RULES[self.pair_rule].options.items()}

    @property
    def objective(self):
        """The framework's objective class (its inputs, head and checks)."""
        return OBJECTIVES[self.framework]

    @property
    def synchronized_bn(self) -> bool:
        """Whether batch norm runs over the global batch: SimCLR with several workers, unless --sync-bn off."""
        return self.framework == "simclr" and self.workers > 1 and self.sync_bn != "off"

    @property
    def augment_config(self) -> AugmentConfig:
        return AugmentConfig.from_dict(self.augment)

    @property
    def decode_size(self) -> int:
        """Side of the decoded images the views are cut from (``decode_scale`` x ``image_size``)."""
        return round(self.image_size * self.decode_scale)

    @property
    def views_on(self) -> str:
        """Where the views are made: ``augment_on`` with auto resolved (the worker on GPUs)."""
        if self.augment_on != "auto":
            return self.augment_on
        return "worker" if self.gpus_per_worker > 0 else CPU_AUGMENT_ON

    def validate(self) -> "PretrainConfig":
        """Raise :class:`ConfigError` (one line: the option, the value, the fix) on any bad value; return the
        config to run (the same one, with ``storage`` in its canonical form)."""
        checks = [
            (self.preset in PRESET_NAMES, f"--preset {self.preset!r} is unknown; choose one of {sorted(PRESET_NAMES)}"),
            (self.backbone in BACKBONES, f"--backbone {self.backbone!r} is unknown; choose one of {list(BACKBONES)}"),
            (self.width > 0, f"--width must be > 0 (got {self.width})"),
            (0.0 <= self.mix_ratio <= 1.0,
             f"--mix-ratio must be in [0, 1] (got {self.mix_ratio}): it is the out-of-domain fraction of the pool"),
            (self.temperature > 0, f"--temperature must be > 0 (got {self.temperature}); the paper uses 0.5"),
            (self.batch_size >= 2, f"--batch-size must be at least 2 (got {self.batch_size}): a contrastive batch needs negatives"),
            (self.workers >= 1, f"--workers must be at least 1 (got {self.workers})"),
            (self.batch_size % self.workers == 0 if self.workers >= 1 else True,
             f"--batch-size {self.batch_size} must be divisible by --workers {self.workers} (the global batch is split evenly)"),
            (self.batch_size // max(self.workers, 1) >= 2 or self.workers < 1,
             f"--batch-size {self.batch_size} over {self.workers} workers leaves fewer than 2 images per worker; raise --batch-size"),
            (self.epochs >= 1, f"--epochs must be at least 1 (got {self.epochs})"),
            (self.lr > 0, f"--lr must be > 0 (got {self.lr})"),
            (self.framework in FRAMEWORKS, f"--framework {self.framework!r} is unknown; choose one of {list(FRAMEWORKS)}"),
            (self.framework not in FRAMEWORKS or OBJECTIVES[self.framework].contrastive or self.pair_rule == "instance",
             f"--pair-rule {self.pair_rule} needs a contrastive framework (simclr or moco); --framework "
             f"{self.framework} is a pretext task with no pairs: drop --pair-rule"),
            (2 <= self.jigsaw_permutations <= 1000,
             f"--jigsaw-permutations must be in 2..1000 (got {self.jigsaw_permutations}); Noroozi & Favaro use 100"),
            (self.queue_size >= 1, f"--queue-size must be at least 1 (got {self.queue_size})"),
            (0.0 <= self.moco_momentum < 1.0, f"--moco-momentum must be in [0, 1) (got {self.moco_momentum}); MoCo uses 0.999"),
            (self.ess_radius is None or self.ess_radius >= 0, f"--ess-radius must be >= 0 metres (got {self.ess_radius})"),
            (self.ess_sigma is None or self.ess_sigma > 0, f"--ess-sigma must be > 0 metres (got {self.ess_sigma})"),
            (self.ess_theta is None or 0 <= self.ess_theta <= 180,
             f"--ess-theta is a heading difference in degrees and must be in [0, 180] (got {self.ess_theta})"),
            (self.placement in PLACEMENTS, f"--placement {self.placement!r} is unknown; choose one of {list(PLACEMENTS)}"),
            (self.gpus_per_worker >= 0, f"--gpus-per-worker must be >= 0 (got {self.gpus_per_worker})"),
            (self.image_size >= 8, f"--image-size must be at least 8 (got {self.image_size})"),
            (self.schedule in SCHEDULES, f"--schedule {self.schedule!r} is unknown; choose one of {list(SCHEDULES)}"),
            (self.amp in AMP_MODES, f"--amp {self.amp!r} is unknown; choose one of {list(AMP_MODES)}"),
            (self.augment_on in AUGMENT_ON, f"--augment-on {self.augment_on!r} is unknown; choose one of {list(AUGMENT_ON)}"),
            (self.sync_bn in SYNC_BN_MODES, f"--sync-bn {self.sync_bn!r} is unknown; choose one of {list(SYNC_BN_MODES)}"),
            (not (self.sync_bn == "on" and self.framework == "moco"),
             "--sync-bn on: MoCo v2 keeps shuffle-BN (its key encoder must not see the global batch's statistics); "
             "drop --sync-bn or use --framework simclr"),
            (self.pair_rule in PAIR_RULES, f"pair rule {self.pair_rule!r} is unknown; choose one of {list(PAIR_RULES)}"),
            (self.cluster_mode in CLUSTER_MODES,
             f"--cluster-mode {self.cluster_mode!r} is unknown; choose one of {list(CLUSTER_MODES)}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0 (got {self.warmup_epochs})"),
            (self.round_steps is None or self.round_steps >= 1, f"--round-steps must be at least 1 (got {self.round_steps})"),
            (self.max_images is None or self.max_images >= self.batch_size,
             f"--max-images {self.max_images} is smaller than one batch ({self.batch_size}); raise it or lower --batch-size"),
        ]
        for ok, message in checks + self._detector_checks() + self._eval_checks() + self._study_checks() + self._data_checks():
            if not ok:
                raise ConfigError(message)
        for path, option in ((self.data, "--data"), (self.init_weights, "--init-weights"), (self.mix_data, "--mix-data"),
                             (self.cluster_ids, "--cluster-ids")):
            if path is not None and "://" not in path and not Path(path).exists():
                raise ConfigError(f"{option} {path} does not exist; pass an existing path (or omit {option} for the built-in data)")
        try:
            self.augment_config.validate()
        except ValueError as exc:
            raise ConfigError(f"augmentation: {exc}") from None
        return self if self.storage is None else self.replace(storage=check_storage(self.storage))

    def _eval_checks(self) -> list[tuple[bool, str]]:
        return [(self.eval_activation in PROBE_ACTIVATIONS, f"eval_activation: choose one of {list(PROBE_ACTIVATIONS)}")]

    def _data_checks(self) -> list[tuple[bool, str]]:
        return [(1.0 <= self.decode_scale <= 2.0, f"--decode-scale must be in [1, 2] (got {self.decode_scale}): "
                 "images are decoded at this many times --image-size")]

    def _study_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.max_steps is None or self.max_steps >= 1, f"--max-steps must be at least 1 (got {self.max_steps})"),
            (self.eval_every >= 0, f"eval_every must be >= 0 steps (got {self.eval_every}); 0 turns the curve off"),
            (not (self.paired_batches and self.views_on == "data"),
             "paired batches make the views in the worker from the step's seed; drop --augment-on data"),
        ]

    def _self_cluster_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.self_cluster_k == 0 or (self.self_cluster_k >= 2 and self.pair_rule == "cluster"),
             f"--self-cluster-k {self.self_cluster_k}: self-clustering needs K >= 2 and --pair-rule cluster "
             f"(got --pair-rule {self.pair_rule}); pass both, or drop --self-cluster-k"),
            (self.self_cluster_k == 0 or (self.self_cluster_warmup >= 0 and self.self_cluster_every >= 1),
             f"--self-cluster-warmup must be >= 0 and --self-cluster-every >= 1 (got {self.self_cluster_warmup} and "
             f"{self.self_cluster_every}); they count rounds (epochs, see --round-steps)"),
            (not (self.self_cluster_k and self.cluster_ids),
             "--self-cluster-k makes its own cluster ids; drop --cluster-ids (or --self-cluster-k)"),
            (self.self_cluster_source in SOURCES,
             f"--self-cluster-source {self.self_cluster_source!r} is unknown; choose one of {list(SOURCES)}"),
            (0.0 < self.self_cluster_accept <= 1.0,
             f"--self-cluster-accept {self.self_cluster_accept} must be a share in (0, 1]"),
        ]

    def _detector_checks(self) -> list[tuple[bool, str]]:
        """Where false negatives come from: self-clustering's and the fnc rule's options."""
        return self._self_cluster_checks() + [
            (self.fnc_k >= 1, f"--fnc-k must be at least 1 candidate per anchor (got {self.fnc_k})"),
            (-1.0 <= self.fnc_threshold <= 1.0, f"--fnc-threshold is a cosine similarity in [-1, 1] (got {self.fnc_threshold})"),
            (not (self.pair_rule == "fnc" and self.framework != "simclr"),
             f"--pair-rule fnc detects within the batch's views, which --framework {self.framework} lacks; "
             "use --framework simclr"),
        ]

    def replace(self, **changes) -> "PretrainConfig":
        """A copy with ``changes``; the config itself never changes once made."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Every field and the schema's ``version`` (what ``config.json`` and a sweep's state hold)."""
        return {"version": CONFIG_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        """Read a saved config; a newer version or a key this version does not know is an error naming it
        (rather than a run that silently resumes with defaults). Files without a version are version 1."""
        d = dict(d)
        check_saved(cls, d, d.pop("version", 1), CONFIG_VERSION, "config", "remove them or start a new run")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        write_text_atomic(str(path), json.dumps(self.to_dict(), indent=2, sort_keys=True))
