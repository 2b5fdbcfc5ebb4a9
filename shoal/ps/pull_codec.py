"""Compressed pulls: servers send each worker the change of the parameters since
what that worker holds, compressed with the push compressors, with error
feedback on the server (as BytePS compresses both directions).

Why deltas and a record per worker: parameters are values, not gradients, so
compressing them directly loses what was not sent for good. The server
instead keeps, for each worker, a copy of what that worker holds of its
pieces (a `Held`). A pull is answered with, per piece,
`payload = compress(current - held)`, and the record advances by exactly
`decode(payload)`, the tensor the worker adds to its parameters. What was
not sent stays in `current - held` and goes out with a later pull: error
feedback without a residual buffer, and nothing drifts, because both sides
add the same decoded tensor (every decoder is elementwise or a fixed-order
sum, so it gives the same bits in every process; see
`shoal.compress.lowrank.low_rank_product`).

Consistency modes: under ASP/SSP each worker reads at its own time, so each
has its own record. Workers that hold the same copy and pull while the
pieces are unchanged (every worker of a BSP clock) get the same payload,
encoded once, and move to the same next copy: under BSP all workers hold
identical parameters after every step, and the server keeps one copy.

Exact replies (whole values, no compression): the join, a checkpoint read
(`STATE`), a pull that asks for it (`refresh()`, evaluation) and the first
pull after a restore (whose values the server cannot know the workers
hold). A piece whose compressed delta is not finite (an fp16 overflow) is
also sent whole.

Memory: each distinct copy costs as much as the pieces the server holds.
Under BSP that is one copy (two while a clock's replies go out); under
ASP/SSP up to one per worker, plus one cached successor per copy while
another worker may still take it (at most 2W copies in all: a copy nobody holds
keeps no successor).
`PullEncoder.memory()` counts them; the server reports it in `stats`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple

import torch

from shoal.compress import parse
from shoal.compress.base import ErrorFeedback, Receiver
from shoal.errors import ShoalError
from shoal.finite import all_finite
from shoal.ps.pieces import PieceState

WHOLE = None
"""The code of a piece sent as its whole value (the message's tensor is the value)."""


class Reply(NamedTuple):
    """What one pull reply carries: per piece its payload header (None: whole value), and the tensors.

    `codes` is None when every piece goes whole (an exact reply, as the join's)."""

    codes: list[dict | None] | None
    tensors: list[torch.Tensor]


class Held:
    """What some workers hold of the server's pieces: one flat tensor per piece, never changed in place
    (a reply may send them without a copy), and the reply that leads from here to the next copy."""

    __slots__ = ("after", "holders", "values")

    def __init__(self, values: list[torch.Tensor]):
        self.values = values
        self.holders = 0
        self.after: tuple[tuple[int, ...], Reply, Held] | None = None
        """(the pieces' versions it was encoded at, the reply, the copy a worker holds after it)."""

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.values)


class PullEncoder:
    """The server's side: a record per worker, and the pull replies that advance it."""

    def __init__(self, spec: str, pieces: Sequence[PieceState], workers: int):
        """Made when the server starts, as it sends every worker the pieces' values whole."""
        self.spec = spec
        self.compressor = parse(spec)  # used without its own residuals: `current - held` is the residual
        self.pieces = list(pieces)
        self.held: list[Held | None] = [None] * workers
        self.exact: tuple[tuple[int, ...], Held] | None = None
        for w in range(workers):
            self.hold_exact(w)
        self.encodes = 0
        """Delta replies encoded (under BSP one per clock, shared by all workers)."""
        self.whole = 0
        """Pieces sent whole because their compressed delta was not finite."""

    def version(self) -> tuple[int, ...]:
        """Changes whenever any piece's values change (torch counts every in-place write)."""
        return tuple(p.param._version for p in self.pieces)

    def reply(self, worker: int, exact: bool = False) -> Reply:
        """The reply to `worker`'s pull; its record moves to what it will hold after applying it."""
        held, version = self.held[worker], self.version()
        if held is None or exact:
            return Reply(None, self._hold_exact(worker, version).values)
        if held.after is None or held.after[0] != version:
            held.after = (version, *self._encode(held))
            self.encodes += 1
        _, reply, after = held.after
        self._move(worker, after)
        return reply

    def hold_exact(self, worker: int) -> None:
        """`worker` was sent the current values whole (the join, a checkpoint read)."""
        self._hold_exact(worker, self.version())

    def replaced(self, worker: int) -> None:
        """`worker`'s process was replaced (a rejoin): what it holds is unknown, its next reply is exact."""
        self._move(worker, None)

    def forget(self) -> None:
        """The values were replaced (a restore): what workers hold is unknown, their next reply is exact."""
        for w in range(len(self.held)):
            self._move(w, None)
        self.exact = None

    def memory(self) -> tuple[int, int]:
        """(distinct copies kept, their bytes): what compressed pulls cost this server."""
        seen: dict[int, Held] = {}
        for held in [*self.held, self.exact[1] if self.exact else None]:
            while held is not None and id(held) not in seen:
                seen[id(held)] = held
                held = held.after[2] if held.after else None
        return len(seen), sum(h.nbytes() for h in seen.values())

    def _hold_exact(self, worker: int, version: tuple[int, ...]) -> Held:
        if self.exact is None or self.exact[0] != version:  # workers read at one version share the copy
            self.exact = (version, Held([p.param.detach().clone() for p in self.pieces]))
        held = self.exact[1]
        self._move(worker, held)
        return held

    def _move(self, worker: int, to: Held | None) -> None:
        old = self.held[worker]
        if old is to:
            return
        if to is not None:
            to.holders += 1
        self.held[worker] = to
        if old is not None:
            old.holders -= 1
            if old.holders == 0:
                # Nobody holds it: a worker can reach it again only through a predecessor's cached
                # reply, and then pulls afresh, so its own successor need not be kept (this bounds
                # memory when a slow worker sits on an old copy under ASP).
                old.after = None
                if self.exact is not None and self.exact[1] is old:
                    self.exact = None

    def _encode(self, held: Held) -> tuple[Reply, Held]:
        codes: list[dict | None] = []
        tensors: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        for piece, old in zip(self.pieces, held.values, strict=True):
            current = piece.param.detach()
            payload = self.compressor.encode(piece.key, (current - old).view(piece.code_shape))
            if isinstance(self.compressor, ErrorFeedback):
                self.compressor.residuals.pop(piece.key, None)
            step = None
            if not payload.nonfinite:
                step = self.compressor.decode(payload, piece.code_shape, current.dtype).reshape(-1)
            if step is None or not all_finite(step):  # e.g. a delta beyond fp16's range: send the value
                self.whole += 1
                whole = current.clone()
                codes.append(WHOLE)
                tensors.append(whole)
                values.append(whole)
                continue
            codes.append(payload.header)
            tensors += payload.tensors
            values.append(old + step)
        return Reply(codes, tensors), Held(values)


