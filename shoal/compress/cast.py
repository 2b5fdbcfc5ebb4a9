"""Dense casts: "none" (send as is) and "fp16"/"bf16" (half the bytes of fp32).

Guarantees: "none" is exact. A cast is deterministic and unbiased only up to
rounding to nearest (relative error <= 2^-11 for fp16, 2^-8 for bf16). fp16
cannot hold magnitudes above 65504: such a gradient becomes inf after
encoding, the payload says so (`header["nonfinite"]`), and whoever applies
it must skip the step, as mixed-precision training does. bf16 has fp32's
range, so it overflows only where fp32 would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from shoal.compress.base import NONFINITE, Compressor, Payload
from shoal.finite import all_finite


class NoCompression(Compressor):
    family = "none"
    allreduce_safe: ClassVar[bool] = True

    def encode(self, key: str, grad: torch.Tensor) -> Payload:
        return Payload({}, [grad.detach().reshape(-1)])

    def decode(self, payload: Payload, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return payload.tensors[0].to(dtype).reshape(shape)


class Cast(Compressor):
    """Round each element to a 16-bit float."""

    allreduce_safe: ClassVar[bool] = True
    DTYPES: ClassVar[dict[str, torch.dtype]] = {"fp16": torch.float16, "bf16": torch.bfloat16}

    def __init__(self, spec: str, family: str):
        super().__init__(spec)
        self.family = family
        self.wire_dtype = self.DTYPES[family]

    def encode(self, key: str, grad: torch.Tensor) -> Payload:
        wire = grad.detach().reshape(-1).to(self.wire_dtype)
        return Payload({} if all_finite(wire) else {NONFINITE: True}, [wire])

    def decode(self, payload: Payload, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return payload.tensors[0].to(dtype).reshape(shape)
