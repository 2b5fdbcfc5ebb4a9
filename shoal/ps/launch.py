"""Transitional, until the issue-9 merge: `shoal.strategies.parameter_server`
still imports these two from here. They live in `shoal.ps.store` (and the
server launcher in `shoal.ps.servers`); delete this module at the merge."""

from shoal.ps.store import connect_store, read_endpoints

__all__ = ["connect_store", "read_endpoints"]
