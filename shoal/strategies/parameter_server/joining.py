"""How a worker finds the parameter servers, on a rejoin which clock it goes on from, and how it leaves."""

from __future__ import annotations

import atexit
import logging
import sys
import weakref
from collections.abc import Callable
from typing import Any

from shoal.errors import ShoalError
from shoal.ps.protocol import whole
from shoal.ps.store import Shard

log = logging.getLogger(__name__)


def find_servers(timeout_s: float, servers: int | None, replication: int | None) -> list[Shard]:
    """The servers' endpoints from the job's store; ShoalError if the strategy asks for another count
    (`servers`) or copies (`replication`) than the launcher started (None: what the launcher started)."""
    from shoal.ps.records import read_shards
    from shoal.ps.store import connect_store

    store, count = connect_store(timeout_s)
    if servers is not None and count != servers:
        raise ShoalError(
            f"the launcher started {count} parameter server(s) but the strategy asks for "
            f"servers={servers}; make them agree (shoal run --servers {servers}), "
            "or leave servers out to use what the launcher started"
        )
    shards = read_shards(store, count, timeout_s)
    held = max(len(s.replicas) for s in shards)
    if replication is not None and held != replication:
        raise ShoalError(
            f"the launcher keeps {held} cop{'y' if held == 1 else 'ies'} of each server's shard but the strategy "
            f"asks for replication={replication}; make them agree (shoal run --replication "
            f"{replication}), or leave replication out to use what the launcher started"
        )
    return shards


def joined_at(headers: list[dict], rank: int) -> int:
    """The clock to go on from, given every server's answer to the join: 0 on a first join, the
    servers' count of this worker's pushes on a rejoin.

    A worker killed between its pushes to two servers left one a clock ahead: it goes on from the
    lower clock, pulls from the server ahead the values from before that push (a `previous` pull,
    `shoal.ps.reads.answer_previous`), and computes the step again exactly; the server ahead drops
    the repeated push (`bad_clock`)."""
    clocks = [h.get("clock", 0) for h in headers]
    if not all(whole(c) and c >= 0 for c in clocks):
        raise ShoalError(f"the parameter servers answered the join with clocks {clocks}; are they shoal's?")
    if max(clocks) - min(clocks) > 1:  # a push goes to every server before the next one starts
        raise ShoalError(
            f"the parameter servers hold clocks {clocks} for worker {rank}; "
            "they cannot be more than one apart (were they restarted from another run?)"
        )
    if max(clocks):
        log.warning("worker %d rejoined the parameter servers at clock %d", rank, min(clocks))
    if len(set(clocks)) > 1:
        log.warning("the servers hold clocks %s for this worker (killed mid-push): going on from the lowest", clocks)
    return min(clocks)


def leave_at_exit(strategy: Any, close: Callable[[Any], None]) -> None:
    """Have `close(strategy)` say goodbye to the servers when the script ends: `shoal.shutdown()`, or
    the interpreter's normal exit. A connection that just closes is a worker's death to the servers,
    and the job's monitor then ends the other workers, perhaps before they finish. An uncaught
    exception (`sys.last_value`) leaves without a goodbye: that worker failed. Best effort: a
    goodbye that fails (the servers gone, shards lost) is logged, not raised over the error that
    ended the script."""
    from shoal import runtime

    def goodbye(live: Any) -> None:
        try:
            close(live)
        except Exception as exc:  # the script is ending anyway, perhaps on the error that caused this
            log.info("no goodbye to the parameter servers: %s", exc)

    runtime.release_before_shutdown(strategy, goodbye)
    ref = weakref.ref(strategy)

    def at_exit() -> None:
        live = ref()
        if live is not None and getattr(sys, "last_value", None) is None:
            goodbye(live)

    atexit.register(at_exit)
