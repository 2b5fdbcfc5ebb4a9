"""The rendezvous store through which a job's parameter servers are found.

A torch `TCPStore` holds these keys, named here and nowhere else:

- `SERVER_COUNT_KEY` (`shoal/ps/servers`): how many servers the job has,
  set by the launcher of machine 0 when it opens the store;
- `server_key(i)` (`shoal/ps/server/<i>`): server i's ZeroMQ endpoint (tcp://,
  or on one machine ipc:// in the job's private directory, `shoal.comm.ipc`) and
  session nonce (`ServerAddress`), set by server i once it is bound; workers
  put the nonce in every request (`shoal.comm.replay`), and learn it here,
  signed, so no stranger can hand them another;
- `REPLICATION_KEY` (`shoal/ps/replication`): how many processes hold each
  server's shard (1 or 2, `shoal.ps.replication`), set with the count;
- `backup_key(i)` and `link_key(i)`: where the backup of shard i takes
  workers' messages (after a takeover) and the primary's forwarded inputs;
- `shard_key(i)`: shard i's `ShardRecord` ("GEN PRIMARY BACKUP", process
  indices), changed only by compare-and-set: who holds the shard, and the
  generation that fences the one that lost it;
- `SESSION_KEY` (`shoal/ps/session`), across machines only: the job's
  session, which machine 0's launcher draws and the others read;
- `SERVER_NODES_KEY` (`shoal/ps/server_nodes`), across machines only: how
  many machines run servers and no workers (`shoal run --server-nodes`);
- `JOB_END_KEY` (`shoal/job/end`) and `JOB_LEFT_KEY` (`shoal/job/left`):
  machine 0's launcher writes how the workers ended, and each server node
  counts itself out before machine 0 closes the store.

Nothing is hard-coded but the store's own address, which the launcher hands
to servers and workers in SHOAL_PS_STORE. On one machine the launcher hosts
the store on a free port; across machines it is the job's rendezvous store
on `--rdzv-endpoint`, hosted by machine 0's launcher before torch's static
rendezvous, which shares it (`multi_tenant`).

A TCPStore has no credentials, so anyone who reaches it can rewrite a key:
it listens only where asked, and every value shoal writes is signed with the
job key (`shoal.comm.signed_store`). The session (SHOAL_PS_SESSION, drawn by the
launcher for each job) makes a value recorded in an earlier run with the
same SHOAL_JOB_KEY fail too; across machines, machines other than 0 learn
the session from the store, so for them that holds only with a fresh
SHOAL_JOB_KEY per run.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from datetime import timedelta
from typing import NamedTuple

from torch.distributed import TCPStore  # pyright: ignore[reportPrivateImportUsage] -- documented, not in torch's stubs

from shoal import env
from shoal.comm import ipc
from shoal.comm.security import check_same_curve, curve_flag
from shoal.comm.signed_store import SignedStore as SignedStore  # re-exported: the PS modules use it from here
from shoal.comm.signed_store import listen, open_shared
from shoal.config import split_endpoint
from shoal.errors import ConfigError, ShoalError, first_line

SERVER_COUNT_KEY = "shoal/ps/servers"
"""How many servers the job has."""
REPLICATION_KEY = "shoal/ps/replication"
"""How many processes hold each shard (1: none is replicated)."""
SESSION_KEY = "shoal/ps/session"
"""The job's session, for the machines that did not draw it."""
SERVER_NODES_KEY = "shoal/ps/server_nodes"
"""How many machines of the job run only servers."""
JOB_END_KEY = "shoal/job/end"
"""How the job's workers ended ("ok" or "failed"), for machines that run only servers."""
JOB_LEFT_KEY = "shoal/job/left"
"""A counter: server nodes that have read JOB_END_KEY (machine 0 waits for them before closing the store)."""


