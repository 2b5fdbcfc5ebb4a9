"""Low-rank compression: "powersgd:rank=R" (Vogels et al. 2019, "PowerSGD").

Each gradient of shape (n, ...) is viewed as an n x m matrix M (plus the
residual of earlier steps: error feedback) and approximated by P Q^T with
P = orth(M Q), Q = M^T P: one step of subspace (power) iteration. Q is kept
per key and reused as the next step's start (warm start), so successive
steps refine the same subspace and a rank as small as 1-4 tracks the
gradient well. The payload is P and Q: (n + m) x R numbers instead of n x m.
Tensors where that would not save at least 2x (vectors, biases, small
matrices) are sent dense, as torch's own PowerSGD hook does.

This class is the single-worker form, for pushes to a parameter server.
Data parallelism uses `shoal.compress.powersgd_hook`, which all-reduces P
and Q between the two half-steps so that all ranks share one factorization.
Both orthogonalize with torch's own `_orthogonalize`, and both form the
products over M's rows (P^T = Q^T M^T, Q^T = P^T M): MKL on one thread
takes M^T P many times longer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _orthogonalize, _should_compress

from shoal.compress.base import NONFINITE, ErrorFeedback, Payload, numel_of, value_dtype
from shoal.compress.seeds import key_seed
from shoal.finite import all_finite
from shoal.state import sub_state, with_prefix

MIN_COMPRESSION_RATE = 2
EPSILON = 1e-8
PRODUCT_CHUNK = 2**18
"""Elements of P Q^T that `low_rank_product` sums per block of rows."""
Q = "q/"
"""Prefix of the warm-start factors in the state dict."""


def matrix_shape(shape: Sequence[int]) -> tuple[int, int] | None:
    """(n, m) for a tensor PowerSGD compresses at `rank`, else None (sent dense)."""
    shape = tuple(shape)
    if len(shape) < 2:
        return None
    n, m = shape[0], numel_of(shape[1:])
    return (n, m) if n > 0 and m > 0 else None


def factor_shape(shape: Sequence[int], rank: int) -> tuple[int, int, int] | None:
    """(n, m, R) for a tensor compressed at `rank` (R = min(n, m, rank)), else None: sent dense."""
    nm = matrix_shape(shape)
    if nm is None:
        return None
    n, m = nm
    r = min(n, m, rank)
    return (n, m, r) if _should_compress(n, m, r, MIN_COMPRESSION_RATE)[0] else None


def orthonormalize(matrices: torch.Tensor) -> None:
    """In place, with torch's own routine, as its PowerSGD hook does (the epsilon avoids 0/0)."""
    _orthogonalize(matrices, EPSILON)  # pyright: ignore[reportArgumentType] -- torch infers int from the default 0


def low_rank_product(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """P Q^T for P (n x R) and Q (m x R), as R elementwise products added in a fixed order.

    Not a matmul: a BLAS may round differently with another thread count, kernel or
    device, and the parameter server and the workers it sends compressed pulls to
    must add the same decoded bits to their copies (`shoal.ps.pull_codec`). Each
    product and sum here is one correctly rounded operation, the same everywhere."""
    out = torch.empty(p.shape[0], q.shape[0], dtype=torch.promote_types(p.dtype, q.dtype), device=p.device)
    rows = max(1, PRODUCT_CHUNK // max(1, q.shape[0]))  # a block of rows at a time, in cache
    term = torch.empty_like(out[:rows])
    for at in range(0, p.shape[0], rows):
        block, part = out[at : at + rows], p[at : at + rows]
        torch.mul(part[:, 0:1], q[:, 0], out=block)
        for r in range(1, p.shape[1]):
            block.add_(torch.mul(part[:, r : r + 1], q[:, r], out=term[: block.shape[0]]))
    return out


class PowerSGD(ErrorFeedback):
    family = "powersgd"

    def __init__(self, spec: str, rank: int, seed: int = 0):
        super().__init__(spec)
        self.rank = rank
        self.seed = seed
        self.q_memory: dict[str, torch.Tensor] = {}

    def encode(self, key: str, grad: torch.Tensor) -> Payload:
        acc = self._accumulate(key, grad)
        dims = factor_shape(grad.shape, self.rank)
        if dims is None:
            self._remember(key, acc, acc)
            return Payload({"dense": True}, [acc.to(grad.dtype)])
        n, m, r = dims
        work = value_dtype(grad.dtype)
        # Normalizing by the largest magnitude keeps tiny and huge gradients
        # in range, and the epsilon keeps rank-deficient ones free of 0/0.
        scale = acc.abs().max().to(work)
        if not all_finite(scale):
            self._remember(key, acc, acc)
            return Payload({"dense": True, NONFINITE: True}, [acc.to(grad.dtype)])
        if scale == 0:
            p, q = acc.new_zeros((1, n, r), dtype=work), acc.new_zeros((1, m, r), dtype=work)
        else:
            matrix = (acc.to(work) / scale).view(1, n, m)
            q = self.q_memory.get(key)
            if q is None or q.shape != (1, m, r) or q.dtype != work:
                gen = torch.Generator().manual_seed(key_seed(self.seed, key))
                q = torch.randn(1, m, r, generator=gen, dtype=work).to(acc.device)
            q = q.to(acc.device, copy=True)
            orthonormalize(q)
            # M Q and M^T P as (Q^T M^T)^T and (P^T M)^T: the same products, but the
            # BLAS computes a skinny matrix times M's rows many times faster than bmm did.
            p = torch.mm(q[0].t(), matrix[0].t()).t().contiguous().unsqueeze(0)
            orthonormalize(p)
            q = torch.mm(p[0].t(), matrix[0]).t().contiguous().unsqueeze(0)
            self.q_memory[key] = q.clone()
            q = q * scale
        approx = low_rank_product(p[0], q[0]).reshape(-1).to(acc.dtype)
        self._remember(key, acc, approx)
        return Payload({"dense": False}, [p.reshape(n, r), q.reshape(m, r)])

    def decode(self, payload: Payload, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        if payload.header.get("dense", False):
            return payload.tensors[0].to(dtype).reshape(shape)
        p, q = payload.tensors
        return low_rank_product(p, q).to(dtype).reshape(shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {**super().state_dict(), **with_prefix({k: v.clone() for k, v in self.q_memory.items()}, Q)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        super().load_state_dict(state)
        self.q_memory = {k: v.clone() for k, v in sub_state(state, Q).items()}
