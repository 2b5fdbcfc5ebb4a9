"""Stochastic quantization with a scale per block: "int8" and "qsgd:levels=N".

Each block of `BLOCK` elements is scaled by its largest magnitude m, and each
element x becomes the integer code floor(x / m * s + u) with s levels and u a
dither value in (0, 1): stochastic rounding of the signed level x / m * s,
up with probability equal to its fractional part, so the code is unbiased,
to within 2^-16 of a step (below) (Alistarh et al. 2017, "QSGD"; the max-norm
per block, as in later QSGD variants and 1-bit/8-bit optimizers, has much
lower variance than one L2 norm for the whole tensor). The variance per
element is at most m^2 / (4 s^2).

The dither is 16-bit: u = (j + 1/2) / 2^16 with j uniform in 0..2^16 - 1,
four values from each 64-bit draw of the seeded generator (half the output
of one float per element, and 5x cheaper to make; the draws dominated the
encode). A level whose fraction is f rounds up with probability
round(f 2^16) / 2^16, so |E[code] - level| <= 2^-17 of a step, plus the
float rounding of level + u: unbiased to within 2^-16 of a step, not
exactly. A level that is an integer (x = 0, or x = +-m) is encoded exactly.
Each chunk of `CHUNK` elements is encoded while it is in cache.

Codes with s <= 7 fit in 4 bits and are packed two per byte; otherwise one
byte each. The scales go in the gradient's precision class (float32, or
float64 for float64 gradients, so huge float64 values keep their range).
"int8" is s = 127: about 3.9x fewer bytes than fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shoal.compress.base import NONFINITE, Compressor, Payload, numel_of, value_dtype
from shoal.compress.seeds import counts_state, key_seed, load_counts, next_seed
from shoal.finite import all_finite

BLOCK = 256
DITHER_BITS = 16
CHUNK = 2**18
"""Elements encoded per pass, a multiple of BLOCK: about 1 MB of float32 temporaries."""
SEGMENT = 2**16
"""Elements per random stream of `Quantizer.requantize`, a multiple of BLOCK: whoever
rounds a range that starts inside a segment draws (and drops) the segment's dither
before it, so a short segment wastes little."""
SHARED_SEED = 0
"""The seed of `requantize`'s streams, the same on every rank (encode's differ per rank)."""
REDUCED = "/reduced/"
"""Infix of `requantize`'s stream keys: key + REDUCED + segment index."""