class ServerAddress(NamedTuple):
    """Where server `index` listens, and its session nonce (fresh per server process)."""

    endpoint: str
    index: int
    session: str

    @property
    def value(self) -> str:
        """What the server stores under `server_key(index)`, with its SHOAL_CURVE (see `parse`)."""
        return f"{self.endpoint} {self.session} {curve_flag()}"

    @property
    def header(self) -> dict:
        """What every signed request to this server carries (see `shoal.comm.replay`)."""
        return {"to": self.index, "session": self.session}

    @classmethod
    def parse(cls, index: int, value: str, environ: Mapping[str, str] | None = None) -> ServerAddress:
        """The address server `index` published; a SHOAL_CURVE or transport unlike this process's
        (`environ`'s) stops here, in one sentence, rather than as a connection that never comes up, and
        so does an endpoint outside this job's private directory (`shoal.comm.ipc`), or not tcp://."""
        endpoint, session, flag = [*value.split(" ", 2), "", ""][:3]
        if not endpoint or not session:
            raise ShoalError(f"parameter server {index} published no session with its endpoint {endpoint!r}")
        if flag:
            check_same_curve(flag, f"parameter server {index}", environ)
        ipc.check_endpoint(endpoint, ipc.job_dir(environ), f"parameter server {index}")
        return cls(endpoint, index, session)


def server_key(index: int) -> str:
    """The key under which server `index` publishes its endpoint."""
    return f"shoal/ps/server/{index}"


def backup_key(index: int) -> str:
    """Where the backup of shard `index` takes workers' messages once it is primary."""
    return f"shoal/ps/backup/{index}"


def slot_key(shard: int, process: int) -> str:
    """Where process `process` publishes its replica of `shard` for the workers: the primary's key if it
    is the shard's first primary (process `shard`), else the backup's. A replacement overwrites its slot."""
    return server_key(shard) if process == shard else backup_key(shard)


def link_key(index: int) -> str:
    """Where the backup of shard `index` takes the inputs its primary forwards."""
    return f"shoal/ps/link/{index}"


def shard_key(index: int) -> str:
    """Shard `index`'s `ShardRecord`."""
    return f"shoal/ps/shard/{index}"


class ShardRecord(NamedTuple):
    """Who holds a shard: its generation, the primary's process index and the backup's (None: no backup)."""

    gen: int
    primary: int
    backup: int | None

    @property
    def value(self) -> str:
        return f"{self.gen} {self.primary} {'-' if self.backup is None else self.backup}"

    @classmethod
    def parse(cls, value: str) -> ShardRecord:
        try:
            gen, primary, backup = value.split()
            return cls(int(gen), int(primary), None if backup == "-" else int(backup))
        except ValueError:
            raise ShoalError(f"a parameter-server shard record reads {value!r}, not 'GEN PRIMARY BACKUP'") from None


def replicas(count: int, replication: int, process: int) -> list[tuple[int, str]]:
    """The (shard, role) pairs process `process` of `count` holds: the primary of its own shard and,
    replicated, the backup of the shard before it (on another process, and another machine when
    servers are spread over machines round-robin)."""
    held = [(process, "primary")]
    if replication > 1 and count > 1:
        held.append(((process - 1) % count, "backup"))
    return held


def first_record(shard: int, count: int, replication: int) -> ShardRecord:
    """A shard's record when the job starts."""
    return ShardRecord(1, shard, (shard + 1) % count if replication > 1 and count > 1 else None)


def publish_layout(store: SignedStore, count: int, replication: int) -> None:
    """What the launcher that opens the store writes first: the server count, the replication
    and each shard's first record (so no server races another to create one)."""
    replication = min(replication, count)
    store.set(SERVER_COUNT_KEY, str(count))
    store.set(REPLICATION_KEY, str(replication))
    for i in range(count):
        store.set(shard_key(i), first_record(i, count, replication).value)


def open_local_store(
    host: str, count: int, timeout_s: float, key: bytes, replication: int = 1
) -> tuple[SignedStore, str]:
    """A store for a job on this machine, on a free port of `host` and no other interface; (store, its HOST:PORT)."""
    try:
        raw = listen(host, 0, timeout_s)
    except (OSError, RuntimeError) as exc:
        raise ShoalError(f"could not open the parameter-server rendezvous store on {host}: {exc}") from None
    address = f"{host}:{raw.port}"
    store = SignedStore(raw, key, secrets.token_hex(16), address)
    publish_layout(store, count, replication)
    return store, address


