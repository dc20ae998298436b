"""What a person reads while raysys runs: raysys's own lines and one live progress display on the console,
Ray's output (Data progress bars, Train reports, Tune status tables, actor logs) in the run folder's log file.

The split is made at the file-descriptor level, so that everything Ray writes from the driver -- its own
prints, its C++ core's, and the worker logs it forwards -- lands in the file, whatever library printed it.
``--verbose`` leaves the console as it is. Warnings of raysys's own loggers still reach the console.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

from raysys.errors import RaysysError

LOG_FILE = "ray-output.log"
STATUS_EVERY_S = 30.0  # a console that is not a terminal (a job log) gets the live line at most this often

_terminal: TextIO | None = None  # the console while Ray's output goes to the log file


def say(text: str) -> None:
    """One line of raysys's own on the console (the terminal, or the job's log under ``ray job submit``)."""
    Status.clear_shown()
    print(text, file=_terminal or sys.stdout, flush=True)


def duration(seconds: float) -> str:
    """``45 s``, ``3 min``, ``2 h 05 min``: how long, at the precision an ETA deserves."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:02.0f} min"


class Status:
    """The one live progress line: rewritten in place on a terminal; elsewhere printed when it changes, at
    most every :data:`STATUS_EVERY_S` seconds, so a job's log stays short."""

    _shown_on_tty = False

    def __init__(self, every: float = STATUS_EVERY_S):
        self.every, self.last_text, self.last_time = every, None, -float("inf")

    def show(self, text: str, force: bool = False) -> None:
        stream = _terminal or sys.stdout
        if stream.isatty():
            stream.write("\r\033[K" + text)
            stream.flush()
            Status._shown_on_tty = True
            return
        now = time.monotonic()
        if text != self.last_text and (force or now - self.last_time >= self.every):
            print(text, file=stream, flush=True)
            self.last_text, self.last_time = text, now

    @classmethod
    def clear_shown(cls) -> None:
        """Wipe a live line off the terminal before a permanent line is printed."""
        if cls._shown_on_tty:
            stream = _terminal or sys.stdout
            stream.write("\r\033[K")
            stream.flush()
            cls._shown_on_tty = False


@contextmanager
def quiet_console(folder: str | Path, verbose: bool = False):
    """Send this process's standard output and error to ``folder/ray-output.log`` for the duration, keeping
    the console for :func:`say`, :class:`Status` and raysys's warnings; restored on the way out, before any
    error is printed. Bad input (a :class:`RaysysError`) leaves no log behind where there was none, so a
    rejected command touches nothing. ``verbose``: change nothing."""
    if verbose or _terminal is not None:  # nested: the outer one already redirects
        yield
        return
    path = Path(folder) / LOG_FILE
    made = [p for p in (path, path.parent, *path.parent.parents) if not p.exists()]  # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    state, rejected = _redirect(path), False
    try:
        yield
    except RaysysError:
        rejected = True
        raise
    finally:
        _restore(state)
        for p in made if rejected else ():  # the log, then the folders made for it, while empty
            if p.is_file() or (p.is_dir() and not any(p.iterdir())):
                p.unlink() if p.is_file() else p.rmdir()


def _redirect(path: Path) -> tuple:
    """Point file descriptors 1 and 2 (and Python's streams) at ``path``; keep the console for :func:`say`."""
    global _terminal
    sys.stdout.flush(), sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    _terminal = os.fdopen(os.dup(1), "w", buffering=1)
    warnings = logging.StreamHandler(_terminal)
    warnings.setLevel(logging.WARNING)
    warnings.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    logging.getLogger("raysys").addHandler(warnings)
    with open(path, "ab") as log:
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
    # Python-level streams too, in case they were replaced (pytest, a notebook) and no longer write to fds 1, 2.
    streams = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (open(fd, "w", buffering=1, closefd=False) for fd in (1, 2))
    return saved, streams, warnings


def _restore(state: tuple) -> None:
    global _terminal
    saved, streams, warnings = state
    sys.stdout.flush(), sys.stderr.flush()  # not closed: a Ray thread may still hold them for a last line
    sys.stdout, sys.stderr = streams
    Status.clear_shown()
    for fd, copy in zip((1, 2), saved):
        os.dup2(copy, fd)
        os.close(copy)
    logging.getLogger("raysys").removeHandler(warnings)
    _terminal.close()
    _terminal = None
