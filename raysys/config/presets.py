"""Preset values of a pretraining run: ``smoke`` (tests, about 2 minutes on 2 CPU cores), ``demo`` (the
default; a 2-core laptop) and ``paper`` (Appendix A: ResNet-50, 224 px, 400 epochs, batch 128 -- for GPU
clusters). On a CPU the model is the bottleneck, so the laptop presets use a narrow ResNet-18 on 32 px."""

from __future__ import annotations

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


assert tuple(PRESETS) == PRESET_NAMES, "the schema's preset names and this table must agree"