def open_job_store(
    count: int,
    nnodes: int,
    node_rank: int,
    rdzv_endpoint: str,
    key: bytes,
    timeout_s: float = 300.0,
    server_nodes: int = 0,
    replication: int = 1,
) -> SignedStore:
    """The job's rendezvous store across machines (machine 0 hosts it, on the endpoint's address only;
    `node_rank` -1: a machine that runs only servers); checks that every machine asks for the same
    number of servers and of server nodes."""
    host, port = split_endpoint(rdzv_endpoint)
    try:
        hosting = node_rank == 0  # machine 0 hosts it, and torch's static rendezvous shares it
        store = open_shared(host, port, key, hosting, timeout_s, SESSION_KEY)
        if node_rank == 0:
            publish_layout(store, count, replication)
            store.set(SERVER_NODES_KEY, str(server_nodes))
            return store
        asked = int(store.get(SERVER_COUNT_KEY))
        asked_nodes = int(store.get(SERVER_NODES_KEY))
    except ShoalError:
        raise
    except Exception as exc:
        why = first_line(str(exc)) or type(exc).__name__
        if node_rank == 0:
            raise ShoalError(
                f"cannot open the job's rendezvous store on {host}:{port} ({why}); is the port in use, or is "
                f"{host} not an address of this machine? choose another --rdzv-endpoint port on every machine, "
                "or give machine 0's own address"
            ) from None
        raise ShoalError(
            f"cannot reach the job's rendezvous store at {rdzv_endpoint} ({why}); is machine 0's launcher running?"
        ) from None
    if asked != count:
        raise ConfigError(
            f"machine 0 started the job with --servers {asked}, this machine with {count}; "
            "pass the same --servers on every machine"
        )
    if asked_nodes != server_nodes:
        raise ConfigError(
            f"machine 0 started the job with --server-nodes {asked_nodes}, this machine with {server_nodes}; "
            "pass the same --server-nodes on every machine"
        )
    return store


def connect(address: str, timeout_s: float) -> SignedStore:
    """A client of the store at `address` (HOST:PORT, as in SHOAL_PS_STORE), signing and checking
    with the job key and session of this process's environment."""
    from shoal.comm.wire import job_key

    host, port = split_endpoint(address, what=env.PS_STORE, key=env.PS_STORE)
    session = os.environ.get(env.PS_SESSION, "")
    if not session:
        raise ShoalError(
            f"{env.PS_STORE} is set but {env.PS_SESSION} is not; start servers and workers with "
            "`shoal run --servers S` or `shoal train`, which set both"
        )
    raw = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    return SignedStore(raw, job_key(), session, address)


def read_endpoints(store: SignedStore, count: int, timeout_s: float) -> list[ServerAddress]:
    """Every server's address, once all `count` have published theirs; ShoalError for one not signed by the job."""
    keys = [server_key(i) for i in range(count)]
    wait_published(store, keys, count, timeout_s)
    return [ServerAddress.parse(i, store.get(k)) for i, k in enumerate(keys)]


def wait_published(store: SignedStore, keys: list[str], count: int, timeout_s: float) -> None:
    said = f"the {count} parameter server(s) did not publish their addresses within {timeout_s:.0f}s"
    store.wait_or_say(keys, timeout_s, f"{said}; see the servers' logs")


class Shard(NamedTuple):
    """Where a shard's replicas listen (the primary's process first, then the backup's) and who holds it now."""

    replicas: list[ServerAddress]
    record: ShardRecord

    @property
    def current(self) -> int:
        """The position in `replicas` of the replica that is primary now."""
        return 0 if self.record.primary == self.replicas[0].index or len(self.replicas) == 1 else 1


def read_replication(store: SignedStore) -> int:
    """How many processes hold each shard (1 where the launcher wrote no replication)."""
    return int(store.get(REPLICATION_KEY)) if store.raw.check([REPLICATION_KEY]) else 1


def connect_store(timeout_s: float = 60.0) -> tuple[SignedStore, int]:
    """The job's parameter-server store, from SHOAL_PS_STORE; (store, server count)."""
    address = os.environ.get(env.PS_STORE, "")
    if not address:
        raise ShoalError(
            "the parameter_server strategy needs server processes: start the script with "
            "`shoal run -n N --servers S script.py`, or `shoal train` with strategy.name = 'parameter_server'"
        )
    try:
        store = connect(address, timeout_s)
        count = int(store.get(SERVER_COUNT_KEY))
    except ShoalError:
        raise
    except Exception as exc:
        raise ShoalError(
            f"cannot reach the parameter-server store at {address} ({exc}); is the launcher still running?"
        ) from None
    return store, count
