"""Tensors of any shape between pipeline ranks, point to point or to all (for the plain forward in evaluation).

A tensor goes as three sends: the header's length, a header (dtype, rank of
the shape, the shape), then the data; the receiver allocates from the header.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64]
DTYPES += [torch.int32, torch.bool, torch.uint8]  # appended: the header's numbers stay
MAX_DIMS = 8


def send_tensor(t: torch.Tensor, dst: int, group: dist.ProcessGroup) -> None:
    header = torch.tensor([DTYPES.index(t.dtype), t.dim(), *t.shape], dtype=torch.int64, device=t.device)
    dist.send(torch.tensor([len(header)], dtype=torch.int64, device=t.device), dst, group=group)
    dist.send(header, dst, group=group)
    dist.send(t.contiguous(), dst, group=group)


def recv_tensor(src: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    size = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(size, src, group=group)
    header = torch.zeros(int(size), dtype=torch.int64, device=device)
    dist.recv(header, src, group=group)
    dtype, ndim = DTYPES[int(header[0])], int(header[1])
    out = torch.empty([int(d) for d in header[2 : 2 + ndim]], dtype=dtype, device=device)
    dist.recv(out, src, group=group)
    return out


def broadcast_tensor(t: torch.Tensor | None, src: int, group: dist.ProcessGroup, device: torch.device) -> torch.Tensor:
    """`t` from global rank `src` to every rank of `group` (the others pass None): header, then data."""
    header = torch.zeros(2 + MAX_DIMS, dtype=torch.int64, device=device)
    if t is not None:
        if t.dim() > MAX_DIMS:
            raise ValueError(f"a pipeline output has at most {MAX_DIMS} dimensions, not {t.dim()}")
        header[0], header[1] = DTYPES.index(t.dtype), t.dim()
        header[2 : 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    dist.broadcast(header, src=src, group=group)
    if t is None:
        ndim = int(header[1])
        t = torch.empty([int(d) for d in header[2 : 2 + ndim]], dtype=DTYPES[int(header[0])], device=device)
    else:
        t = t.contiguous()
    dist.broadcast(t, src=src, group=group)
    return t
