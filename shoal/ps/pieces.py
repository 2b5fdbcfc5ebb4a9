"""What a parameter server holds per piece, and the checks a push passes against it.

A `PieceState` is the live side of a `shoal.ps.placement.Piece`: its values,
its optimizer, its consistency mode and the layout its gradients arrive in.
The checks here need nothing but the pieces: a push names pieces this server
holds, exactly once each, and carries for each a gradient of the piece's
dtype and shape (or a compressed payload that the `Receiver` accepts); any
other push is refused with a `WireError` before anything changes.
"""

from __future__ import annotations

import math

import torch

from shoal.comm.wire import WireError
from shoal.compress.base import Receiver
from shoal.finite import all_finite
from shoal.ps import optim
from shoal.ps.consistency import KINDS, Mode


class PieceState:
    __slots__ = ("code_count", "code_shape", "group", "key", "mode", "opt", "param", "steps")

    def __init__(self, key: str, param: torch.Tensor, opt: torch.optim.Optimizer, mode: Mode, group: int):
        self.key, self.param, self.opt, self.mode, self.group = key, param, opt, mode, group
        self.steps = 0  # optimizer steps applied
        self.code_shape: tuple[int, ...] = tuple(param.shape)  # the shape gradients are compressed in
        self.code_count = 1  # payload tensors per push of this piece

    def apply(self, grad: torch.Tensor, hp: dict) -> None:
        """One optimizer step with `grad`, under the param group's current hyperparameters."""
        self.opt.param_groups[0].update(hp)
        self.param.grad = grad
        self.opt.step()
        self.param.grad = None
        self.steps += 1


FLOAT_DTYPES = ("float32", "float64", "float16", "bfloat16")
MAX_STALENESS = 1 << 31
MAX_DIMS = 8


def _whole(v: object, low: int = 0, high: int = 1 << 62) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and low <= v < high


def build_piece(
    key_spec: object,
    value: torch.Tensor,
    code_shape: object,
    optim_name: str,
    hp: list[dict],
    receiver: Receiver | None,
) -> PieceState:
    """One piece from worker 0's description and initial value; ValueError if the
    description is malformed (every field's type and range) or disagrees with the value."""
    if not (isinstance(key_spec, list) and len(key_spec) == 6):
        raise ValueError("a key is [name, dtype, shape, mode, staleness, group]")
    key, dtype, shape, kind, staleness, group = key_spec
    if not (isinstance(key, str) and key):
        raise ValueError(f"a piece's name must be a string, not {key!r}")
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{key}: the servers train {', '.join(FLOAT_DTYPES)} pieces, not {dtype!r}")
    if [str(value.dtype).removeprefix("torch."), list(value.shape)] != [dtype, shape]:
        raise ValueError(f"initial value of {key} has the wrong shape")
    if kind not in KINDS or not _whole(staleness, 0, MAX_STALENESS):
        raise ValueError(f"{key}: mode {kind!r} with staleness {staleness!r} (bsp, asp or ssp; 0 <= staleness < 2^31)")
    if not _whole(group, 0, len(hp)):
        raise ValueError(f"{key}: param group {group!r} does not exist ({len(hp)} groups)")
    if not (isinstance(code_shape, list) and len(code_shape) <= MAX_DIMS and all(_whole(d) for d in code_shape)):
        raise ValueError(f"{key}: code shape {code_shape!r} is not a list of sizes")
    param = value.clone()
    piece = PieceState(key, param, optim.build(optim_name, param, hp[group]), Mode(kind, staleness), group)
    piece.code_shape = tuple(code_shape)
    if math.prod(piece.code_shape) != param.numel():
        raise ValueError(f"code shape of {key} does not hold its elements")
    if receiver is not None:
        piece.code_count = len(receiver.layout(piece.code_shape, param.dtype)[1])
    return piece


def pushed_pieces(
    held: dict[str, PieceState], keys: object, skip: object, tensors: list[torch.Tensor]
) -> list[PieceState]:
    """The pieces a push names; WireError if the list is malformed or names a piece not `held`."""
    if (
        not isinstance(keys, list)
        or len(set(map(str, keys))) != len(keys)
        or not isinstance(skip, bool)
        or (skip and (keys or tensors))
    ):
        raise WireError("malformed", "bad keys or skip flag")
    pieces = []
    for key in keys:
        piece = held.get(key) if isinstance(key, str) else None
        if piece is None:
            raise WireError("unknown_key")
        pieces.append(piece)
    return pieces


def received_gradients(
    pieces: list[PieceState], codes: object, tensors: list[torch.Tensor], receiver: Receiver | None
) -> list[torch.Tensor]:
    """The pushed gradients, checked (and decoded when compressed); WireError if any is wrong."""
    if receiver is None:
        if codes is not None or len(tensors) != len(pieces):
            raise WireError("malformed", "keys do not match tensors")
        for piece, grad in zip(pieces, tensors, strict=True):
            if grad.dtype != piece.param.dtype or grad.shape != piece.param.shape:
                raise WireError("bad_shape", f"{piece.key}: {grad.dtype}{list(grad.shape)}")
        return list(tensors)
    if not isinstance(codes, list) or len(codes) != len(pieces) or len(tensors) != sum(p.code_count for p in pieces):
        raise WireError("malformed", "codes do not match keys and tensors")
    grads, at = [], 0
    for piece, code in zip(pieces, codes, strict=True):
        part = tensors[at : at + piece.code_count]
        at += piece.code_count
        try:
            grads.append(receiver.decode(code, part, piece.code_shape, piece.param.dtype).reshape(-1))
        except (ValueError, TypeError, IndexError, RuntimeError) as exc:
            raise WireError("bad_payload", f"{piece.key}: {exc}") from None
    return grads


def all_gradients_finite(grads: list[torch.Tensor]) -> bool:
    """Whether no gradient holds an inf or NaN (what an uncompressed push is checked for)."""
    return all(all_finite(g) for g in grads)
