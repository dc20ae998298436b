"""The errors raysys raises for bad input: one base class, so the command line can tell them from bugs.

Every message is one line that names the problem and the fix. ``raysys`` prints a :class:`RaysysError` as
that line and exits 2; any other exception is a bug and keeps its traceback. They also derive from
``ValueError``, which is what each of them is.
"""

import sys


class RaysysError(ValueError):
    """Bad input: an option, a file, a dataset. The message names the problem and the fix."""


class ConfigError(RaysysError):
    """A configuration value is invalid."""


class DataError(RaysysError):
    """An on-disk dataset cannot be read."""


class ModelFileError(RaysysError):
    """A saved model or weights file cannot be used (missing, unreadable, or not a raysys model)."""


class DecodeError(RaysysError):
    """The bytes are not a decodable image (empty, truncated, or not an image at all)."""


class AugmentConfigError(RaysysError):
    """An augmentation setting has an invalid value."""


class SimulateError(RaysysError):
    """Bad arguments to the simulator, or an output folder it must not overwrite."""


class TextureConfigError(RaysysError):
    """A texture-encoder setting has an invalid value."""


class ClusterError(RaysysError):
    """Bad input to the clustering step."""


class StorageError(RaysysError):
    """Shared storage failed after bounded retries (unreachable, refused, full); what is already there stays."""


class PositionsError(ConfigError):
    """The metadata cannot give a positions sidecar."""


def run_command(prog: str, func, *args) -> int:
    """``func(*args)`` as a command: a :class:`RaysysError` becomes one line on stderr and exit code 2
    (before or after expensive work, nothing computed is lost); anything else propagates as a bug."""
    try:
        return func(*args)
    except RaysysError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
