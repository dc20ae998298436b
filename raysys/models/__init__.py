"""Encoders: backbones and projection heads, the texture encoder, model files."""

from raysys.models.backbones import *  # noqa: F401,F403
