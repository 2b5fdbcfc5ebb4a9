"""One parameter-server process: the replicas it holds, published, linked and served in one loop.

Unreplicated, a process holds one shard. With replication 2 (`shoal.ps.replication`),
process p of S holds the primary of shard p and the backup of shard p - 1, so each shard
lives in two processes (on two machines when the launchers spread servers round-robin)
and no process is idle. One loop, one thread: every replica's messages are handled in
one order, and the process exits when none of its replicas serves any more (a fenced
one gave its shard up) or when its launcher is gone: silently, as a killed process, when
a supervisor starts the launcher again (`shoal.launch.supervisor`: its replacement
becomes the shards' backup again) or when every shard it holds has its other copy
elsewhere (which takes it over; a server node's launcher, say); else telling its
workers, since a shard of the job would be lost with it.

Start with `python -m shoal.ps.process` (`shoal.ps.servers` does); the environment
names the process's index, the job's store and its limits.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import sys
import time
from datetime import timedelta
from typing import NamedTuple

import torch
import zmq

from shoal import env, logs
from shoal.allocator import keep_freed_memory
from shoal.comm.pubsub import Publisher
from shoal.comm.wire import Codec, job_key
from shoal.errors import ConfigError, ShoalError
from shoal.ps import optim
from shoal.ps import store as ps_store
from shoal.ps.records import Records, open_records
from shoal.ps.replacement import Joining
from shoal.ps.replication import BACKUP, PRIMARY, BackupLink, Claim, PrimaryLink
from shoal.ps.server import Server
from shoal.ps.servers import max_connections, server_limits

log = logging.getLogger("shoal.ps.process")


class _Job(NamedTuple):
    """What every server process of a job reads from its environment and the job's store at start."""

    process: int
    host: str
    advertise: str
    store: ps_store.SignedStore
    count: int
    replication: int
    records: Records
    events: Publisher | None
    timeout_s: float


def _job(environ: dict[str, str] | os._Environ, codec: Codec, timeout_s: float) -> _Job:
    store = ps_store.connect(environ[env.PS_STORE], timeout_s=60)
    return _Job(
        process=int(environ[env.PS_INDEX]),
        host=environ.get(env.PS_HOST, "127.0.0.1"),
        advertise=environ.get(env.PS_ADVERTISE, ""),
        store=store,
        count=int(store.get(ps_store.SERVER_COUNT_KEY)),
        replication=ps_store.read_replication(store),
        records=open_records(store, environ),
        events=Publisher(environ[env.PS_EVENTS], codec) if environ.get(env.PS_EVENTS) else None,
        timeout_s=timeout_s,
    )


def open_replicas(job: _Job, codec: Codec) -> list[Server]:
    """This process's replicas, bound, published in the store, and linked to their other halves."""
    process, host, advertise, store, count, replication, records, events, timeout_s = job
    replicas = []
    for shard, role in ps_store.replicas(count, replication, process):
        records.create(shard, count, replication)  # before the addresses: a worker that sees them finds it
        server = Server(shard, codec, host, timeout_s, advertise, role=role, process=process)
        address = ps_store.ServerAddress(server.endpoint, shard, server.session)
        if role == PRIMARY:
            server.events = events
            store.set(ps_store.server_key(shard), address.value)
        else:
            server.quiet_events = events
            server.link = BackupLink(server.ctx, codec, host, advertise, shard)
            store.set(ps_store.link_key(shard), server.link.address.value)
            store.set(ps_store.backup_key(shard), address.value)
        replicas.append(server)
    for server in replicas:
        if replication > 1 and count > 1:
            server.claim = Claim(records, server.index, records.get(server.index))
        if server.role == PRIMARY and server.claim is not None:
            key = ps_store.link_key(server.index)
            store.wait([key], timedelta(seconds=timeout_s))
            backup = ps_store.ServerAddress.parse(server.index, store.get(key))
            server.link = PrimaryLink(server.ctx, codec, backup, server.out_now)
    return replicas