def pull_encoder(spec: object, pieces: Sequence[PieceState], workers: int) -> PullEncoder | None:
    """The encoder for the spec worker 0's init names, None for "none"; ValueError (or
    ConfigError) if it is not a valid spec."""
    if not isinstance(spec, str):
        raise ValueError(f"pull_compression {spec!r} is not a spec")
    return None if spec == "none" else PullEncoder(spec, pieces, workers)


class Ready(NamedTuple):
    """A pull the consistency rule allows now: who asked, the reply header, whether it wants exact values."""

    ident: bytes
    worker: int
    header: dict
    exact: bool


def replies(
    pulls: PullEncoder | None, pieces: Iterable[PieceState], ready: list[Ready]
) -> list[tuple[list[torch.Tensor], list[tuple[bytes, dict]]]]:
    """The pulls answered now, grouped by the tensors they carry (one wire encoding per group).

    Without pull compression every reply carries one snapshot of the values (the optimizer
    changes them in place later); with it, workers sharing a copy share a reply."""
    if pulls is None:
        snapshot = [p.param.clone() for p in pieces]
        return [(snapshot, [(r.ident, r.header) for r in ready])]
    groups: dict[int, tuple[list[torch.Tensor], list[tuple[bytes, dict]]]] = {}
    for r in ready:
        reply = pulls.reply(r.worker, r.exact)
        header = r.header if reply.codes is None else {**r.header, "codes": reply.codes}
        groups.setdefault(id(reply.tensors), (reply.tensors, []))[1].append((r.ident, header))
    return list(groups.values())


def pull_stats(pulls: PullEncoder | None) -> dict[str, int]:
    """The server's `stats` figures on compressed pulls (zeros without them)."""
    copies, nbytes = pulls.memory() if pulls is not None else (0, 0)
    return {
        "pull_copies": copies,
        "pull_copy_bytes": nbytes,
        "pull_encodes": pulls.encodes if pulls is not None else 0,
        "pull_whole": pulls.whole if pulls is not None else 0,
    }


class PullDecoder:
    """The worker's side: puts a server's reply into the parameters, checking it against the layout."""

    def __init__(self, spec: str):
        self.receiver = Receiver(spec) if spec != "none" else None

    @torch.no_grad()
    def install(
        self, server: int, header: dict, tensors: list[torch.Tensor], slices: Sequence, shapes: Sequence
    ) -> None:
        """`slices` are the server's `layout.Slice`s (flat views into the parameters), `shapes`
        their compression shapes. A whole value replaces the slice; a delta is added to it."""
        codes = header.get("codes")
        if codes is None:
            if len(tensors) != len(slices):
                raise ShoalError(
                    f"parameter server {server} sent {len(tensors)} pieces, "
                    f"expected {len(slices)}; were the servers restarted?"
                )
            for held, value in zip(slices, tensors, strict=True):
                held.flat(held.param).copy_(value)
            return
        if self.receiver is None:
            raise ShoalError(
                f"parameter server {server} sent compressed parameters this worker did not ask for "
                "(every worker and server must use the same pull_compression)"
            )
        if not isinstance(codes, list) or len(codes) != len(slices):
            raise ShoalError(
                f"parameter server {server} sent codes for {len(codes) if isinstance(codes, list) else codes!r} "
                f"pieces, expected {len(slices)}; were the servers restarted?"
            )
        at = 0
        for held, shape, code in zip(slices, shapes, codes, strict=True):
            target = held.flat(held.param)
            if code is WHOLE:
                if at >= len(tensors) or tensors[at].shape != target.shape or tensors[at].dtype != target.dtype:
                    raise ShoalError(f"parameter server {server} sent a bad whole value for {held.key}")
                target.copy_(tensors[at])
                at += 1
                continue
            count = len(self.receiver.layout(shape, target.dtype)[1])
            try:
                step = self.receiver.decode(code, tensors[at : at + count], shape, target.dtype)
            except (ValueError, TypeError, IndexError, RuntimeError) as exc:
                raise ShoalError(f"parameter server {server} sent a bad compressed pull of {held.key}: {exc}") from None
            at += count
            target.add_(step.reshape(-1).to(target.device))
        if at != len(tensors):
            raise ShoalError(f"parameter server {server} sent {len(tensors)} tensors, the codes name {at}")
