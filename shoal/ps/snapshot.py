"""A replica's whole state between two inputs: what a replacement backup starts from.

Why: a shard whose other process died goes on with one copy; a process the launcher
starts in its place (`shoal.ps.replacement`) becomes its backup again. Replication
keeps two replicas equal by feeding both the same inputs in order
(`shoal.ps.replication`), so a new one needs the state those inputs built, taken
by the primary's loop between two inputs, and then every later input as before.
That state is everything `Server` changes while it serves: the pieces (values,
optimizer state, steps), the clocks, each worker's sequence numbers and
incarnations, the BSP sums and the parts of pushes not yet complete, the reads
that wait, and the membership record.

It travels as the link's inputs (`take` gives a msgpack header and the tensors,
each sent as one message, so each fits the limit a piece does); nothing is
unpickled. `load` rebuilds the pieces from worker 0's description as the server's
start did and checks what it installs (`optim.import_state`). Compressed pulls are
the one thing not copied: both replicas start their pull encoders afresh, so each
worker's next pull is answered with whole values (as after a rejoin).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from shoal.compress.base import Receiver
from shoal.ps import optim
from shoal.ps.consistency import Gate
from shoal.ps.parts import Staged
from shoal.ps.pieces import build_piece
from shoal.ps.pull_codec import pull_encoder
from shoal.ps.reads import PendingRead
from shoal.ps.startup import code_shapes

if TYPE_CHECKING:
    from shoal.ps.server import Server


def _pairs(mapping: dict) -> list[list]:
    return [[k, v] for k, v in mapping.items()]


def fresh_pulls(server: Server) -> None:
    """Compressed pulls start afresh (every worker's next reply whole): on both replicas alike."""
    if server.pulls is not None:
        _restart_pulls(server, server.pulls.spec, (server.pulls.encodes, server.pulls.whole))


def _restart_pulls(server: Server, spec: str, counts: tuple[int, int] | list[int]) -> None:
    """A new pull encoder for `spec` that holds nothing for any worker, keeping the counters `counts`."""
    assert server.workers is not None
    server.pulls = pull_encoder(spec, list(server.pieces.values()), server.workers)
    if server.pulls is not None:
        server.pulls.forget()
        server.pulls.encodes, server.pulls.whole = counts


def take(server: Server) -> tuple[dict, list[torch.Tensor]]:
    """The state of a started replica, and its tensors (copies: the optimizer changes the originals)."""
    gate, members = server.gate, server.members
    assert gate is not None and server.workers is not None
    fresh_pulls(server)
    tensors: list[torch.Tensor] = []

    def add(*ts: torch.Tensor) -> None:
        tensors.extend(t.detach().clone() for t in ts)

    pieces = []
    for piece in server.pieces.values():
        items = optim.export_state(piece.opt, piece.param)
        pieces.append([piece.key, piece.steps, [k for k, _ in items]])
        add(piece.param, *(t for _, t in items))
    accum = []
    for clock, sums in server.accum.items():
        accum.append([clock, list(sums)])
        add(*sums.values())
    parts = []
    for src, staged in server.parts.staged.items():
        parts.append(
            [src, staged.clock, staged.parts, sorted(staged.keys), staged.nonfinite, [p.key for p in staged.pieces]]
        )
        add(*staged.grads)
    header = {
        "workers": server.workers,
        "joined": [[w, ident.hex(), spec] for w, (ident, spec) in server.joined.items()],
        "init_seq": _pairs(server.init_seq),
        "optim": server.optim_name,
        "hp": server.hp,
        "timeout_s": server.timeout_s,
        "max_bytes": server.codec.max_bytes,
        "seq": _pairs(server.seq),
        "read_applied": _pairs(server.read_applied),
        "staleness": _pairs(server.staleness),
        "counts": [server.applied, server.skipped, server.nonfinite, server.clocks_seen],
        "accum_count": _pairs(server.accum_count),
        "skipped_clocks": sorted(server.skipped_clocks),
        "bye": sorted(server.bye),
        "gate": [gate.pushed, gate.bsp_done, _pairs(gate.gaps), sorted(gate.absent)],
        "pieces": pieces,
        "accum": accum,
        "parts": parts,
        "pending": [[r.ident.hex(), r.worker, r.clock, r.reply, r.exact, r.seq] for r in server.pending],
        "members": {
            "ident": [[w, i.hex()] for w, i in members.ident.items()],
            "pids": _pairs(members.pids),
            "fenced": [[i.hex(), w] for i, w in members.fenced.items()],
            "stale": [[i.hex(), w] for i, w in members.stale.items()],
            "seen": [[w, sorted(s)] for w, s in members.seen.items()],
            "departed": sorted(members.departed),
            "finished": sorted(members.finished),
            "departures": members.departures,
            "rejoins": members.rejoins,
        },
        "dropped": dict(server.dropped),
        "pull_counts": [server.pulls.encodes, server.pulls.whole] if server.pulls is not None else [],
        "count": len(tensors),
    }
    return header, tensors


def load(server: Server, header: dict, tensors: list[torch.Tensor]) -> None:
    """Install a state `take` made into a replica that holds none yet; ValueError (or KeyError,
    TypeError) if it is not one, before the replica is usable (its process then gives it up)."""
    if len(tensors) != header["count"]:
        raise ValueError(f"{header['count']} tensors announced, {len(tensors)} arrived")
    it = iter(tensors)
    server.workers = workers = int(header["workers"])
    server.joined = {int(w): (bytes.fromhex(i), spec) for w, i, spec in header["joined"]}
    spec = server.joined[0][1]
    server.init_seq = {int(w): int(n) for w, n in header["init_seq"]}
    server.optim_name = name = header["optim"]
    server.hp = [optim.check_hyperparameters(name, hp) for hp in header["hp"]]  # as the primary holds them
    server.flags = [optim.flags(name, hp) for hp in server.hp]  # the switches fixed at start: never changed
    server.timeout_s = float(header["timeout_s"])
    server.codec.max_bytes = int(header["max_bytes"])
    _pieces(server, spec, header["pieces"], it)
    server.accum = {int(c): {k: next(it).clone() for k in keys} for c, keys in header["accum"]}  # summed in place
    for src, clock, count, keys, nonfinite, held in header["parts"]:
        pieces = [server.pieces[k] for k in held]
        staged = Staged(int(clock), int(count), pieces, [next(it) for _ in pieces], set(keys), bool(nonfinite))
        server.parts.staged[int(src)] = staged
    if next(it, None) is not None:
        raise ValueError("more tensors than the state names")
    server.seq = {int(w): int(n) for w, n in header["seq"]}
    server.read_applied = {int(w): int(n) for w, n in header["read_applied"]}
    server.staleness = {int(w): float(s) for w, s in header["staleness"]}
    server.applied, server.skipped, server.nonfinite, server.clocks_seen = (int(n) for n in header["counts"])
    server.accum_count = Counter({int(c): int(n) for c, n in header["accum_count"]})
    server.skipped_clocks = {int(c) for c in header["skipped_clocks"]}
    server.bye = {int(w) for w in header["bye"]}
    gate = Gate(workers, [p.mode for p in server.pieces.values()])
    pushed, gate.bsp_done, gaps, absent = header["gate"]
    gate.pushed = [int(n) for n in pushed]
    gate.gaps = Counter({int(g): int(n) for g, n in gaps})
    gate.absent = {int(w) for w in absent}
    if len(gate.pushed) != workers:
        raise ValueError("one clock per worker")
    server.gate = gate
    server.async_keys = any(p.mode.kind != "bsp" for p in server.pieces.values())
    server.pending = [_read(server, *r) for r in header["pending"]]
    _members(server, header["members"])
    server.dropped = Counter({str(k): int(v) for k, v in header["dropped"].items()})
    _restart_pulls(server, spec.get("pull_compression", "none"), header["pull_counts"])
    server.first_join = time.monotonic()


def _pieces(server: Server, spec: dict, held: list, it: Iterator[torch.Tensor]) -> None:
    """The pieces as the server's start built them from worker 0's description, with the values,
    optimizer state and step counts the primary holds."""
    compression = spec.get("compression", "none")
    server.receiver = Receiver(compression) if compression != "none" else None
    steps = {key: (n, names) for key, n, names in held}
    server.pieces = {}
    for key_spec, code_shape in zip(spec["keys"], code_shapes(spec), strict=True):
        piece = build_piece(key_spec, next(it), code_shape, server.optim_name, server.hp, server.receiver)
        n, names = steps[piece.key]
        optim.import_state(server.optim_name, piece.opt, piece.param, [(name, next(it)) for name in names])
        piece.steps = int(n)
        server.pieces[piece.key] = piece
    if list(server.pieces) != [p[0] for p in held]:
        raise ValueError("the pieces differ from worker 0's description")
    server.order = list(server.pieces)


def _read(server: Server, ident: str, worker: int, clock: int, reply: str, exact: bool, seq: int) -> PendingRead:
    return PendingRead(
        bytes.fromhex(ident), int(worker), int(clock), time.monotonic(), str(reply), bool(exact), int(seq)
    )


def _members(server: Server, record: dict) -> None:
    members = server.members
    members.ident = {int(w): bytes.fromhex(i) for w, i in record["ident"]}
    members.pids = {int(w): int(p) for w, p in record["pids"]}
    members.fenced = {bytes.fromhex(i): int(w) for i, w in record["fenced"]}
    members.stale = {bytes.fromhex(i): int(w) for i, w in record["stale"]}
    members.seen = {int(w): set(s) for w, s in record["seen"]}
    members.departed = {int(w) for w in record["departed"]}
    members.finished = {int(w) for w in record["finished"]}
    members.departures = list(record["departures"])
    members.rejoins = list(record["rejoins"])
