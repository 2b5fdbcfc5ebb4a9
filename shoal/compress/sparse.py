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

from shoal.compress.base import NONFINITE, ErrorFeedback, Payload, numel_of
from shoal.compress.seeds import counts_state, load_counts, next_seed
from shoal.finite import all_finite


def count_kept(ratio: float, n: int) -> int:
    return 0 if n == 0 else min(n, max(1, math.ceil(ratio * n)))


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
        k = count_kept(self.ratio, n)
        index = torch.topk(acc.abs(), k, sorted=False).indices if k else acc.new_zeros(0, dtype=torch.long)
        index = index.to(torch.int32 if n < 2**31 else torch.int64)
        values = acc[index.long()].to(self.wire_dtype(grad.dtype))
        sent = torch.zeros_like(acc)
        sent[index.long()] = values.to(acc.dtype)
        self._remember(key, acc, sent)
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
        sent = torch.zeros_like(acc)
        sent[index] = values.to(acc.dtype)
        self._remember(key, acc, sent)
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
