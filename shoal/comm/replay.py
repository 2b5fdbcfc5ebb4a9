"""Replay protection for signed requests: per-server sessions and one-time request ids.

A MAC, or a CURVE connection, proves that a holder of the job key wrote a
message, not that it was written for this run, this server, or only once.
So every request carries, inside what the MAC or the connection
authenticates:

- `session`: a nonce drawn fresh by each server process when it starts and
  published, signed under the job's store session (`shoal.ps.store`), next to
  its endpoint; a request recorded in another run, or sent to a server that
  restarted, names another session and is dropped, even under a reused
  SHOAL_JOB_KEY;
- `to`: the server's index, so a request meant for one server of a job is
  dropped by every other;
- `seq`: from a worker, its sequence number, increasing per server session
  (the server drops one not above the last); from an observer (stats
  requests, which have no fixed sender), a one-time id (`Once`): the sender's
  clock in nanoseconds, accepted once and only within `WINDOW_S` of the
  server's clock, so the set a server remembers stays as small as the rate
  of genuine requests.

Under CURVE (`shoal.comm.security`) a stranger cannot inject or replay
bytes at all, and messages carry no MAC (`shoal.comm.wire`); these checks
still stop a member's stale messages (a process of an earlier run under a
reused key, a request meant for another server or session), and, where
CURVE is off, replays; they cost a few dictionary lookups per message.
"""

from __future__ import annotations

import secrets
import time

WINDOW_S = 120.0
"""How far an observer's clock may be from a server's (and how long a one-time id is remembered)."""


def new_session() -> str:
    """A server process's session nonce (64 random bits, hex)."""
    return secrets.token_hex(8)


def addressed(header: dict, session: str, index: int) -> bool:
    """Whether a request names this server (`index`) in this process's `session`."""
    to = header.get("to")
    return header.get("session") == session and isinstance(to, int) and not isinstance(to, bool) and to == index


def one_time_id() -> int:
    """A fresh id for a request without a sequence number (see `Once`)."""
    return time.time_ns()


class Once:
    """Accepts each one-time id once, and only ids within `WINDOW_S` of this process's clock."""

    def __init__(self, window_s: float = WINDOW_S):
        self.window_ns = int(window_s * 1e9)
        self.seen: dict[int, int] = {}  # id -> when it stops mattering (ns); insertion order is arrival order

    def fresh(self, value: object) -> bool:
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        now = time.time_ns()
        while self.seen:  # forget ids whose window has passed: they are refused as too old anyway
            oldest = next(iter(self.seen))
            if self.seen[oldest] > now:
                break
            del self.seen[oldest]
        if abs(now - value) > self.window_ns or value in self.seen:
            return False
        self.seen[value] = now + 2 * self.window_ns
        return True
