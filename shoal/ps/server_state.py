"""A parameter server's state as a whole: the cut a checkpoint takes, the restore that puts one
back, and the read-only counters (`stats`) that tools and tests read.

A cut (`send_state`) is answered only once every worker pushed the asked
clock and all of it is applied (`shoal.ps.reads.answer_ready`), so a checkpoint is
one consistent state of every server. A restore is checked in full (every
piece named, shapes, dtypes, finite values, optimizer state that the
optimizer accepts) before anything changes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from shoal.comm.wire import WireError
from shoal.ps import optim
from shoal.ps.pieces import all_gradients_finite
from shoal.ps.protocol import RESTORED, STATE, STATS
from shoal.ps.pull_codec import pull_stats

if TYPE_CHECKING:
    from shoal.ps.server import Server


def restore(server: Server, ident: bytes, src: int, header: dict, tensors: list[torch.Tensor]) -> None:
    """Worker 0 puts back a checkpoint's values and optimizer state, before any push."""
    gate = server.joined_gate(src)
    if src != 0 or any(gate.pushed) or server.pending:
        raise WireError("bad_restore", "only worker 0 restores, and only before the first push")
    layout = header.get("state")
    if not isinstance(layout, list) or len(layout) != len(server.order):
        raise WireError("malformed", "restore must name every piece")
    staged, it = [], iter(tensors)
    try:
        for key, entry in zip(server.order, layout, strict=True):
            if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == key and isinstance(entry[1], list)):
                raise ValueError(f"expected piece {key}")
            piece = server.pieces[key]
            value = next(it)
            if value.dtype != piece.param.dtype or value.shape != piece.param.shape:
                raise ValueError(f"{key} has the wrong shape")
            if not all_gradients_finite([value]):
                raise ValueError(f"{key} holds inf or NaN")
            probe = optim.build(server.optim_name, value.clone(), server.hp[piece.group])
            optim.import_state(
                server.optim_name, probe, probe.param_groups[0]["params"][0], [(str(n), next(it)) for n in entry[1]]
            )
            staged.append((piece, value, probe))
        if next(it, None) is not None:
            raise ValueError("more tensors than the layout names")
    except (StopIteration, ValueError) as exc:
        raise WireError("malformed", f"restore: {exc}") from None
    # Checked: from here on the checkpoint is applied in full.
    for piece, value, probe in staged:
        piece.param.copy_(value)
        piece.opt.state.clear()
        piece.opt.state[piece.param] = probe.state[probe.param_groups[0]["params"][0]]
    if server.pulls is not None:
        server.pulls.forget()  # the workers' next pulls are exact
    server.kept.clear()  # snapshots of the values replaced (`reads.keep`)
    server.send(ident, {"op": RESTORED, "clock": 0, "re": header["seq"]})


def send_state(server: Server, ident: bytes, clock: int, seq: int) -> None:
    layout, tensors = [], []
    for piece in server.pieces.values():
        items = optim.export_state(piece.opt, piece.param)
        layout.append([piece.key, [k for k, _ in items]])
        tensors += [piece.param, *(t for _, t in items)]
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    if nbytes > server.codec.max_bytes:
        return server.fail(
            f"parameter server {server.index}'s checkpoint state is {nbytes / (1 << 20):.1f} MB, more than one "
            f"message may carry (max_message_mb = {server.codec.max_bytes / (1 << 20):g}); "
            "raise max_message_mb or start more servers"
        )
    server.send(ident, {"op": STATE, "clock": clock, "state": layout, "re": seq}, tensors)


def stats(server: Server) -> dict:
    gate = server.gate
    return {
        "op": STATS,
        "index": server.index,
        "keys": server.order,
        "dropped": dict(server.dropped),
        "pushed": gate.pushed if gate else [],
        "bsp_done": gate.bsp_done if gate else 0,
        "gaps": {str(k): v for k, v in sorted(gate.gaps.items())} if gate else {},
        "max_gap": gate.max_gap if gate else 0,
        "steps": {k: p.steps for k, p in server.pieces.items()},
        "applied": server.applied,
        "skipped": server.skipped,
        "nonfinite": server.nonfinite,
        "bye": sorted(server.bye),
        **server.members.stats(),
        **pull_stats(server.pulls),
    }
