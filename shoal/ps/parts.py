"""A clock's push in several messages: parts sent during backward, then the last one at step().

A worker that overlaps (`shoal.strategies.parameter_server.overlap`) sends
each bucket of gradients as soon as backward produced it, as a PUSH with
`"part": true`, and at `optimizer.step()` a last PUSH with the rest, the
hyperparameters and `"parts": n`, the number of parts before it. Each part
passes every check a push passes (MAC, sender, sequence number, clock,
known keys, dtype and shape) when it arrives, so the server does that work
while the worker still runs backward; finiteness is checked then too. The
server keeps the checked tensors (views of the received frames, no copy)
here, per worker, and nothing counts until the last message: only then is
the clock's push applied, with the parts' pieces and its own as one push.
So a backward that is never followed by `step()` (a worker that stops, or
evaluates and closes) changes nothing on the server. A part that names a
piece this clock already holds, a last message whose count of parts
differs from what arrived, or a part for another clock is refused with a
`WireError`, like any malformed push.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from shoal.comm.wire import WireError
from shoal.ps.pieces import PieceState, all_gradients_finite


@dataclass
class Staged:
    """One worker's parts of one clock, checked and held until its last message."""

    clock: int
    parts: int = 0
    pieces: list[PieceState] = field(default_factory=list)
    grads: list[torch.Tensor] = field(default_factory=list)
    keys: set[str] = field(default_factory=set)
    nonfinite: bool = False
    """A part held inf or NaN: the whole push is applied as a skip."""


class Parts:
    """Every worker's parts of its current clock."""

    def __init__(self) -> None:
        self.staged: dict[int, Staged] = {}

    def add(self, src: int, clock: int, pieces: list[PieceState], grads: list[torch.Tensor]) -> None:
        """Hold a checked part of worker `src`'s push for `clock`; WireError if it repeats a piece."""
        held = self.staged.get(src)
        if held is None or held.clock != clock:
            held = self.staged[src] = Staged(clock)  # parts of an earlier clock were never committed
        keys = {p.key for p in pieces}
        if keys & held.keys:
            raise WireError("malformed", f"clock {clock}: a part repeats a piece already pushed")
        held.parts += 1
        held.keys |= keys
        if held.nonfinite or not all_gradients_finite(grads):
            held.nonfinite = True
            held.pieces, held.grads = [], []
            return
        held.pieces += pieces
        held.grads += grads

    def check(self, src: int, clock: int, parts: object, pieces: list[PieceState]) -> Staged | None:
        """The parts that worker `src`'s last message for `clock` completes (None if it announces none);
        WireError if their count or pieces do not match. Changes nothing."""
        if isinstance(parts, bool) or not isinstance(parts, int) or parts < 0:
            raise WireError("malformed", f"parts must be a count, not {parts!r}")
        held = self.staged.get(src)
        if held is None or held.clock != clock:
            held = None
        arrived = held.parts if held else 0
        if arrived != parts:
            raise WireError("missing_parts", f"clock {clock}: {parts} parts announced, {arrived} arrived")
        if held is not None and {p.key for p in pieces} & held.keys:
            raise WireError("malformed", f"clock {clock}: the last message repeats a piece of a part")
        return held

    def take(self, src: int) -> None:
        """Forget worker `src`'s parts (its push was applied)."""
        self.staged.pop(src, None)
