"""Sparsification with error feedback: "topk:RATIO" and "randomk:RATIO".

Both send k = ceil(RATIO x numel) of each gradient's elements (at least one
for a non-empty tensor) and keep the rest, with error feedback, for later
steps: what is not sent now is added to the next gradient, so no gradient is
lost, only delayed (Lin et al. 2018, "Deep Gradient Compression"; Stich et
al. 2018, "Sparsified SGD with memory").

- top-k sends the k largest magnitudes of (gradient + residual) as index /
  value pairs: int32 indices (int64 past 2^31 elements) and bfloat16 values
  for 16/32-bit gradients (float64 values for float64 ones). The rounding of
  the values to bfloat16 also lands in the residual, so it is not lost either.
  Indices differ from rank to rank, so data parallelism all-gathers payloads.
  The selection is exact, but `torch.topk` over millions of elements is slow
  on a CPU, so `top_indices` first finds candidates (as DGC estimates its
  threshold from a sample) and runs `torch.topk` over those only.
- random-k sends the values at k positions drawn from a generator seeded by
  (seed, key, how many times this key was encoded). The header carries that
  seed, not the indices, so the payload is values only; and because every
  rank draws the same positions for the same step, an all-reduce of the
  values is correct. Values keep the gradient's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from shoal.compress.base import NONFINITE, Compressor, ErrorFeedback, Payload, numel_of
from shoal.compress.seeds import counts_state, load_counts, next_seed
from shoal.finite import all_finite

SAMPLE = 2**16
"""About how many elements `top_indices` samples to estimate its threshold."""
GROUPS = 16
"""`top_indices` keeps a column of its (GROUPS, n / GROUPS) view if the column's largest magnitude passes."""


SPARSE = ("topk", "randomk")


def corrected_momentum(compressor: Compressor, optimizer: torch.optim.Optimizer) -> float:
    """The momentum a sparsifying compressor applies before it sparsifies (DGC's momentum correction;
    the optimizer then steps without it), or 0 where that does not apply: only top-k and random-k,
    under plain SGD (no Nesterov, no dampening) with one momentum value > 0 in every group."""
    if compressor.family not in SPARSE or not isinstance(compressor, ErrorFeedback):
        return 0.0
    if not isinstance(optimizer, torch.optim.SGD):
        return 0.0
    groups = optimizer.param_groups
    values = {float(g.get("momentum", 0.0)) for g in groups}
    if len(values) != 1 or any(g.get("nesterov") or g.get("dampening", 0.0) for g in groups):
        return 0.0
    return values.pop()


def count_kept(ratio: float, n: int) -> int:
    return 0 if n == 0 else min(n, max(1, math.ceil(ratio * n)))


