"""The control plane's one interface, whatever holds the state.

Every method is linearizable: it returns once a majority of the backend's
members has committed it (reads included), or raises `ControlError` when
that cannot happen within the client's timeout. Values are JSON-able plain
data; `None` means absent.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from shoal.errors import ShoalError

WATCH_INTERVAL_S = 0.1
"""How often `watch` polls: a change shows up within this plus one commit (a few ms)."""


class ControlError(ShoalError):
    """The control plane could not commit an operation (no majority, no member reachable, bad key)."""


@dataclass(frozen=True)
class Event:
    """A change seen by `watch`: `value` is None when the key went away."""

    key: str
    value: Any


class ControlPlane(ABC):
    """get / put / compare_and_set / incr, leases with a TTL, and watch."""

    timeout: float
    """How long a call may try before it raises ControlError (seconds)."""

    @abstractmethod
    def get(self, key: str) -> Any:
        """The key's value, or None."""

    @abstractmethod
    def put(self, key: str, value: Any, lease: int | None = None) -> None:
        """Set the key; with `lease`, the key goes when the lease expires or is revoked."""

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the key; False if it was absent."""

    @abstractmethod
    def compare_and_set(self, key: str, expected: Any, new: Any, lease: int | None = None) -> bool:
        """Set `new` only if the value is `expected` (None: absent; `new` None deletes), atomically."""

    @abstractmethod
    def incr(self, key: str) -> int:
        """Add one to an integer key (absent counts as 0) and return the new value: a fencing generation."""

    @abstractmethod
    def range(self, prefix: str) -> dict[str, Any]:
        """Every key starting with `prefix`, with its value."""

    @abstractmethod
    def grant(self, ttl: float) -> int:
        """A new lease that expires `ttl` seconds after its last keep-alive."""

    @abstractmethod
    def keep_alive(self, lease: int) -> bool:
        """Restart the lease's TTL; False if it already expired (its keys are gone)."""

    @abstractmethod
    def revoke(self, lease: int) -> bool:
        """End the lease now and remove its keys; False if it was already gone."""

    def close(self) -> None:  # noqa: B027 (optional for a backend)
        """Release connections."""

    def watch(self, prefix: str, interval: float = WATCH_INTERVAL_S, timeout: float | None = None) -> Iterator[Event]:
        """Changes under `prefix` as they commit, by polling every `interval` seconds.

        Starts from the current contents (not yielded); values that change and change
        back between two polls are not seen: a watcher learns the newest state, not
        every step. Stops after `timeout` seconds when one is given.
        """
        seen = self._poll(prefix)
        end = None if timeout is None else time.monotonic() + timeout
        while end is None or time.monotonic() < end:
            time.sleep(interval)
            now = self._poll(prefix)
            for key in sorted(set(seen) | set(now)):
                if seen.get(key) != now.get(key):
                    yield Event(key, now.get(key))
            seen = now

    def _poll(self, prefix: str) -> dict[str, Any]:
        """What `watch` reads; a backend may answer it more cheaply than `range`."""
        return self.range(prefix)

    # Liveness records: what later parts use to say who is alive.
    def register(self, name: str, info: Any, ttl: float) -> int:
        """Record `name` as alive under `members/` on a new lease; keep it alive with `keep_alive`."""
        lease = self.grant(ttl)
        self.put(f"{MEMBERS}{name}", info, lease=lease)
        return lease

    def alive(self) -> dict[str, Any]:
        """The members whose leases have not expired."""
        return {k[len(MEMBERS) :]: v for k, v in self.range(MEMBERS).items()}

    def __enter__(self) -> ControlPlane:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


MEMBERS = "members/"
"""The prefix of liveness records (`register`, `alive`)."""
GENERATION = "generation"
"""The key of the job's fencing generation (`incr(GENERATION)`)."""
