"""Which server holds which slice of which parameter.

A parameter larger than `chunk_bytes` is cut into near-equal chunks of its
flattened elements, as many as a multiple of the server count (so it spreads
evenly) with none larger than `chunk_bytes`; then pieces are placed largest first, each onto the
server with the fewest bytes so far (chunks of one tensor prefer servers that
hold none of its other chunks, so a large tensor's traffic is spread). Ties go
to the lowest server index, so every worker computes the same plan from the
same model without talking to anyone. The plan's imbalance is max/mean bytes
per server (1.0 is perfect).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import NamedTuple

log = logging.getLogger("shoal.ps.placement")


@dataclass(frozen=True)
class Piece:
    """Elements [start, stop) of the flattened parameter `name`, held by `server`."""

    key: str
    name: str
    start: int
    stop: int
    nbytes: int
    server: int


@dataclass
class Plan:
    pieces: list[Piece]
    servers: int

    def load(self) -> list[int]:
        out = [0] * self.servers
        for p in self.pieces:
            out[p.server] += p.nbytes
        return out

    @property
    def imbalance(self) -> float:
        load = self.load()
        mean = sum(load) / self.servers
        return max(load) / mean if mean else 1.0

    def on(self, server: int) -> list[Piece]:
        return [p for p in self.pieces if p.server == server]

    def describe(self) -> str:
        load = self.load()
        rows = [f"server {s}: {load[s] / 1e6:.3f} MB in {len(self.on(s))} pieces" for s in range(self.servers)]
        return f"placement over {self.servers} servers, imbalance (max/mean bytes) {self.imbalance:.3f}; " + "; ".join(
            rows
        )


class _Chunk(NamedTuple):
    name: str
    start: int
    stop: int
    nbytes: int
    chunks: int
    """How many chunks the tensor `name` is cut into."""


def _chunks(sizes: list[tuple[str, int, int]], servers: int, chunk_bytes: int) -> list[_Chunk]:
    out = []
    for name, numel, itemsize in sizes:
        nbytes = numel * itemsize
        n = math.ceil(nbytes / chunk_bytes) if chunk_bytes > 0 else 1
        if n > 1:  # a multiple of the server count, so the tensor spreads evenly over all of them
            n = math.ceil(n / servers) * servers
        n = max(1, min(numel, n))
        bounds = [round(i * numel / n) for i in range(n + 1)]
        for i in range(n):
            out.append(_Chunk(name, bounds[i], bounds[i + 1], (bounds[i + 1] - bounds[i]) * itemsize, n))
    return out


def plan(sizes: list[tuple[str, int, int]], servers: int, chunk_bytes: int) -> Plan:
    """Place parameters given as (name, numel, element_size) on `servers` servers."""
    if servers < 1:
        raise ValueError("servers must be >= 1")
    chunks = _chunks(sizes, servers, chunk_bytes)
    load = [0] * servers
    holders: dict[str, set[int]] = {}  # the servers holding a chunk of each tensor
    placed: dict[int, int] = {}
    for i in sorted(range(len(chunks)), key=lambda i: (-chunks[i].nbytes, i)):
        chunk = chunks[i]
        holding = holders.setdefault(chunk.name, set())
        spread = 1 < chunk.chunks <= servers
        server = min(range(servers), key=lambda s: (spread and s in holding, load[s], s))
        load[server] += chunk.nbytes
        holding.add(server)
        placed[i] = server
    out = []
    for i, c in enumerate(chunks):
        key = c.name if c.chunks == 1 else f"{c.name}#{c.start}"
        out.append(Piece(key, c.name, c.start, c.stop, c.nbytes, placed[i]))
    result = Plan(out, servers)
    log.info(result.describe())
    return result
