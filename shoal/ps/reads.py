"""A parameter server's reads: pulls and checkpoint (state) requests, answered when the consistency
rule allows (`shoal.ps.consistency`); one primary's answers go out at once or once its backup holds
what they depend on (`shoal.ps.replication`)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, NamedTuple

import torch

from shoal.comm.wire import WireError
from shoal.ps import server_state
from shoal.ps.protocol import PARAMS, PULL, STATE, whole
from shoal.ps.pull_codec import Ready, replies
from shoal.ps.replication import PRIMARY, PrimaryLink

if TYPE_CHECKING:
    from shoal.ps.server import Server


class PendingRead(NamedTuple):
    """A pull or state request the consistency rule does not allow yet."""

    ident: bytes
    worker: int
    clock: int
    since: float
    reply: str
    """PARAMS for a pull, STATE for a checkpoint."""
    exact: bool = False
    """A pull that wants the values whole even when pulls are compressed."""
    seq: int = 0
    """The request's sequence number, named in the reply (`re`)."""


def answer_again(server: Server, ident: bytes, src: int, seq: int, header: dict, op: str) -> None:
    """A pull or state request resent after a takeover that this replica already took: its answer
    may have died with the old primary. Answered again (if not still waiting), values whole."""
    if op == PULL and header.get("previous") is True:
        return answer_previous(server, ident, src, header)  # answered at once, never pending
    gate = server.joined_gate(src)
    if header.get("clock") != gate.pushed[src] or any(r.worker == src for r in server.pending):
        raise WireError("replayed")
    if server.pulls is not None:
        server.pulls.replaced(src)  # what the worker holds is unknown: the next reply is whole
    reply = PARAMS if op == PULL else STATE
    server.pending.append(PendingRead(ident, src, gate.pushed[src], time.monotonic(), reply, True, seq))
    answer_ready(server)


def on_pull(server: Server, ident: bytes, src: int, header: dict, op: str = PULL) -> None:
    gate = server.joined_gate(src)
    clock = gate.pushed[src]
    previous = header.get("previous", False)
    if previous is not False:
        if previous is not True or op != PULL:
            raise WireError("malformed", f"previous must be true or false in a pull, not {previous!r}")
        return answer_previous(server, ident, src, header)
    if not whole(header.get("clock")) or header.get("clock") != clock:
        raise WireError("bad_clock", f"worker {src} pulled clock {header.get('clock')} after {clock} pushes")
    exact = header.get("exact", False)
    if not isinstance(exact, bool):
        raise WireError("malformed", f"exact must be true or false, not {exact!r}")
    reply = PARAMS if op == PULL else STATE
    server.pending.append(PendingRead(ident, src, clock, time.monotonic(), reply, exact, header["seq"]))
    answer_ready(server)


def answer_previous(server: Server, ident: bytes, src: int, header: dict) -> None:
    """The values of the clock before worker `src`'s last push, for its new process (a pull marked `previous`).

    Its predecessor died between its pushes to two servers: this one holds the push of clock c, another
    does not. The new process goes on from c, and computes step c again with the values every worker
    had for it: here BSP pieces hold them until c is applied, and after that a pull reply's snapshot
    of them is kept (`keep`). Its push of c then comes again and is refused here as a repeat
    (`bad_clock`). ASP and SSP pieces answer as they are (their push of c is applied once, here).
    Without the kept values (compressed pulls, or a backup promoted since) the answer says
    `inexact`; the worker warns that the run is then not bit for bit."""
    gate = server.joined_gate(src)
    clock = header.get("clock")
    if not whole(clock) or clock + 1 != gate.pushed[src]:
        raise WireError("bad_clock", f"worker {src} pulled the values before clock {clock} after {gate.pushed[src]}")
    applied = gate.has_bsp and gate.bsp_done > clock  # BSP pieces have moved past the clock asked for
    kept = server.kept.get(clock) if applied else None
    held = kept or [None] * len(server.pieces)
    values = [p.param if t is None else t for p, t in zip(server.pieces.values(), held, strict=True)]
    reply = {"op": PARAMS, "clock": clock, "applied": server.applied, "re": header["seq"], "previous": True}
    if applied and kept is None:
        reply["inexact"] = True
    server.send(ident, reply, values)


def keep(server: Server, clock: int, snapshot: list[torch.Tensor]) -> None:
    """Hold a pull reply's snapshot of the BSP pieces at `clock` (= `bsp_done`) for `answer_previous`.

    Free in time (the reply made it anyway); in memory, up to two copies of the BSP values: the
    clock before the last applied one may be asked for, and the current one will be once applied."""
    server.kept = {c: v for c, v in server.kept.items() if c >= clock - 1}
    server.kept[clock] = [
        t if p.mode.kind == "bsp" else None for p, t in zip(server.pieces.values(), snapshot, strict=True)
    ]


def answer_ready(server: Server) -> None:
    """Answer every pull and state request the consistency rule now allows (a primary's; a backup makes
    only compressed answers, which move its copies of the pull encoder)."""
    gate = server.gate
    if gate is None:
        return
    waiting, ready = [], []
    for read in server.pending:
        if read.reply == STATE:
            # A cut: every worker has pushed `clock` times and all of it is applied.
            if gate.slowest < read.clock or (gate.has_bsp and gate.bsp_done < read.clock):
                waiting.append(read)
            else:
                server_state.send_state(server, read.ident, read.clock, read.seq)
                if server.pulls is not None:
                    server.pulls.hold_exact(read.worker)  # it installs these values whole
            continue
        if not gate.ready(read.clock):
            waiting.append(read)
            continue
        gate.answered(read.clock)
        server.read_applied[read.worker] = server.applied
        header = {
            "op": PARAMS,
            "clock": read.clock,
            "applied": server.applied,
            "staleness": server.staleness.get(read.worker, 0.0),
            "re": read.seq,
        }
        if isinstance(server.link, PrimaryLink):  # what the backup holds: an ASP answer does not wait for it
            header["safe"] = server.link.safe.get(read.ident, 0)
        ready.append(Ready(read.ident, read.worker, header, read.exact))
    server.pending = waiting
    if ready:
        if server.role != PRIMARY and server.pulls is None:
            return  # a backup's replies go nowhere (compressed ones are made: they move its copies)
        at_once = server.pulls is None and gate.never_waits  # replication.py: why ASP's answers may
        # One MAC pass per distinct reply (`pull_codec.replies`): in BSP, one for all workers.
        for tensors, group in replies(server.pulls, server.pieces.values(), ready):
            if server.role != PRIMARY:
                continue
            if server.pulls is None and gate.has_bsp and gate.bsp_done not in server.kept:
                keep(server, gate.bsp_done, tensors)
            messages = server.codec.encode_many([h for _, h in group], tensors)
            for (ident, _), frames in zip(group, messages, strict=True):
                server.out([ident, *frames], fresh=server.pulls is None, at_once=at_once)  # uncompressed: a snapshot
