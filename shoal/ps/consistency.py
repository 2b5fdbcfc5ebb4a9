"""Consistency models: which mode each parameter gets, and when a server may
answer a pull.

Clocks: a worker's clock is the number of gradient pushes it has made; it
pulls for clock c after its c-th push and computes step c with the answer.
The server keeps, per worker, how many pushes it has received (`pushed`) and,
for synchronous parameters, how many clocks it has completed (`bsp_done`).

- `bsp`: the W pushes of clock t are averaged and applied once; a pull for
  clock c waits until clocks 0..c-1 are all applied (`bsp_done >= c`). Every
  worker computes step c on the same values, which is data parallelism.
- `asp`: every push is applied when it arrives; a pull never waits.
- `ssp` with staleness s: pushes are applied on arrival; a pull for clock c
  waits until the slowest worker has pushed c - s times (Ho et al. 2013), so
  no worker runs more than s clocks ahead of the slowest. s = 0 is lock-step
  without averaging.

A server holding keys of several modes answers a pull when every rule of
the modes it holds allows it (the worker needs all its parameters anyway).
A worker that departed (`shoal.ps.membership`: it died or hangs) is left
out of the SSP bound until it rejoins (`absent`), so the others go on; BSP
still needs its push, from its replacement.
`Gate.gaps` is the server's own record of how far ahead (clock minus the
slowest worker's clock) each answered pull let a worker run.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.errors import ConfigError

KINDS = ("bsp", "asp", "ssp")


@dataclass(frozen=True)
class Mode:
    kind: str
    staleness: int = 0

    def __str__(self) -> str:
        return f"ssp:{self.staleness}" if self.kind == "ssp" else self.kind


def parse_mode(text: str, staleness: int, key: str) -> Mode:
    """'bsp' | 'asp' | 'ssp' (with the run's staleness) | 'ssp:N'."""
    kind, _, bound = str(text).partition(":")
    if kind not in KINDS or (bound and kind != "ssp"):
        raise ConfigError(f"'{key}' must be one of bsp, asp, ssp or ssp:N (N >= 0), not {text!r}", key)
    if bound:
        if not bound.isdigit():
            raise ConfigError(f"'{key}': the staleness in {text!r} must be a whole number >= 0, e.g. ssp:3", key)
        staleness = int(bound)
    return Mode(kind, staleness if kind == "ssp" else 0)


def resolve(names: list[str], default: Mode, overrides: dict[str, str], staleness: int) -> dict[str, Mode]:
    """Each parameter name's mode: the first override glob that matches it, else the default."""
    rules = [(glob, parse_mode(mode, staleness, f"overrides.{glob}")) for glob, mode in overrides.items()]
    return {name: next((m for glob, m in rules if fnmatch.fnmatchcase(name, glob)), default) for name in names}


class Gate:
    """A server's clocks and the rule for answering pulls."""

    def __init__(self, workers: int, modes: Iterable[Mode]):
        modes = list(modes)
        self.workers = workers
        self.pushed = [0] * workers
        self.bsp_done = 0
        self.has_bsp = any(m.kind == "bsp" for m in modes)
        bounds = [m.staleness for m in modes if m.kind == "ssp"]
        self.ssp_bound = min(bounds) if bounds else None
        self.gaps: Counter[int] = Counter()
        self.absent: set[int] = set()
        """Departed workers, not counted by the SSP bound until they rejoin."""

    @property
    def slowest(self) -> int:
        return min(self.pushed)

    @property
    def slowest_present(self) -> int:
        """The slowest worker that has not departed (every worker's minimum if all did)."""
        return min([n for w, n in enumerate(self.pushed) if w not in self.absent] or self.pushed)

    @property
    def never_waits(self) -> bool:
        """Every key here is ASP: a pull is answered at once, whatever the clocks."""
        return not self.has_bsp and self.ssp_bound is None

    def ready(self, clock: int) -> bool:
        bsp_behind = self.has_bsp and self.bsp_done < clock
        ssp_behind = self.ssp_bound is not None and self.slowest_present < clock - self.ssp_bound
        return not (bsp_behind or ssp_behind)

    def waiting_on(self, clock: int) -> list[int]:
        """The workers whose missing pushes hold back a pull for `clock`."""
        need = clock
        if not (self.has_bsp and self.bsp_done < clock) and self.ssp_bound is not None:
            need = clock - self.ssp_bound
        return [w for w, n in enumerate(self.pushed) if n < need]

    def answered(self, clock: int) -> None:
        self.gaps[clock - self.slowest_present] += 1

    @property
    def max_gap(self) -> int:
        return max(self.gaps, default=0)
