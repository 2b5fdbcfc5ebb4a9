"""Errors a user sees as one sentence.

Every problem the user can fix (a bad config value, a missing checkpoint, a
port in use, a dead peer) is raised as a `ShoalError`; the command line prints
its message alone, without a traceback, and exits with its `exit_code`.
"""

from __future__ import annotations

import re


class ShoalError(Exception):
    """A problem the user can act on; `str(err)` names it and the fix."""

    exit_code = 1


class ConfigError(ShoalError):
    """Bad input found before any process starts (exit code 2)."""

    exit_code = 2

    def __init__(self, message: str, key: str | None = None):
        self.key = key
        super().__init__(message)

    def under(self, prefix: str) -> ConfigError:
        """The same error with its key qualified by a parent section."""
        if self.key is None:
            return self
        full = f"{prefix}.{self.key}"
        return ConfigError(str(self).replace(f"'{self.key}'", f"'{full}'", 1), full)


class CheckpointError(ShoalError):
    """A checkpoint that is missing, incomplete or damaged."""

    exit_code = 2


class WorkerError(ShoalError):
    """A worker process of the job exited with an error."""


def first_line(text: str) -> str:
    """The first non-blank line of a message ('' if none): what a one-sentence report quotes."""
    return (text.strip().splitlines() or [""])[0]


# What a worker prints when it fails because another one did: its connection
# closed, a collective timed out, the launcher stopped it, gloo aborted.
_SECONDARY = re.compile(
    r"connection (closed|reset) by peer|broken pipe|socket timeout|timed out|connection refused"
    r"|got signal: \d+|SignalException|terminate called|communicator was aborted",
    re.IGNORECASE,
)


def caused_by_peer(error_line: str) -> bool:
    """True if a worker's last error line says it failed because of another process."""
    return bool(_SECONDARY.search(error_line))
