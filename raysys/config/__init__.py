"""The one pretraining config: schema and validation, presets, command-line flags."""

from raysys.config.schema import *  # noqa: F401,F403
