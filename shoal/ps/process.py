"""One parameter-server process: the replicas it holds, published, linked and served in one loop.

Unreplicated, a process holds one shard. With replication 2 (`shoal.ps.replication`),
process p of S holds the primary of shard p and the backup of shard p - 1, so each shard
lives in two processes (on two machines when the launchers spread servers round-robin)
and no process is idle. One loop, one thread: every replica's messages are handled in
one order, and the process exits when none of its replicas serves any more (a fenced
one gave its shard up) or when its launcher is gone.

Start with `python -m shoal.ps.process` (`shoal.ps.servers` does); the environment
names the process's index, the job's store and its limits.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

import torch
import zmq

from shoal import env, logs
from shoal.comm.pubsub import Publisher
from shoal.comm.wire import Codec, job_key
from shoal.errors import ConfigError
from shoal.ps import optim
from shoal.ps import store as ps_store
from shoal.ps.replication import PRIMARY, BackupLink, Claim, PrimaryLink
from shoal.ps.server import Server
from shoal.ps.servers import server_limits


def open_replicas(environ: dict[str, str] | os._Environ, codec: Codec, timeout_s: float) -> list[Server]:
    """This process's replicas, bound, published in the store, and linked to their other halves."""
    process = int(environ[env.PS_INDEX])
    host, advertise = environ.get(env.PS_HOST, "127.0.0.1"), environ.get(env.PS_ADVERTISE, "")
    store = ps_store.connect(environ[env.PS_STORE], timeout_s=60)
    count = int(store.get(ps_store.SERVER_COUNT_KEY))
    replication = ps_store.read_replication(store)
    events = Publisher(environ[env.PS_EVENTS], codec) if environ.get(env.PS_EVENTS) else None
    replicas = []
    for shard, role in ps_store.replicas(count, replication, process):
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
            record = ps_store.ShardRecord.parse(store.get(ps_store.shard_key(server.index)))
            server.claim = Claim(store, server.index, record)
        if server.role == PRIMARY and server.claim is not None:
            key = ps_store.link_key(server.index)
            store.wait([key], timedelta(seconds=timeout_s))
            backup = ps_store.ServerAddress.parse(server.index, store.get(key))
            server.link = PrimaryLink(server.ctx, codec, backup, server.out_now)
    return replicas


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
            for r in live:
                r.fail("the process that started this server exited")
    for sock in registered:
        poller.unregister(sock)
    for r in replicas:
        r.close()
    return 1 if any(r.error for r in replicas) else 0


def main() -> int:
    """Entry point: reads the job's environment, opens this process's replicas, serves."""
    logs.setup()
    environ = os.environ
    torch.set_num_threads(int(environ.get(env.PS_THREADS, "1")))
    # torch imports its compiler stack on the first optimizer: pay for it before serving
    optim.build("SGD", torch.zeros(1), {"lr": 0.1})
    try:
        max_bytes, timeout_s = server_limits(environ)
    except ConfigError as err:
        print(f"shoal: {err}", file=sys.stderr, flush=True)
        return err.exit_code
    return serve(open_replicas(environ, Codec(job_key(), max_bytes), timeout_s))


if __name__ == "__main__":
    sys.exit(main())
