"""Keeping a lease alive from a background thread, so a liveness record lasts
as long as its process does and no longer.

    with hold(ctl, "worker/3", {"pid": os.getpid()}, ttl=3.0) as held:
        ...                  # the record stays under members/ while this runs
        if held.lost.is_set():
            ...              # the lease expired (the control plane was unreachable longer than ttl)

The thread renews every `ttl / 3` seconds, so two renewals can fail (a leader
failover, a slow machine) before the lease is in danger. A renewal that the
control plane refuses (the lease already expired) or that has not succeeded
for a whole `ttl` sets `lost`; the owner decides what losing liveness means
for it (a fenced server stops acknowledging). Leaving the block revokes the
lease at once, so others see the record go without waiting for the TTL.

Renewals share the client's session, whose lock serializes calls: a renewal
waits behind a slow call, so give the record a TTL longer than the calls the
same client makes (the client's timeout bounds them).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from types import TracebackType
from typing import Any

from shoal.control.base import ControlError, ControlPlane

log = logging.getLogger("shoal.control.keeper")


class Held:
    """One liveness record kept alive; `lost` is set once its lease is gone."""

    def __init__(self, control: ControlPlane, name: str, lease: int, ttl: float) -> None:
        self.control = control
        self.name = name
        self.lease = lease
        self.ttl = ttl
        self.lost = threading.Event()
        self.renewals = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"shoal-lease-{name}", daemon=True)

    def _run(self) -> None:
        last_ok = time.monotonic()
        while not self._stop.wait(self.ttl / 3):
            try:
                alive = self.control.keep_alive(self.lease)
            except ControlError as err:
                log.warning("could not renew the lease of %s: %s", self.name, err)
                alive = time.monotonic() - last_ok < self.ttl
            else:
                if alive:
                    last_ok = time.monotonic()
                    self.renewals += 1
            if not alive:
                log.warning("the lease of %s expired: its liveness record is gone", self.name)
                self.lost.set()
                return

    def close(self) -> None:
        """Stop renewing and revoke the lease (best effort: it expires by itself otherwise)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()
        if not self.lost.is_set():
            with contextlib.suppress(ControlError):
                self.control.revoke(self.lease)

    def __enter__(self) -> Held:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def hold(control: ControlPlane, name: str, info: Any, ttl: float) -> Held:
    """Register `name` as alive (under `members/`) and keep it so from a background thread until closed."""
    if not ttl > 0.3:
        raise ValueError(f"a liveness TTL must be more than 0.3 s (it is renewed every third of it), not {ttl!r}")
    held = Held(control, name, control.register(name, info, ttl), ttl)
    held._thread.start()
    return held
