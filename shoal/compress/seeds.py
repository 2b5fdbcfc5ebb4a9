"""Per-key random streams for the compressors that draw random numbers.

Randomness is drawn per (seed, key, encode count), never from one stream
shared by all keys, so it does not depend on the order keys are encoded in
(DDP's bucket order changes after the first step, and after a restart), and
a checkpoint of the counts resumes it exactly.
"""

from __future__ import annotations

import zlib

import torch

from shoal.state import sub_state, with_prefix

COUNT = "count/"
"""Prefix of the encode counts in a compressor's state dict."""


def key_seed(seed: int, key: str, count: int | None = None) -> int:
    """A seed for `key`'s random draws: new at each encode when `count` (how
    many times the key was encoded before) is given; fixed per (seed, key)
    when it is None (PowerSGD's starting subspace). A counted seed is below
    2^62, so msgpack keeps it (random-k sends it). The formulas are frozen:
    changing them changes every run."""
    crc = zlib.crc32(key.encode())
    if count is None:
        return seed * 1_000_003 + crc
    return (seed * 1_000_003 + crc * 65_537 + count) % 2**62


def next_seed(seed: int, key: str, counts: dict[str, int]) -> int:
    """`key_seed` for this encode of `key`, counting it in `counts`."""
    count = counts.get(key, 0)
    counts[key] = count + 1
    return key_seed(seed, key, count)


def counts_state(counts: dict[str, int]) -> dict[str, torch.Tensor]:
    return with_prefix({key: torch.tensor(n, dtype=torch.int64) for key, n in counts.items()}, COUNT)


def load_counts(state: dict[str, torch.Tensor]) -> dict[str, int]:
    return {key: int(n) for key, n in sub_state(state, COUNT).items()}