def dither(gen: torch.Generator, count: int, dtype: torch.dtype) -> torch.Tensor:
    """`count` values (j + 1/2) / 2^16, j uniform in 0..2^16 - 1, four per 64-bit draw of `gen`.
    Exact in float32 and strictly inside (0, 1), so an integer level stays that integer."""
    words = torch.empty(-(-count // 4), dtype=torch.int64).random_(-(2**63), None, generator=gen)
    u = words.view(torch.int16)[:count].to(dtype)  # j - 2^15
    return u.mul_(2.0**-DITHER_BITS).add_(0.5 + 2.0 ** -(DITHER_BITS + 1))


def blocks_of(flat: torch.Tensor) -> list[torch.Tensor]:
    """Views of `flat` as rows of one scale each: the full blocks, then the short last
    block if there is one (no padded copy); none if `flat` is empty."""
    full = flat.numel() // BLOCK * BLOCK
    rows = [flat[:full].view(-1, BLOCK)] if full else []
    return [*rows, flat[full:].view(1, -1)] if full < flat.numel() else rows


def block_max(rows: torch.Tensor) -> torch.Tensor:
    """The largest magnitude of each row, without an |x| copy of the rows (NaN if one is NaN)."""
    return torch.maximum(rows.amax(dim=1), rows.amin(dim=1).neg_()).abs_()  # abs_: -0.0 -> 0.0


class Quantizer(Compressor):
    family = "qsgd"

    def __init__(self, spec: str, levels: int, seed: int = 0, family: str = "qsgd"):
        super().__init__(spec)
        self.family = family
        self.levels = levels
        self.bits = 4 if levels <= 7 else 8
        self.seed = seed
        self.counts: dict[str, int] = {}

    def reseed(self, seed: int) -> None:
        self.seed = seed

    def encode(self, key: str, grad: torch.Tensor) -> Payload:
        work = value_dtype(grad.dtype)
        flat = grad.detach().reshape(-1).to(work)
        n = flat.numel()
        gen = torch.Generator().manual_seed(next_seed(self.seed, key, self.counts))
        code = torch.empty(n, dtype=torch.int8, device=flat.device)
        scales = [flat.new_zeros(0)]
        for at in range(0, n, CHUNK):  # a chunk at a time, so that its temporaries stay in cache
            x = flat[at : at + CHUNK]
            level = dither(gen, x.numel(), work).to(flat.device)
            code[at : at + CHUNK] = self._round(x, level, scales)
        scale = torch.cat(scales)
        header = {} if all_finite(scale) else {NONFINITE: True}
        return Payload(header, [self._pack(code), scale])

    def requantize(self, key: str, count: int, values: torch.Tensor, start: int) -> Payload:
        """Round `values`, elements `start`.. (a multiple of BLOCK) of `key`'s flat
        gradient, stochastically again: the DP hook's second rounding, of the ranks'
        average (see `shoal.compress.ddp_hooks`). The payload is `encode`'s for those
        elements, but the dither comes from rank-independent streams, one per
        `SEGMENT` of the key's elements and keyed by the count of `key`'s encodes
        (`count`, the same on every rank): each element's rounding depends on its
        key, position and step only, not on which rank rounds it or how the elements
        are split among ranks (which follows DDP's bucket layout, which changes)."""
        work = value_dtype(values.dtype)
        flat = values.detach().reshape(-1).to(work)
        n = flat.numel()
        assert start % BLOCK == 0, "a requantized range starts on a block"
        code = torch.empty(n, dtype=torch.int8, device=flat.device)
        scales = [flat.new_zeros(0)]
        at = 0
        while at < n:
            segment, offset = divmod(start + at, SEGMENT)
            take = min(SEGMENT - offset, n - at)
            gen = torch.Generator().manual_seed(key_seed(SHARED_SEED, f"{key}{REDUCED}{segment}", count))
            level = dither(gen, offset + take, work)[offset:].to(flat.device)
            code[at : at + take] = self._round(flat[at : at + take], level, scales, divide_first=True)
            at += take
        return Payload({}, [self._pack(code), torch.cat(scales)])

    def _round(
        self, x: torch.Tensor, level: torch.Tensor, scales: list[torch.Tensor], divide_first: bool = False
    ) -> torch.Tensor:
        """The codes of `x` (whole blocks but the last) given its dither `level`, which
        is overwritten; appends the blocks' scales to `scales`. `divide_first` always
        computes u + (x / m) s, whose bits do not depend on the other blocks of `x`."""
        for rows, u in zip(blocks_of(x), blocks_of(level), strict=True):
            scales.append(block_max(rows))
            m = torch.where(scales[-1] > 0, scales[-1], 1.0).view(-1, 1)
            if divide_first or float(scales[-1].max()) > torch.finfo(level.dtype).max / self.levels:
                u.add_(rows / m, alpha=self.levels)  # s * x would overflow: divide first
            else:
                u.addcdiv_(rows, m, value=self.levels)  # u + s * x / m
        # floor(level + u) rounds the signed level stochastically; the clamp
        # catches s * x / m rounded one ulp above s.
        return level.floor_().clamp_(-self.levels, self.levels)

    def decode(self, payload: Payload, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        packed, scale = payload.tensors
        out = self._unpack(packed, numel_of(shape)).to(scale.dtype)
        self._scale(out, scale)
        return out.to(dtype).reshape(shape)

    def decode_into(self, payload: Payload, out: torch.Tensor) -> None:
        """out[:] = decode(payload, out.shape, out.dtype), in out's own memory when it holds
        the scales' dtype (the same bits: each code times its block's step, rounded once)."""
        scale = payload.tensors[1]
        if out.dtype != scale.dtype or not out.is_contiguous():
            out.copy_(self.decode(payload, out.shape, out.dtype))
            return
        flat = out.view(-1)
        flat.copy_(self._unpack(payload.tensors[0], flat.numel()))
        self._scale(flat, scale)

    def _scale(self, codes: torch.Tensor, scale: torch.Tensor) -> None:
        step = (scale / self.levels).view(-1, 1)
        at = 0
        for rows in blocks_of(codes):
            rows.mul_(step[at : at + rows.shape[0]])
            at += rows.shape[0]

    # ------------------------------------------------------------ packing
    def _pack(self, code: torch.Tensor) -> torch.Tensor:
        if self.bits == 8:
            return code
        nib = (code + 8).to(torch.uint8)  # 1..15
        if nib.numel() % 2:
            nib = torch.cat([nib, nib.new_zeros(1)])
        pairs = nib.view(-1, 2)
        return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()

    def _unpack(self, packed: torch.Tensor, n: int) -> torch.Tensor:
        if self.bits == 8:
            return packed.to(torch.int8)
        low = (packed & 0x0F).to(torch.int16)
        high = (packed >> 4).to(torch.int16)
        nib = torch.stack([low, high], dim=1).reshape(-1)[:n]
        return (nib - 8).to(torch.int8)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return counts_state(self.counts)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.counts = load_counts(state)
