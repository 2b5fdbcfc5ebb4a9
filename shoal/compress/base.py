"""The one compressor interface, shared by DP comm hooks and parameter-server pushes.

A compressor turns one gradient into a `Payload`: a small header of plain
scalars, strings and lists (msgpack-able, never pickled) plus raw tensors, and
turns a payload back into a dense tensor. Two rules make it usable on both
paths:

- `decode` is stateless: it needs only the payload, the shape and the dtype,
  so a server (or another rank) can decode any worker's message.
- All state lives in the encoder and is keyed by parameter name: error
  feedback residuals, warm-start factors, step counters and the random
  generator. `state_dict()` returns it as tensors so a checkpoint restores it
  exactly and a resumed run takes the same steps as an uninterrupted one.

Headers carry only what the shape and the spec determine, plus flags (e.g.
`nonfinite`); everything data dependent is a tensor. So two ranks that encode
same-shaped gradients produce payloads of the same layout, which is what lets
the DP hook exchange them as flat byte buffers of equal size.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from shoal.finite import all_finite
from shoal.state import sub_state, with_prefix

NONFINITE = "nonfinite"
"""Header flag of a payload whose values are not all finite: whoever applies it skips the step."""
RESIDUAL = "residual/"
VELOCITY = "velocity/"


@dataclass
class Payload:
    """What goes on the wire for one gradient: a msgpack-able header plus raw tensors."""

    header: dict = field(default_factory=dict)
    tensors: list[torch.Tensor] = field(default_factory=list)

    @property
    def nonfinite(self) -> bool:
        """Whether the encoder flagged the payload as holding an inf or NaN."""
        return bool(self.header.get(NONFINITE))

    def nbytes(self) -> int:
        """Bytes of the tensor buffers (the header is a few bytes and shape-determined)."""
        return sum(t.numel() * t.element_size() for t in self.tensors)


class Compressor:
    """Base class: subclasses set `family` and implement `encode`/`decode`.

    `allreduce_safe` says whether the sum over ranks of the payload tensors,
    decoded once, equals the sum of the ranks' decoded gradients. That holds
    for casts and for random-k with a shared mask (same indices everywhere);
    it does not hold for quantized codes with per-rank scales or for top-k with
    per-rank indices, which must be decoded one by one (the DP hook reduces
    the former in two phases and all-gathers the latter; see `ddp_hooks`).
    """

    family: str = ""
    """The spec's family name ("topk", ...); a class default that one class may set per instance."""
    allreduce_safe: ClassVar[bool] = False
    varying_header: ClassVar[tuple[str, ...]] = ()
    """Header keys whose values are not fixed by the shape (checked by `check_payload`)."""
    momentum: float = 0.0
    """SGD's momentum, applied here before sparsifying (`ErrorFeedback`; set by a strategy); 0: none."""

    def __init__(self, spec: str):
        self.spec = spec

    # ------------------------------------------------------------- interface
    def encode(self, key: str, grad: torch.Tensor) -> Payload:
        raise NotImplementedError

    def decode(self, payload: Payload, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def decode_add(self, payload: Payload, out: torch.Tensor) -> None:
        """out += decode(payload, out.shape, out.dtype): for a receiver that sums several
        ranks' payloads; a sparse payload adds only its own elements, with no dense copy."""
        out += self.decode(payload, out.shape, out.dtype)

    def check_payload(self, payload: Payload, shape: Sequence[int]) -> None:
        """Raise ValueError if a received payload of the right layout still could not
        have come from `encode` (e.g. an index out of range): what a receiver that
        decodes other processes' messages must refuse before `decode`."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        pass

    def reseed(self, seed: int) -> None:
        """Choose this worker's random stream (ranks use different seeds so that
        their stochastic-rounding noise is independent and averages out)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


