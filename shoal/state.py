"""Prefixed state dicts: how one component's state nests inside another's.

A compressor keeps `residual/<key>`, a strategy stores the compressor's
state under `compression/`, a checkpoint stores a rank's under its rank.
These two helpers are the only way keys are nested and taken apart, so every
layer agrees on it. The prefix includes its separator (`"residual/"`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

V = TypeVar("V")


def sub_state(state: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The entries of `state` whose keys start with `prefix`, with the prefix removed."""
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def with_prefix(state: Mapping[str, V], prefix: str) -> dict[str, V]:
    """`state` with `prefix` put before every key (the inverse of `sub_state`)."""
    return {f"{prefix}{key}": value for key, value in state.items()}
