"""The one check for inf and NaN in a tensor.

Compressors flag a non-finite payload, DDP hooks and servers refuse to apply
one, a checkpoint's scalars must be finite: all ask `all_finite`. It is fast
on the common case, where it runs on every gradient of every step: a sum is
several times cheaper than an elementwise `isfinite` over millions of
elements and is finite whenever every element is, so only a tensor with an
inf or NaN (or whose sum overflows) pays for the exact check.
"""

from __future__ import annotations

import math

import torch


def all_finite(tensor: torch.Tensor) -> bool:
    """True if no element is inf or NaN (an empty tensor is finite)."""
    if not tensor.numel():
        return True
    return math.isfinite(float(tensor.sum())) or bool(torch.isfinite(tensor).all())