class ErrorFeedback(Compressor):
    """A compressor that keeps, per key, what it has not yet sent.

    Each `encode(key, g)` compresses `g + residual[key]` and stores the part
    the decoded payload misses as the new residual. So, summed over steps,
    sent + residual == sum of the gradients (of the momentum-corrected
    updates u when `momentum` is set): nothing is dropped, only delayed
    (Seide et al. 2014; Karimireddy et al. 2019 "EF-SGD").
    """

    def __init__(self, spec: str):
        super().__init__(spec)
        self.residuals: dict[str, torch.Tensor] = {}
        # Momentum correction (Lin et al. 2018, "Deep Gradient Compression"):
        # with momentum > 0 (set by a strategy that then steps the optimizer
        # without its own momentum) each key keeps a local velocity
        # u = momentum * u + g, and the residual accumulates u instead of g.
        # Momentum factor masking clears u where a value was sent.
        self.momentum = 0.0
        self.velocities: dict[str, torch.Tensor] = {}

    def _accumulate(self, key: str, grad: torch.Tensor) -> torch.Tensor:
        """A new flat tensor: grad (plus momentum x velocity, with momentum) plus residual."""
        acc = grad.detach().reshape(-1)
        if self.momentum:
            velocity = self.velocities.get(key)
            if velocity is not None and velocity.shape == acc.shape:
                # u = momentum * u + g in u's own memory (loaded checkpoints arrive on the CPU)
                velocity = velocity.to(acc.device, acc.dtype).mul_(self.momentum).add_(acc)
            else:
                velocity = acc.clone()
            self.velocities[key] = velocity
            acc = velocity
        residual = self.residuals.get(key)
        if residual is None or residual.shape != acc.shape:
            return acc.clone()
        # The residual's own memory, reused: it is replaced at the end of the encode, and a
        # new tensor of millions of elements costs more than the sum (page faults). The
        # sum is commutative, so this is the same grad (or u) + residual.
        residual = residual.to(acc.device, acc.dtype)
        return residual.add_(acc) if residual is self.residuals[key] else acc + residual

    def _remember(self, key: str, acc: torch.Tensor, sent: torch.Tensor) -> None:
        """Keep acc - sent as the residual; `sent`, unless it is `acc`, is the caller's
        scratch, whose memory becomes the residual (-sent + acc is acc - sent exactly)."""
        if self.momentum and key in self.velocities:
            self.velocities[key][sent != 0] = 0  # momentum factor masking, before `sent` is reused
        residual = acc - sent if sent is acc else sent.neg_().add_(acc)
        if not all_finite(residual):
            # The step that produced this is skipped as a whole (see the DP
            # strategy); a NaN kept here would poison every later step.
            residual = torch.zeros_like(residual)
            if key in self.velocities:
                self.velocities[key].zero_()
        self.residuals[key] = residual

    def _remember_sparse(self, key: str, acc: torch.Tensor, index: torch.Tensor, sent: torch.Tensor) -> None:
        """`_remember` for a payload that is `sent` at the distinct positions `index` and zero
        elsewhere, without a dense copy: `acc` itself becomes the residual (the same values:
        x - 0 is x, even for -0.0 and NaN)."""
        acc[index] -= sent
        if not all_finite(acc):
            acc.zero_()  # as in `_remember`
            if key in self.velocities:
                self.velocities[key].zero_()
        self.residuals[key] = acc
        if self.momentum and key in self.velocities:
            self.velocities[key][index[sent != 0]] = 0  # momentum factor masking

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = with_prefix({k: v.clone() for k, v in self.residuals.items()}, RESIDUAL)
        state.update(with_prefix({k: v.clone() for k, v in self.velocities.items()}, VELOCITY))
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.residuals = {k: v.clone() for k, v in sub_state(state, RESIDUAL).items()}
        self.velocities = {k: v.clone() for k, v in sub_state(state, VELOCITY).items()}


class Receiver:
    """Checks and decodes payloads from other processes (a parameter server's pushes).

    A payload's layout (header apart from flags and `varying_header`, the
    tensors' dtypes and shapes) is fixed by the spec, the shape and the dtype,
    so the receiver learns it once per shape by encoding zeros with a fresh
    compressor, and refuses anything else with ValueError before decoding,
    as well as an unflagged payload that decodes to inf or NaN.
    """

    def __init__(self, spec: str):
        from shoal.compress import parse

        self.spec = spec
        self.compressor = parse(spec)
        self._layouts: dict[tuple, tuple[dict, list]] = {}

    def layout(self, shape: Sequence[int], dtype: torch.dtype) -> tuple[dict, list[tuple[torch.dtype, tuple]]]:
        key = (tuple(shape), dtype)
        if key not in self._layouts:
            from shoal.compress import parse

            probe = parse(self.spec).encode("probe", torch.zeros(tuple(shape), dtype=dtype))
            self._layouts[key] = (self._fixed(probe.header), [(t.dtype, tuple(t.shape)) for t in probe.tensors])
        return self._layouts[key]

    def _fixed(self, header: dict) -> dict:
        return {k: v for k, v in header.items() if k != NONFINITE and k not in self.compressor.varying_header}

    def decode(
        self, header: object, tensors: list[torch.Tensor], shape: Sequence[int], dtype: torch.dtype
    ) -> torch.Tensor:
        want_header, want = self.layout(shape, dtype)
        if not isinstance(header, dict) or self._fixed(header) != want_header:
            raise ValueError("payload header does not match the compressor")
        if NONFINITE in header:
            raise ValueError("a non-finite payload is never applied; its sender skips the step instead")
        if [(t.dtype, tuple(t.shape)) for t in tensors] != want:
            raise ValueError("payload tensors do not match the compressor's layout")
        payload = Payload(dict(header), list(tensors))
        self.compressor.check_payload(payload, tuple(shape))
        grad = self.compressor.decode(payload, tuple(shape), dtype)
        # An encoder flags every non-finite payload, so one that decodes to inf or NaN
        # without the flag was forged or corrupted; applied, it would poison the parameters.
        if not all_finite(grad):
            raise ValueError("payload decodes to non-finite values but is not flagged non-finite")
        return grad


def numel_of(shape: Sequence[int]) -> int:
    return math.prod(tuple(shape))


def value_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute codes in: float64 stays float64, the rest use float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack_state(state: dict[str, torch.Tensor]) -> dict[str, dict]:
    """Tensors as JSON-able dicts (dtype, shape, base64 of the raw bytes), so a
    compressor's state can ride in the trainer's per-rank JSON checkpoint file
    exactly, without pickle."""
    out = {}
    for key, t in state.items():
        t = t.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        out[key] = {
            "dtype": str(t.dtype).removeprefix("torch."),
            "shape": list(t.shape),
            "b64": base64.b64encode(raw).decode("ascii"),
        }
    return out


def unpack_state(packed: dict[str, dict]) -> dict[str, torch.Tensor]:
    out = {}
    for key, item in packed.items():
        dtype = getattr(torch, item["dtype"])
        raw = bytearray(base64.b64decode(item["b64"]))
        flat = torch.frombuffer(raw, dtype=torch.uint8).view(dtype) if raw else torch.empty(0, dtype=dtype)
        out[key] = flat.reshape(item["shape"]).clone()
    return out
