"""Where to cut a model's blocks into pipeline chunks: by measured time or by parameters.

Pure functions, apart from the strategy: a split is contiguous, complete and
in order, and minimizes the largest chunk's cost.
"""

from __future__ import annotations

import itertools
import time

import torch
from torch import nn

from shoal.errors import ConfigError


def measure_block_times(model: nn.Sequential, x: torch.Tensor, repeats: int = 3) -> dict[str, float]:
    """Forward+backward seconds of each child on an example input (median of `repeats`)."""
    times: dict[str, list[float]] = {}
    for _ in range(repeats):
        h = x
        for name, module in model.named_children():
            inp = h.detach().requires_grad_(h.is_floating_point())
            start = time.perf_counter()
            out = module(inp)
            out.float().sum().backward()
            times.setdefault(name, []).append(time.perf_counter() - start)
            h = out.detach()
    model.zero_grad(set_to_none=True)
    return {n: sorted(t)[len(t) // 2] for n, t in times.items()}


def parameter_counts(blocks: dict[str, nn.Module]) -> dict[str, float]:
    """Each block's parameter count (1 for a block without parameters)."""
    return {n: float(sum(p.numel() for p in m.parameters())) or 1.0 for n, m in blocks.items()}


def split_balanced(
    names: list[str], costs: dict[str, float], parts: int, starts: list[str] | None = None
) -> list[list[str]]:
    """Contiguous chunks minimizing the largest chunk's cost (or starting at the given names)."""
    if starts is not None:
        return split_at(names, parts, starts)
    n = len(names)
    prefix = [0.0]
    for name in names:
        prefix.append(prefix[-1] + costs[name])
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]  # best[k][i]: first i blocks in k chunks
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0.0
    for k in range(1, parts + 1):
        for i in range(k, n - (parts - k) + 1):
            for j in range(k - 1, i):
                value = max(best[k - 1][j], prefix[i] - prefix[j])
                if value < best[k][i]:
                    best[k][i], cut[k][i] = value, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        bounds.append((cut[k][i], i))
        i = cut[k][i]
    return [names[a:b] for a, b in reversed(bounds)]


def split_at(names: list[str], parts: int, starts: list[str]) -> list[list[str]]:
    """Chunks starting at the given children (those of stages 2..parts)."""
    unknown = [s for s in starts if s not in names]
    if unknown or len(starts) != parts - 1:
        raise ConfigError(
            f"'split' must name {parts - 1} blocks of the model where stages 2..{parts} start; "
            f"got {starts} (blocks: {names})",
            "split",
        )
    cuts = [0, *sorted(names.index(s) for s in starts), len(names)]
    return [names[a:b] for a, b in itertools.pairwise(cuts)]
