"""The parameter server's messages, named once: op names and the observer id.

Every message is a `shoal.comm.wire` message whose header has `op`, `src`
(the sender's worker rank, or `OBSERVER`) and, from workers, `seq` (per
sender, increasing; a replayed or reordered one is dropped).

Worker to server: `INIT` (join; worker 0 also sends the initial values),
`PUSH` (one clock's gradients), `PULL` (the parameters for a clock),
`STATE` (values and optimizer state at a clock, for a checkpoint),
`RESTORE` (worker 0, before any push: put a checkpoint back), `BYE` (answered
with `BYE`: the worker closes its connection only then).
Server to worker: `PARAMS` (answers `INIT` and `PULL`), `STATE`, `RESTORED`,
`ERROR` (the server stopped the job, or this process was declared dead;
`message` says why), `PING` (a liveness probe the worker ignores, see
`shoal.ps.membership`). An `INIT` carries the worker process's random
`incarnation`; one from a new incarnation of a worker that already joined is a
rejoin, answered with `PARAMS` for the clock the server holds for it.
Replicated shards (`shoal.ps.replication`): primary to backup `REPLICATE`
(one or more inputs in order, each one's frames after the header that lists
them), backup to primary `ACK`; a
promoted backup to every worker `TAKEOVER` (with the shard's new `gen`). A
reply to a worker's request names the request's `seq` in `re`; a worker
resending after a takeover marks the message `resend`. A replacement process
(`shoal.ps.replacement`) asks a primary left alone to take it as backup
(`ADD_BACKUP`, as `OBSERVER`); the primary sends it its state over the link and
tells every worker where the new backup listens (`NEW_BACKUP`, with the new `gen`).
Anyone to server: `STATS` (read-only counters and parameters), answered with
`STATS`; tools and tests send it as `OBSERVER`.
"""

from __future__ import annotations

from typing import TypeGuard

OBSERVER = -1
"""The `src` of read-only requests (stats) from tools and tests."""
REPLICA = -2
"""The `src` of a primary's messages to its backup."""

INIT = "init"
PUSH = "push"
PULL = "pull"
STATE = "state"
RESTORE = "restore"
BYE = "bye"
STATS = "stats"
PARAMS = "params"
RESTORED = "restored"
ERROR = "error"
PING = "ping"
REPLICATE = "replicate"
ACK = "ack"
TAKEOVER = "takeover"
ADD_BACKUP = "add_backup"
NEW_BACKUP = "new_backup"


def whole(value: object) -> TypeGuard[int]:
    """A header field that must be an integer (JSON-like decoding gives bools too, which are not)."""
    return isinstance(value, int) and not isinstance(value, bool)
