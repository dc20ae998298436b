"""Every preset table in one place: a pretraining run's (:data:`PRESETS`), a sweep's grids
(:data:`SWEEP_PRESETS`), the label-fraction experiment's (:data:`LABEL_FRACTION_PRESETS`) and the Appendix B
simulation grid's (:data:`FN_SIMULATION_PRESETS`). (The simulator's dataset sizes stay with it in
:mod:`raysys.data.simulate`: the data layer sits below this one.)

``smoke`` is for tests (about 2 minutes on 2 CPU cores), ``demo`` (the default) for a 2-core laptop and
``paper`` for GPU clusters (Appendix A: ResNet-50, 224 px, 400 epochs, batch 128). On a CPU the model is
the bottleneck, so the laptop presets use a narrow ResNet-18 on 32 px."""

from __future__ import annotations

import numpy as np

from raysys.config.schema import PRESET_NAMES, PretrainConfig
from raysys.data.augment import AugmentConfig
from raysys.errors import ConfigError

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
        epochs=400, batch_size=128, lr=3e-4, cache_decoded=False,
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


assert tuple(PRESETS) == PRESET_NAMES, "the schema's preset names and this table must agree"


# Sweep presets: the pretraining preset plus the grids and the texture encoder's settings (TextureConfig
# fields), and whether the supervised reference runs and for how long. The demo K sweep is the Quickstart's main job: on a
# 2-core laptop it must finish in 15 minutes with its install (3.5 min), and a demo trial costs about a
# minute beyond its train steps (README, Quickstart), so it runs one K against the baseline over 2 seeds,
# no supervised runs, 2,048 images for 2 epochs, and the texture encoder for 2 epochs (its pseudo-label
# NMI did not rise over 5 on the demo pool).
SWEEP_PRESETS = {
    "smoke": dict(pretrain={}, ks=[4], seeds=1, supervised=True, supervised_steps=12, fine_tune_epochs=3,
                  temperatures=[0.1, 0.5], mix_ratios=[0.0, 1.0], mix_images=384, texture={}),
    "demo": dict(pretrain=dict(epochs=2, max_images=2048), k_steps=600, ks=[20], seeds=2, supervised=False, random_init=True,
                 supervised_steps=500,
                 fine_tune_epochs=5, temperatures=[0.1, 0.2, 0.5, 1.0], mix_ratios=[0.0, 0.5, 1.0], mix_images=2000,
                 texture=dict(epochs=2)),
    "paper": dict(pretrain={}, ks=list(range(10, 281, 30)), seeds=3, supervised=True, random_init=True, supervised_steps=5000,
                  fine_tune_epochs=100, temperatures=[0.05, 0.1, 0.2, 0.5, 1.0], mix_ratios=[0.0, 0.25, 0.5, 0.75, 1.0],
                  mix_images=100_000, texture={}),
    # The demo model on GPUs: the demo grids, trials sharing each GPU (a quarter each).
    "gpu": dict(base="demo", pretrain=dict(epochs=2, max_images=2048, gpus_per_worker=0.25), k_steps=1000, ks=[20], seeds=3,
                supervised=False, random_init=True, supervised_steps=500, fine_tune_epochs=5, temperatures=[0.1, 0.2, 0.5, 1.0],
                mix_ratios=[0.0, 0.5, 1.0], mix_images=2000, texture=dict(epochs=2)),
}
# A sweep preset trains with the pretraining preset of its own name, or of its ``base``. k_steps: the K sweep's
# step budget, the false-negative study's (FN_STUDY_PRESETS), at which oracle elimination separated from SimCLR
# (from about step 150 of 600); the other sweeps keep the preset's epochs (demo: 32 steps), and so does the K
# sweep given --epochs (the Quickstart's --epochs 2). random_init: the K sweep adds the untrained encoder
# (about 40 s of evaluation a seed on the demo) as its figures' reference line; not in smoke, the tests' preset.
# The supervised reference trains for supervised_steps optimizer steps (batch 128) on each benchmark: demo 500
# (about 40 epochs of the demo MSL train split, 13 of HiRISE's, which 5 epochs under-trained), paper 5000 (about
# 100 epochs of MSL v2.1's 5,920 train images).

DEFAULT_FRACTIONS = tuple(round(0.05 * i, 2) for i in range(1, 21))  # 5 %, 10 %, ..., 100 %
# Probe epochs default to the pretraining preset's ``eval_epochs`` (smoke 30, demo 100), so the 100 % point
# is the pipeline's own linear evaluation.
LABEL_FRACTION_PRESETS = {
    "smoke": dict(fractions=(0.1, 0.5, 1.0), seeds=2),
    "demo": dict(fractions=DEFAULT_FRACTIONS, seeds=3),
}

# Points per panel and batches per point (the panels "batch size" and "dataset size" draw one line per
# entry of panel_classes).
FN_SIMULATION_PRESETS = {
    "smoke": {"batches": 100, "classes": [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
              "batch_sizes": [2, 8, 32, 128, 512], "dataset_sizes": [128, 256, 1024, 10_000, 100_000],
              "panel_classes": [10, 100]},
    "default": {"batches": 1000,
                "classes": sorted({int(c) for c in np.geomspace(1, 1000, 31).round()}),
                "batch_sizes": [2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048],
                "dataset_sizes": sorted({int(n) for n in np.geomspace(128, 1_000_000, 14).round()}),
                "panel_classes": [10, 100, 1000]},
}

# The false-negative study (experiments/fn_study.py) per --preset: the step budget, the evaluation spacing,
# the global batch, seeds, the self-clustering arms' K and the pool. demo: 27 trials of 600 steps, ~2 h 10 min on
# a fast 2-core machine (bare step ~380 images/s); gpu: 45 trials of 1,000 steps, six sharing one GPU.
FN_STUDY_PRESETS = {
    "smoke": dict(steps=12, eval_every=4, batch_size=64, seeds=1, k=4, max_images=512),
    "demo": dict(steps=600, eval_every=50, batch_size=128, seeds=3, k=20, max_images=2048),
    "paper": dict(steps=5000, eval_every=250, batch_size=128, seeds=3, k=20, max_images=20_000),  # 3 GB paired at 224 px
    "gpu": dict(steps=1000, eval_every=50, batch_size=256, seeds=5, k=20, max_images=2048, gpus_per_worker=0.16),
}
