"""One config object that travels from the command line into the Ray Train workers, with presets.

Presets are sized for where they run: ``smoke`` (tests, about 2 minutes on 2 CPU cores), ``demo``
(the default; a 2-core laptop in about 15 minutes) and ``paper`` (Appendix A of the paper: ResNet-50,
224 px, 400 epochs, batch 128 — for GPU clusters). On a CPU the model is the bottleneck, so the
laptop presets use a narrow ResNet-18 on 32 px images.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from raysys.data.augment import AugmentConfig

BACKBONES = ("resnet18", "resnet50")
SCHEDULES = ("constant", "cosine")
AMP_MODES = ("none", "bf16", "fp16")
PAIR_RULES = ("instance", "cluster", "label", "ess-mb", "ess-mw")
FRAMEWORKS = ("simclr", "moco")
CLUSTER_MODES = ("eliminate", "attract")
PLACEMENTS = ("PACK", "SPREAD", "STRICT_SPREAD")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the option and the fix."""


@dataclass
class PretrainConfig:
    """Everything one pretraining run needs. Defaults are the paper's Appendix A where it gives one."""

    out: str = "runs/pretrain"
    # Durable state (checkpoints; with a sweep also Tune state and results): a folder or a URI such as
    # s3://bucket/prefix that every node can reach. None: inside ``out``.
    storage: str | None = None
    data: str | None = None  # folder of pretraining images, or a root holding datasets; None: built-in
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
    batch_size: int = 128  # global batch: split evenly across workers
    lr: float = 3e-4
    weight_decay: float = 1e-6
    temperature: float = 0.5
    schedule: str = "constant"
    warmup_epochs: int = 0
    pair_rule: str = "instance"  # instance (SimCLR), cluster (needs cluster ids), label (oracle)
    cluster_mode: str = "eliminate"  # cluster rule: eliminate (Eq. 2) or attract
    cluster_ids: str | None = None  # image_id,cluster_id table (raysys cluster --out) for pair_rule cluster
    # ESS (seed 001): positives within ess_radius metres (and ess_theta degrees of heading); ESS-MW weights
    # them by exp(-d^2 / 2 ess_sigma^2). None: derived from the pool's frame spacing at start.
    ess_radius: float | None = None
    ess_theta: float | None = None
    ess_sigma: float | None = None
    # Framework: SimCLR (in-batch negatives) or MoCo v2 (momentum key encoder + a queue of keys).
    framework: str = "simclr"
    queue_size: int = 65536  # MoCo: clamped below the pool size (a queue holding an image twice makes false negatives)
    moco_momentum: float = 0.999
    bn_splits: int = 2  # MoCo on one worker: key batch-norm over this many sub-batches (shuffle-BN's stand-in)
    amp: str = "none"  # bf16 / fp16 autocast, used on GPU only
    # Data pipeline.
    image_size: int = 224
    augment: dict = field(default_factory=lambda: AugmentConfig().to_dict())
    cache_decoded: bool = True  # keep decoded, resized images in the object store across epochs
    shuffle_buffer: int = 1024
    # Resources: workers=N Ray Train workers; CPUs per worker derived from the cluster when None.
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: float | None = None
    placement: str = "PACK"  # Ray placement of the Train workers: PACK, SPREAD or STRICT_SPREAD over nodes
    max_failures: int = 2
    # Evaluation after pretraining (linear probe on the labeled benchmarks).
    eval_benchmarks: list = field(default_factory=lambda: ["msl", "hirise"])
    eval_hidden: int = 0
    eval_epochs: int = 100
    # Online kNN monitor: each epoch, kNN accuracy of the backbone on a small labeled subset of this
    # benchmark's train (bank) and val (queries) splits -- never test -- logged and reported to Tune.
    knn_monitor: str | None = "msl"

    def __post_init__(self):
        aug = dict(self.augment)
        aug["size"] = self.image_size
        self.augment = aug

    @property
    def builtin_dir(self) -> Path:
        """One folder per simulation preset, so a smoke run never overwrites the demo data."""
        return Path(self.builtin_root) / self.sim_preset

    @property
    def rule_kwargs(self) -> dict:
        """Keyword arguments of :func:`raysys.methods.pairs.make_rule` for ``pair_rule``."""
        if self.pair_rule == "cluster":
            return {"mode": self.cluster_mode}
        if self.pair_rule.startswith("ess-"):
            kwargs = {"r": self.ess_radius, "theta": self.ess_theta}
            return kwargs | {"sigma": self.ess_sigma} if self.pair_rule == "ess-mw" else kwargs
        return {}

    @property
    def augment_config(self) -> AugmentConfig:
        return AugmentConfig.from_dict(self.augment)

    def validate(self) -> "PretrainConfig":
        """Raise :class:`ConfigError` (one line: the option, the value, the fix) on any bad value."""
        checks = [
            (self.preset in PRESETS, f"--preset {self.preset!r} is unknown; choose one of {sorted(PRESETS)}"),
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
            (self.pair_rule in PAIR_RULES, f"pair rule {self.pair_rule!r} is unknown; choose one of {list(PAIR_RULES)}"),
            (self.cluster_mode in CLUSTER_MODES,
             f"--cluster-mode {self.cluster_mode!r} is unknown; choose one of {list(CLUSTER_MODES)}"),
            (0 <= self.warmup_epochs < self.epochs or self.warmup_epochs == 0,
             f"--warmup-epochs must be below --epochs (got {self.warmup_epochs} of {self.epochs})"),
            (self.max_images is None or self.max_images >= self.batch_size,
             f"--max-images {self.max_images} is smaller than one batch ({self.batch_size}); raise it or lower --batch-size"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        for path, option in ((self.data, "--data"), (self.init_weights, "--init-weights"), (self.mix_data, "--mix-data"),
                             (self.cluster_ids, "--cluster-ids")):
            if path is not None and "://" not in path and not Path(path).exists():
                raise ConfigError(f"{option} {path} does not exist; pass an existing path (or omit {option} for the built-in data)")
        if self.storage is not None:
            from raysys.storage import check_storage

            self.storage = check_storage(self.storage)
        try:
            self.augment_config.validate()
        except ValueError as exc:
            raise ConfigError(f"augmentation: {exc}") from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PretrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True))


