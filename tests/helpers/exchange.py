"""The DP hook's two-phase exchange for int8/qsgd, computed in one process.

Tensor by tensor, with no chunks: rank r's code of each gradient (its
quantizer seeded as the DP strategy seeds it, 1_000 + r), decoded and summed
in rank order from zero, divided by the world size, rounded again with the
rank-independent streams and decoded. The hook's result must equal this bit
for bit, whatever DDP's bucket layout and however it splits the tensors.
"""

from __future__ import annotations

import torch


def two_phase_reference(spec: str, grads: list[dict[str, torch.Tensor]], step: int) -> dict[str, torch.Tensor]:
    """The averaged gradient every rank holds after the exchange at `step` (encodes
    counted from 0), given each rank's local gradients by parameter name."""
    from shoal.compress import parse

    world = len(grads)
    coders = []
    for r in range(world):
        coder = parse(spec)
        coder.reseed(1_000 + r)
        coder.counts = dict.fromkeys(grads[r], step)
        coders.append(coder)
    out = {}
    for name, g in grads[0].items():
        total = torch.zeros(g.numel(), dtype=g.dtype)
        for coder, local in zip(coders, grads, strict=True):
            coder.decode_add(coder.encode(name, local[name]), total)
        again = coders[0].requantize(name, step, total.div_(world), 0)
        out[name] = coders[0].decode(again, g.shape, g.dtype)
    return out
