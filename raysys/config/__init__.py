"""The one pretraining config: schema and validation (frozen once made), presets, command-line flags."""

from raysys.config.flags import add_pretrain_arguments, config_from_args  # noqa: F401
from raysys.config.presets import PRESETS, make_config  # noqa: F401
from raysys.config.schema import *  # noqa: F401,F403
