"""The sweep's spec: what runs (variants, seeds, the base config), how its trials are named and configured, and the
command-line flags that build it.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

from raysys import storage
from raysys.config import PretrainConfig, make_config
from raysys.config.presets import FN_STUDY_PRESETS, SWEEP_PRESETS
from raysys.config.schema import STEMS, check_saved
from raysys.data.augment import AugmentConfig
from raysys.distributed.clustering import ENCODERS
from raysys.errors import ConfigError
from raysys.methods.objectives import OBJECTIVES
from raysys.methods.pairs import RULES
from raysys.methods.self_clusters import SOURCES as SELF_SOURCES
from raysys.models.texture import TextureConfig


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


def trial_params(config: dict) -> dict:
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


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="demo",
                   help=f"one of {', '.join(SWEEP_PRESETS)}: smoke (tests), demo (2-core laptop, ~14 min for sweep_k), paper (GPU cluster), gpu (the demo model, trials sharing GPUs) (default: %(default)s)")
    p.add_argument("--out", default=None, help="sweep folder (default: runs/<sweep name>)")
    p.add_argument("--data", help="folder holding the pretraining pool and benchmarks (default: built-in data)")
    p.add_argument("--pool", help="the folder of unlabeled images to pretrain on, when --data holds several")
    p.add_argument("--stem", choices=STEMS, help="backbone stem: standard (torchvision-loadable exports) or small "
                   "(the smoke and demo presets')")
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
    p.add_argument("--verbose", action="store_true", help="show Ray's own output (Data progress, Train reports, Tune "
                   "tables, actor logs) on the console; default: in the sweep folder's ray-output.log")
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
        data=args.data, pool=args.pool, epochs=args.epochs, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
        placement=args.placement, cpus_per_worker=args.cpus_per_worker, decoupled=args.decoupled,
        small_stem=None if args.stem is None else args.stem == "small",
    ).items() if v is not None}}
    # Absolute paths: Tune runs each trial with its own working directory.
    out = str(Path(args.out or f"runs/{name}").resolve())
    for key in ("data", "mix_data", "pool"):
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