def open_replacement(job: _Job, codec: Codec) -> list[Server]:
    """A process started in place of one that exited: a backup replica of each shard that process held,
    joining its primary (`shoal.ps.replacement`); or, if the one it replaces never published its
    address (it died starting), the process it should have been."""
    process, host, advertise, store, count, replication, records, events, timeout_s = job
    if not store.raw.check([ps_store.server_key(process)]):  # nothing was served yet: nothing to take back
        return open_replicas(job, codec)
    replicas = []
    for shard, _ in ps_store.replicas(count, replication, process):
        record = _left_alone(records, shard, process, timeout_s)
        if record is None:
            continue
        server = Server(shard, codec, host, timeout_s, advertise, role=BACKUP, process=process)
        server.quiet_events = events
        server.link = BackupLink(server.ctx, codec, host, advertise, shard)
        store.set(
            ps_store.slot_key(shard, process), ps_store.ServerAddress(server.endpoint, shard, server.session).value
        )
        primary = ps_store.ServerAddress.parse(shard, store.get(ps_store.slot_key(shard, record.primary)))
        first = ps_store.first_record(shard, count, replication)  # the shard's two processes
        holders = frozenset(p for p in (first.primary, first.backup) if p is not None)
        server.joining = Joining(server, records, primary, holders)
        replicas.append(server)
    return replicas


def _left_alone(records: Records, shard: int, process: int, timeout_s: float) -> ps_store.ShardRecord | None:
    """The shard's record once another process holds it alone (the survivor claimed it), or None if
    that does not happen within `timeout_s` or another process backs it already."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            record = records.get(shard)
        except ShoalError as err:  # the control plane between leaders, say: ask again
            log.warning("shard %d: cannot read its record yet: %s", shard, err)
            time.sleep(0.5)
            continue
        if record.primary != process and record.backup is None:
            return record
        if record.backup not in (None, process) and record.primary != process:
            return None
        time.sleep(0.1)
    log.warning("shard %d: no survivor claimed it within %gs; process %d does not hold it", shard, timeout_s, process)
    return None


def serve(replicas: list[Server]) -> int:
    """Run the replicas until none serves; 1 if one stopped the job, else 0."""
    parent = os.getppid()
    poller = zmq.Poller()
    registered: set[zmq.Socket] = set()
    while not all(r.done for r in replicas):
        live = [r for r in replicas if not r.done]
        sockets = {s for r in live for s in r.sockets()}
        for sock in registered - sockets:
            poller.unregister(sock)
        for sock in sockets - registered:
            poller.register(sock, zmq.POLLIN)
        registered = sockets
        readable = {sock for sock, _ in poller.poll(50)}
        for r in live:
            r.step(readable)
        if os.getppid() != parent:  # the launcher is gone: do not linger
            if os.environ.get(env.SUPERVISED) or all(r.link is not None for r in live):
                # it comes back (a replacement follows), or every shard here has its other copy, which
                # takes it over: go as a killed process, and the job goes on
                os.kill(os.getpid(), signal.SIGKILL)
            for r in live:
                r.fail("the process that started this server exited")
    for sock in registered:
        poller.unregister(sock)
    for r in replicas:
        r.close()
    return 1 if any(r.error for r in replicas) else 0


def cap_connections(environ: dict[str, str] | os._Environ) -> int:
    """Cap this process's open files, whatever the launcher's limit: ZeroMQ accepts no connection
    beyond it (it waits and retries, and serves the connections it has), so strangers who open
    connections faster than the 5 s handshake limit closes them hold at most about 8 KB each of
    this many. A job's own connections: one per worker and per link. The cap applied."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    cap = max_connections(environ)
    cap = cap if hard == resource.RLIM_INFINITY else min(cap, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (cap, hard))
    return cap


def main() -> int:
    """Entry point: reads the job's environment, opens this process's replicas, serves."""
    logs.setup()
    environ = os.environ
    torch.set_num_threads(int(environ.get(env.PS_THREADS, "1")))
    try:
        keep_freed_memory()  # each clock's buffers reused, not mapped afresh
        max_bytes, timeout_s = server_limits(environ)
        cap_connections(environ)
    except ConfigError as err:
        print(f"shoal: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    # torch imports its compiler stack on the first optimizer: pay for it before serving
    optim.build("SGD", torch.zeros(1), {"lr": 0.1})
    codec = Codec(job_key(), max_bytes)
    opened = open_replacement if environ.get(env.PS_REPLACEMENT) else open_replicas
    return serve(opened(_job(environ, codec, timeout_s), codec))


if __name__ == "__main__":
    sys.exit(main())