def sample_stride(n: int) -> int:
    """Odd, so that a strided sample of a row-major matrix visits every column."""
    return max(1, n // SAMPLE) | 1


def top_indices(values: torch.Tensor, k: int) -> torch.Tensor:
    """The positions of the k largest magnitudes of the 1-D `values` (NaN counts as largest,
    as in `torch.topk`; which of several equal magnitudes at the k-th place is kept is unspecified).

    A strided sample gives a threshold t a little below the k-th largest magnitude;
    every element not below t is a candidate, and `torch.topk` over the candidates is
    `torch.topk` over all, provided there are at least k of them (every element left
    out is below t, so below all k chosen). If there are fewer, t is lowered and,
    failing twice, all elements are candidates. Finding the candidates without an
    |x| copy: the largest magnitude of each column of a (GROUPS, n / GROUPS) view,
    then the elements of the columns that pass.
    """
    n = values.numel()
    if n < 2 * SAMPLE or k * GROUPS > n:
        return torch.topk(values.abs(), k, sorted=False).indices
    sample = values[:: sample_stride(n)].abs()
    expected = k * sample.numel() / n  # sampled elements among the k largest, on average
    rank = math.ceil(expected + 4 * math.sqrt(expected) + 4)
    for _ in range(2):
        if rank >= sample.numel():
            break
        threshold = torch.topk(sample, rank, sorted=False).values.min()  # NaN if any is NaN
        index, magnitude = candidates(values, threshold)
        if index.numel() >= k:
            return index[torch.topk(magnitude, k, sorted=False).indices]
        rank *= 8
    return torch.topk(values.abs(), k, sorted=False).indices


def candidates(values: torch.Tensor, threshold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The positions and magnitudes of the elements of `values` not below `threshold`
    (NaN is never below), in no particular order."""
    n = values.numel()
    width = n // GROUPS
    grid = values[: GROUPS * width].view(GROUPS, width)
    column_max, row = grid[0].abs(), torch.empty_like(grid[0])
    for r in range(1, GROUPS):  # row by row: amax(dim=0) over the grid is several times slower
        torch.maximum(column_max, torch.abs(grid[r], out=row), out=column_max)  # NaN if any is NaN
    columns = (column_max < threshold).logical_not_().nonzero().squeeze(1)
    picked = grid.index_select(1, columns).abs_()
    where = (picked < threshold).logical_not_().view(-1).nonzero().squeeze(1)
    used = max(1, columns.numel())  # no columns, no `where`
    index = where // used * width + columns[where % used]
    magnitude = picked.view(-1)[where]
    rest = values[GROUPS * width :].abs()  # fewer than GROUPS elements past the grid
    keep = (rest < threshold).logical_not_().nonzero().squeeze(1)
    return torch.cat([index, keep + GROUPS * width]), torch.cat([magnitude, rest[keep]])


class TopK(ErrorFeedback):
    family = "topk"

    def __init__(self, spec: str, ratio: float):
        super().__init__(spec)
        self.ratio = ratio

    @staticmethod
    def wire_dtype(dtype: torch.dtype) -> torch.dtype:
        return torch.float64 if dtype == torch.float64 else torch.bfloat16

    def encode(self, key: str, grad: torch.Tensor) -> Payload:
        acc = self._accumulate(key, grad)
        n = acc.numel()
        index = top_indices(acc, count_kept(self.ratio, n))
        values = acc[index].to(self.wire_dtype(grad.dtype))
        self._remember_sparse(key, acc, index, values.to(acc.dtype))
        index = index.to(torch.int32 if n < 2**31 else torch.int64)
        return Payload({} if all_finite(values) else {NONFINITE: True}, [index, values])

    def check_payload(self, payload: Payload, shape: Sequence[int]) -> None:
        index = payload.tensors[0]
        n = numel_of(shape)
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= n):
            raise ValueError("top-k index out of range")

    def decode(self, payload: Payload, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        index, values = payload.tensors
        out = torch.zeros(numel_of(shape), dtype=dtype, device=values.device)
        out[index.long()] = values.to(dtype)
        return out.reshape(shape)

    def decode_add(self, payload: Payload, out: torch.Tensor) -> None:
        if not out.is_contiguous():
            return super().decode_add(payload, out)
        index, values = payload.tensors  # distinct positions: each gets one add, as in out + decode
        out.view(-1).index_put_((index.long(),), values.to(out.dtype), accumulate=True)
        return None


class RandomK(ErrorFeedback):
    family = "randomk"
    allreduce_safe: ClassVar[bool] = True
    varying_header: ClassVar[tuple[str, ...]] = ("seed",)

    def __init__(self, spec: str, ratio: float, seed: int = 0):
        super().__init__(spec)
        self.ratio = ratio
        self.seed = seed
        self.counts: dict[str, int] = {}

    @staticmethod
    def positions(seed: int, n: int, k: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randperm(n, generator=gen)[:k]

    def encode(self, key: str, grad: torch.Tensor) -> Payload:
        acc = self._accumulate(key, grad)
        n = acc.numel()
        k = count_kept(self.ratio, n)
        seed = next_seed(self.seed, key, self.counts)  # the same on every rank: key and count agree
        index = self.positions(seed, n, k).to(acc.device)
        values = acc[index].to(grad.dtype)
        self._remember_sparse(key, acc, index, values.to(acc.dtype))
        header = {"seed": seed, "k": k}
        if not all_finite(values):
            header[NONFINITE] = True
        return Payload(header, [values])

    def check_payload(self, payload: Payload, shape: Sequence[int]) -> None:
        seed = payload.header.get("seed")
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**62:
            raise ValueError("random-k seed out of range")

    def decode(self, payload: Payload, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        (values,) = payload.tensors
        n = numel_of(shape)
        index = self.positions(int(payload.header["seed"]), n, int(payload.header["k"])).to(values.device)
        out = torch.zeros(n, dtype=dtype, device=values.device)
        out[index] = values.to(dtype)
        return out.reshape(shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **counts_state(self.counts)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.counts = load_counts(state)
