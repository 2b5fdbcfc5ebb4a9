"""A parameter server's start: once every worker joined, worker 0's description of the model
and optimizer becomes the pieces this replica holds.

Everything in the description is checked (types, ranges, the optimizer's
hyperparameters, the limits the workers and the server set) before a piece is
built; a description that fails stops the job with one sentence, sent to
every worker, instead of a server holding half a model.
"""

from __future__ import annotations

import math
import resource
from typing import TYPE_CHECKING

from shoal import env
from shoal.compress.base import Receiver
from shoal.errors import ShoalError
from shoal.ps import optim
from shoal.ps.consistency import Gate
from shoal.ps.pieces import build_piece
from shoal.ps.protocol import ERROR, PARAMS
from shoal.ps.pull_codec import pull_encoder

if TYPE_CHECKING:
    from shoal.ps.server import Server

MAX_GROUPS = 1 << 12
"""The most param groups a description may list."""
SPARE_FILES = 64
"""Open files a server process needs besides one connection per worker (libraries, links, the store)."""


def positive_seconds(value: object, what: str) -> float:
    """`value` as a finite number of seconds > 0; ValueError naming `what` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what} must be a finite number of seconds > 0, not {value!r}")
    return float(value)


def positive_bytes(value: object, what: str) -> int:
    """`value` as a whole number of bytes >= 1; ValueError naming `what` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1 << 62:
        raise ValueError(f"{what} must be a whole number of bytes >= 1, not {value!r}")
    return value


def world_fits(server: Server, ident: bytes, world: int) -> bool:
    """Whether `world` workers' connections fit the server process's open files (capped by
    `shoal.ps.process.cap_connections`); if not, the job stops in one sentence naming the fix."""
    files = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if world + SPARE_FILES <= files:
        return True
    message = (
        f"{world} workers need about {world + SPARE_FILES} connections to parameter server {server.index}, "
        f"over its limit of {files} open files; raise {env.PS_MAX_CONNECTIONS} (and `ulimit -n` if lower)"
    )
    server.members.send(ident, {"op": ERROR, "message": message})
    server.fail(message)
    return False


def code_shapes(spec: dict) -> list:
    """The shape each key's gradients are compressed in (its own shape unless the description says);
    ValueError unless there is one per key."""
    keys = spec["keys"]
    shapes = spec.get("code_shapes") or [k[2] if isinstance(k, list) and len(k) == 6 else 0 for k in keys]
    if not isinstance(shapes, list) or len(shapes) != len(keys):
        raise ValueError("one code shape per key")
    return shapes


def start(server: Server, workers: int) -> None:
    """Every worker joined: check worker 0's description against the others' and the limits, build the
    pieces, and answer every join with the initial values; a bad description stops the job in one sentence."""
    spec = server.joined[0][1]
    for w, (_, other) in server.joined.items():
        if other != spec:
            return server.fail(
                f"worker {w}'s model or optimizer differs from worker 0's (every worker must build the same model)"
            )
    try:
        name = spec.get("optim")
        if not isinstance(name, str) or name not in optim.ELEMENTWISE:
            raise ValueError(f"optimizer {name!r} is not one of {', '.join(optim.ELEMENTWISE)}")
        server.optim_name = name
        groups = spec.get("groups")
        if not isinstance(groups, list) or not 1 <= len(groups) <= MAX_GROUPS:
            raise ValueError("groups must list every param group's hyperparameters")
        server.hp = [optim.check_hyperparameters(server.optim_name, hp) for hp in groups]
        server.flags = [optim.flags(server.optim_name, hp) for hp in server.hp]
        server.timeout_s = positive_seconds(spec.get("timeout_s", server.timeout_s), "timeout_s")
        max_bytes = positive_bytes(spec.get("max_bytes", server.ceiling), "max_bytes")
        keys = spec.get("keys")
        if not isinstance(keys, list) or len(keys) != len(server.initial):
            raise ValueError("worker 0 sent no initial values")
        compression = spec.get("compression", "none")
        if not isinstance(compression, str):
            raise ValueError(f"compression {compression!r} is not a spec")
        if compression != "none":
            server.receiver = Receiver(compression)
        for key_spec, value, code_shape in zip(keys, server.initial, code_shapes(spec), strict=True):
            piece = build_piece(key_spec, value, code_shape, server.optim_name, server.hp, server.receiver)
            if piece.key in server.pieces:
                raise ValueError(f"piece {piece.key} is named twice")
            server.pieces[piece.key] = piece
        server.pulls = pull_encoder(spec.get("pull_compression", "none"), list(server.pieces.values()), workers)
    except (KeyError, TypeError, ValueError, RuntimeError, ShoalError) as exc:  # ShoalError: bad compression
        return server.fail(f"bad initial message from worker 0: {exc}")
    if max_bytes > server.ceiling:
        return server.fail(
            f"the workers' max_message_mb ({max_bytes / (1 << 20):g}) is above parameter server {server.index}'s "
            f"limit of {server.ceiling / (1 << 20):g} MB; lower max_message_mb or raise {env.PS_MAX_BYTES} "
            "before the launcher starts the servers"
        )
    held = sum(p.param.numel() * p.param.element_size() for p in server.pieces.values())
    if held > max_bytes:
        return server.fail(
            f"parameter server {server.index} holds {held / (1 << 20):.1f} MB of parameters, more than one "
            f"message may carry (max_message_mb = {max_bytes / (1 << 20):g}); "
            "raise max_message_mb or start more servers"
        )
    server.codec.max_bytes = max_bytes
    server.order = list(server.pieces)
    server.gate = Gate(workers, [p.mode for p in server.pieces.values()])
    server.async_keys = any(p.mode.kind != "bsp" for p in server.pieces.values())
    announce(server, workers)
    for w, (ident, _) in server.joined.items():
        server.read_applied[w] = 0
        header = {"op": PARAMS, "clock": 0, "applied": 0, "re": server.init_seq.get(w, 0)}
        server.send(ident, header, [p.param for p in server.pieces.values()])


def announce(server: Server, workers: int) -> None:
    """One event line for the launcher's log: what this server holds."""
    if not server.events:
        return
    nbytes = sum(p.param.numel() * p.param.element_size() for p in server.pieces.values())
    modes = "/".join(sorted({str(p.mode) for p in server.pieces.values()}))
    server.events.publish(
        "event",
        {
            "message": f"server {server.index}: {len(server.pieces)} pieces, {nbytes / 1e6:.2f} MB, "
            f"{server.optim_name}, {modes}, {workers} workers"
        },
    )