# Preset values; anything given explicitly on the command line wins over these.
PRESETS: dict[str, dict] = {
    "smoke": dict(
        sim_preset="smoke", backbone="resnet18", width=0.125, small_stem=True, image_size=16,
        epochs=2, batch_size=64, lr=1e-3, max_images=512, eval_epochs=30, shuffle_buffer=256,
    ),
    "demo": dict(
        sim_preset="demo", backbone="resnet18", width=0.25, small_stem=True, image_size=32,
        epochs=15, batch_size=128, lr=1e-3, schedule="cosine", warmup_epochs=1, eval_epochs=100,
    ),
    "paper": dict(
        sim_preset="paper", backbone="resnet50", width=1.0, small_stem=False, image_size=224,
        epochs=400, batch_size=128, lr=3e-4, cache_decoded=False, shuffle_buffer=4096,
    ),
}


def make_config(preset: str = "demo", **overrides) -> PretrainConfig:
    """Preset values, then explicit overrides (``None`` means 'not given')."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} is unknown; choose one of {sorted(PRESETS)}")
    values = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    if values.get("framework") == "moco":  # MoCo v2's recipe unless given: blur augmentation, temperature 0.2
        values.setdefault("augment", AugmentConfig.moco_v2().to_dict())
        values.setdefault("temperature", 0.2)
    return PretrainConfig(preset=preset, **values)


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
    p.add_argument("--backbone", help=f"one of {', '.join(BACKBONES)}")
    p.add_argument("--width", type=float, help="channel width multiplier of the backbone")
    p.add_argument("--image-size", type=int, help="training image side in pixels")
    p.add_argument("--epochs", type=int, help="pretraining epochs")
    p.add_argument("--batch-size", type=int, help="global batch size (split across workers)")
    p.add_argument("--temperature", type=float, help="InfoNCE temperature (paper: 0.5)")
    p.add_argument("--lr", type=float, help="Adam learning rate (paper: 3e-4)")
    p.add_argument("--schedule", choices=SCHEDULES, help="learning-rate schedule after warm-up")
    p.add_argument("--warmup-epochs", type=int, help="linear warm-up epochs")
    p.add_argument("--workers", type=int, help="Ray Train workers (DDP ranks)")
    p.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (0: CPU with gloo)")
    p.add_argument("--placement", choices=PLACEMENTS, help="spread the workers over nodes (SPREAD) or pack them "
                   "(PACK, default: fastest when one node holds them all)")
    p.add_argument("--amp", choices=AMP_MODES, help="mixed precision on GPU")
    p.add_argument("--max-images", type=int, help="use at most this many pretraining images")
    p.add_argument("--mix-ratio", type=float, help="mixed-domain pretraining: fraction of the pool drawn from "
                   "--mix-data (0: Mars only, 1: out-of-domain only); the pool size stays the same")
    p.add_argument("--mix-data", help="out-of-domain ImageFolder for --mix-ratio (e.g. ImageNet); default: "
                   "the built-in diverse/ dataset, or a diverse/ folder beside --data")
    p.add_argument("--init-weights", help="initialise the backbone from this weights file (torch.save'd state dict)")
    p.add_argument("--pair-rule", choices=PAIR_RULES, help="instance (SimCLR, default), cluster (cluster-aware: "
                   "needs --cluster-ids), label (oracle: uses true labels, a diagnostic upper bound), ess-mb / "
                   "ess-mw (spatial positives from capture positions: needs a positions sidecar)")
    p.add_argument("--cluster-mode", choices=CLUSTER_MODES, help="cluster rule: eliminate same-cluster negatives "
                   "(paper Eq. 2, default) or attract them as positives")
    p.add_argument("--cluster-ids", help="cluster table of the pool (image_id,cluster_id; Parquet or CSV), e.g. "
                   "from `raysys cluster --out FILE`")
    p.add_argument("--framework", choices=FRAMEWORKS, help="simclr (in-batch negatives, default) or moco "
                   "(MoCo v2: momentum key encoder, queue of negatives; use with --temperature 0.2)")
    p.add_argument("--queue-size", type=int, help="MoCo queue length (default 65536, clamped below the pool size)")
    p.add_argument("--ess-radius", type=float, help="ESS rules: positives within this distance in metres "
                   "(default: 2 x the median step between frames)")
    p.add_argument("--ess-sigma", type=float, help="ESS-MW: weight exp(-d^2/2 sigma^2) (default: the median step)")
    p.add_argument("--ess-theta", type=float, help="ESS rules: also require headings within this many degrees")
    p.add_argument("--seed", type=int, help="random seed of the initial weights and the pretraining subset (the built-in data has its own, fixed seed)")
    p.add_argument("--knn-monitor", help="benchmark whose train/val splits feed the per-epoch kNN monitor "
                   "(default msl; 'none' turns it off)")
    p.add_argument("--no-eval", action="store_true", help="skip the linear evaluation after pretraining")


def config_from_args(args) -> PretrainConfig:
    """Build and validate the config from parsed :func:`add_pretrain_arguments` options."""
    names = {f.name for f in dataclasses.fields(PretrainConfig)} - {"preset"}
    overrides = {k: v for k, v in vars(args).items() if k in names}
    if overrides.get("knn_monitor") == "none":
        overrides["knn_monitor"] = ""
    return make_config(args.preset, **overrides).validate()
