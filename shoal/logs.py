"""Where shoal's log records go, set up in one place.

Library modules only create loggers (`logging.getLogger("shoal....")`) and
change nothing for the process when imported. The processes shoal starts
itself (the `shoal` command, each parameter server, each `shoal train`
worker) call `setup()` once, first thing: records of the `shoal` loggers go
to stderr as `name: message`, from SHOAL_LOG_LEVEL up (default WARNING). A
script run by `shoal run` is the user's program, and so is its logging.
`quiet(...)` silences another library's loggers for the length of a block.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import TextIO

from shoal import env
from shoal.errors import ConfigError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
FORMAT = "%(name)s: %(message)s"


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (tests and tools replace it)."""

    def __init__(self) -> None:
        super().__init__()
        self.set_name("shoal")
        self.setFormatter(logging.Formatter(FORMAT))

    @property
    def stream(self) -> TextIO:  # a property pair: the base class assigns `stream`
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def setup(level: str | None = None) -> None:
    """Show shoal's records from `level` up (default: SHOAL_LOG_LEVEL, else WARNING). Idempotent."""
    name = (level or os.environ.get(env.LOG_LEVEL) or "WARNING").upper()
    if name not in LEVELS:
        raise ConfigError(f"{env.LOG_LEVEL} must be one of {', '.join(LEVELS)}, not {name!r}", env.LOG_LEVEL)
    logger = logging.getLogger("shoal")
    logger.setLevel(name)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())


@contextlib.contextmanager
def quiet(*names: str) -> Iterator[None]:
    """Loggers `names`, and those below them that exist, report only CRITICAL records inside the block;
    their levels come back after it (torch's elastic loggers set levels of their own, which a parent's
    level does not override: the agent's "Received 15 death signal" warning came through)."""
    existing = [n for n in logging.root.manager.loggerDict if any(n.startswith(f"{name}.") for name in names)]
    loggers = [logging.getLogger(name) for name in [*names, *existing]]
    saved = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for logger, level in zip(loggers, saved, strict=True):
            logger.setLevel(level)
