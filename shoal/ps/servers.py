"""Start and stop a job's parameter-server processes: what a launcher calls.

    with serving(2, job_key) as ps_env:         # SHOAL_PS_STORE, SHOAL_JOB_KEY, SHOAL_PS_EVENTS
        ...run the workers with ps_env...       # the servers are stopped when the block ends

`start_servers` is the lower level (tests use it): it returns a
`ServerGroup` to stop in a `finally`. Servers find each other and workers
find them through the rendezvous store (`shoal.ps.store`). On one machine
the store is hosted here; across machines, machine k of M starts servers k,
k + M, k + 2M, ... of the job's S, which bind every interface and publish
the address by which this machine reaches machine 0 (or SHOAL_PS_ADVERTISE).
With H server nodes (machines that run servers and no workers) the workers'
machines start none and server node j starts servers j, j + H, ...
(`serve_only`), until machine 0's launcher writes that the workers ended.
Servers are children of the launcher on their machine, stopped by pid
(SIGTERM, then SIGKILL), and they exit by themselves if it dies. With
replicated shards the launcher starts a process again in place of one that
was killed or fenced, which becomes its shards' backup again
(`shoal.ps.replacement`); a launcher that its supervisor started again
(`shoal.launch.supervisor`, machines other than 0) starts all of its share
that way, its predecessor's processes having gone with it.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from shoal import env, supervised
from shoal.comm.netif import address_towards
from shoal.config import split_endpoint
from shoal.errors import ConfigError, ShoalError, WorkerError, first_line
from shoal.ps import store as ps_store
from shoal.ps.records import read_shards
from shoal.respawn import Respawner

DEFAULT_MAX_BYTES = 1 << 30


def replication_for(count: int, asked: int | None = None) -> int:
    """How many processes hold each shard: `asked`, else 2 when there are at least 2 servers
    (`shoal.ps.replication`); ConfigError for a value that cannot be."""
    if asked is None:
        return 2 if count >= 2 else 1
    if asked not in (1, 2):
        raise ConfigError(f"--replication must be 1 or 2, not {asked}", "replication")
    if asked > count:
        raise ConfigError(
            f"--replication {asked} needs at least {asked} servers (each shard's copies live in different "
            f"processes); start --servers {asked} or more, or --replication 1"
        )
    return asked


DEFAULT_TIMEOUT_S = 60.0
MAX_CONNECTIONS = 1024
"""The default cap on a server process's open files, so on its connections (`SHOAL_PS_MAX_CONNECTIONS`)."""


def max_connections(environ: Mapping[str, str]) -> int:
    """`SHOAL_PS_MAX_CONNECTIONS`, or the default; ConfigError (one sentence) for a bad value."""
    text = environ.get(env.PS_MAX_CONNECTIONS, str(MAX_CONNECTIONS)).strip()
    if not text.isdigit() or int(text) < 64:
        name = env.PS_MAX_CONNECTIONS
        raise ConfigError(f"{name} must be a whole number >= 64, not {text!r}", name)
    return int(text)


def server_limits(environ: Mapping[str, str]) -> tuple[int, float]:
    """The servers' message-size ceiling and join timeout from `SHOAL_PS_MAX_BYTES` and
    `SHOAL_PS_TIMEOUT_S`; ConfigError (one sentence naming the variable) for a bad value.

    The ceiling is what ZeroMQ admits before anything is authenticated; the
    workers' `max_message_mb` governs below it once they have joined.
    """
    raw = environ.get(env.PS_MAX_BYTES, str(DEFAULT_MAX_BYTES)).strip()
    if not raw.isdigit() or not 1 <= int(raw) <= 1 << 62:
        raise ConfigError(f"{env.PS_MAX_BYTES} must be a whole number of bytes >= 1, not {raw!r}", env.PS_MAX_BYTES)
    text = environ.get(env.PS_TIMEOUT_S, str(DEFAULT_TIMEOUT_S)).strip()
    try:
        timeout_s = float(text)
    except ValueError:
        timeout_s = math.nan
    if not math.isfinite(timeout_s) or timeout_s <= 0:
        raise ConfigError(f"{env.PS_TIMEOUT_S} must be a finite number of seconds > 0, not {text!r}", env.PS_TIMEOUT_S)
    return int(raw), timeout_s


MAX_REPLACEMENTS = 3
"""How many times a launcher starts a replicated server process again in place of one that exited."""
REPLACEMENT_MARK = "--- shoal: a replacement process from here on:"
"""The line a server's log gets before its replacement's output."""


@dataclass
class ServerGroup:
    procs: list[subprocess.Popen]
    store: ps_store.SignedStore
    address: str
    job_key: str
    env: dict[str, str] = field(default_factory=dict)
    """What workers need: the store address, the session and the job key."""
    starts: list[tuple[int, dict[str, str], str | None]] = field(default_factory=list)
    """Per process: its index, environment and log file, to start it again."""
    on_start: Callable[[subprocess.Popen], None] | None = None
    """Called with each replacement process (tests adopt its pid)."""
    respawner: Respawner | None = None
    """Replicated: what starts an exited process again (`replace_exited`)."""

    def replace_exited(self) -> None:
        """Start a process again in place of one that was killed, or that gave its shards up (exit 0: it
        was fenced), while the job runs, at most MAX_REPLACEMENTS times per index: it rejoins its shards
        as their backup (`shoal.ps.replacement`). Code > 0: it stopped the job itself (a bad start, an
        error it sent the workers), and is left."""

        def why(i: int, code: int) -> str | None:
            if code > 0:
                return None
            how = f"was killed by signal {-code}" if code < 0 else "gave its shards up (it was fenced)"
            return f"parameter server process {self.starts[i][0]} {how}; starting a replacement in its place"

        self.respawner = Respawner(self.procs, self._replace, why, MAX_REPLACEMENTS, "shoal-ps-replace")

    @property
    def replaced(self) -> list[int]:
        """How many times each process was replaced."""
        return [self.respawner.count[i] if self.respawner else 0 for i in range(len(self.procs))]

    def _replace(self, i: int, count: int) -> subprocess.Popen:
        index, start_env, log_path = self.starts[i]
        mark = f"{count} of {MAX_REPLACEMENTS}"
        proc = _start_server({**start_env, env.PS_REPLACEMENT: str(count)}, log_path, mark)
        supervised.tell(f"server{index}", proc.pid)
        if self.on_start is not None:
            self.on_start(proc)
        return proc

    def endpoints(self, timeout_s: float = 60.0) -> list[ps_store.ServerAddress]:
        """Every shard's current primary's address and session (this machine's and the others')."""
        shards = self.shards(timeout_s)
        return [s.replicas[s.current] for s in shards]

    def shards(self, timeout_s: float = 60.0) -> list[ps_store.Shard]:
        """Every shard's replicas and record, as the workers read them."""
        count = int(self.store.get(ps_store.SERVER_COUNT_KEY))
        return read_shards(self.store, count, timeout_s, {**os.environ, **self.env})

    def poll(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def stop(self, grace_s: float = 5.0) -> list[int]:
        """Stop every server (by pid); their exit codes."""
        if self.respawner is not None:
            self.respawner.close()
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        return [p.returncode for p in self.procs]


@dataclass(frozen=True)
class Machines:
    """Where a job runs: `nnodes` workers' machines (this one `node_rank`), their rendezvous
    endpoint, and `server_nodes` more machines that run only servers."""

    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str = ""
    server_nodes: int = 0


@dataclass
class Share:
    """This machine's share of a job on several machines: which servers it
    starts, the job's store, and how its servers are bound and reached."""

    store: ps_store.SignedStore
    address: str
    """HOST:PORT of the store, for servers and workers."""
    indices: list[int]
    host: str = "0.0.0.0"
    """The interface servers bind (every one: other machines reach them)."""
    advertise: str = ""
    """The address servers publish (how other machines reach this one)."""


def start_servers(
    count: int,
    job_key: str,
    host: str = "127.0.0.1",
    timeout_s: float = 60.0,
    extra_env: dict[str, str] | None = None,
    log_dir: str | None = None,
    share: Share | None = None,
    replication: int | None = None,
) -> ServerGroup:
    """Start the job's `count` servers on `host` with a store of their own, or,
    with `share`, this machine's share of them (whose store holds the replication).
    Replicated, a process that exits is started again (`ServerGroup.replace_exited`)."""
    if count < 1:
        raise ShoalError(f"--servers must be >= 1, not {count}")
    server_limits({**os.environ, **(extra_env or {})})  # a bad value stops here, before any process starts
    max_connections({**os.environ, **(extra_env or {})})
    again = os.environ.get(env.RELAUNCHED, "") if share is not None else ""  # a machine's launcher, started again
    if share is None:
        replicas = replication_for(count, replication)
        store, address = ps_store.open_local_store(host, count, timeout_s, job_key.encode(), replicas)
        share = Share(store, address, list(range(count)), host)
    workers_env = {env.PS_STORE: share.address, env.PS_SESSION: share.store.session, env.JOB_KEY: job_key}
    if (extra_env or {}).get(env.CONTROL):  # the shards' records live there (`shoal.ps.records`)
        workers_env[env.CONTROL] = (extra_env or {})[env.CONTROL]
    if again and share.indices:
        print(
            f"shoal: parameter server process(es) {', '.join(map(str, share.indices))} of this machine start as "
            "replacements: this launcher was started again",
            file=sys.stderr,
            flush=True,
        )
    procs, starts = [], []
    for i in share.indices:
        server_env = {
            **os.environ,
            **(extra_env or {}),
            **workers_env,
            env.PS_INDEX: str(i),
            env.PS_HOST: share.host,
            "PYTHONUNBUFFERED": "1",
        }
        if share.advertise:
            server_env[env.PS_ADVERTISE] = share.advertise
        if again:  # its predecessor's processes were killed with it (`shoal.launch.supervisor`)
            server_env[env.PS_REPLACEMENT] = again
        log_path = os.path.join(log_dir, f"server{i}.log") if log_dir else None
        procs.append(_start_server(server_env, log_path, f"the launcher started again ({again})" if again else ""))
        supervised.tell(f"server{i}", procs[-1].pid)
        starts.append((i, server_env, log_path))
    group = ServerGroup(procs, share.store, share.address, job_key, workers_env, starts)
    if ps_store.read_replication(share.store) > 1:
        group.replace_exited()
    return group


def _start_server(server_env: dict[str, str], log_path: str | None, replaces: str = "") -> subprocess.Popen:
    """A server process; `replaces`: why it is a replacement, for the line its log gets before its output."""
    argv = [sys.executable, "-m", "shoal.ps.process"]
    if log_path is None:
        return subprocess.Popen(argv, env=server_env)
    with open(log_path, "a" if replaces else "w") as out:  # the child keeps its own copy of the descriptor
        if replaces:  # a replacement's lines follow those of the process it replaces
            out.write(f"{REPLACEMENT_MARK} {replaces}\n")
            out.flush()
        return subprocess.Popen(argv, env=server_env, stdout=out, stderr=subprocess.STDOUT)


def machine_share(
    count: int,
    nnodes: int,
    node_rank: int,
    rdzv_endpoint: str,
    server_nodes: int = 0,
    server_node_rank: int = -1,
    replication: int | None = None,
) -> Share:
    """This machine's share of a job's `count` servers on `nnodes` machines: servers k, k + M, ...
    on machine k of M; with `server_nodes` H machines that run only servers, none on the
    workers' machines and servers j, j + H, ... on server node `server_node_rank` j."""
    key = os.environ.get(env.JOB_KEY, "")
    if not key:
        raise ConfigError(
            "a parameter-server job on several machines needs the same secret on every machine: "
            f"set {env.JOB_KEY} (e.g. to the output of `openssl rand -hex 32`) before `shoal` on each"
        )
    rdzv_host, _ = split_endpoint(rdzv_endpoint)
    if server_node_rank >= 0:
        node_rank, indices = -1, list(range(server_node_rank, count, server_nodes))
    else:
        indices = [] if server_nodes else list(range(node_rank, count, nnodes))
    return Share(
        store=ps_store.open_job_store(
            count,
            nnodes,
            node_rank,
            rdzv_endpoint,
            key.encode(),
            server_nodes=server_nodes,
            replication=replication_for(count, replication),
        ),
        address=rdzv_endpoint,
        indices=indices,
        advertise=os.environ.get(env.PS_ADVERTISE) or address_towards(rdzv_host),
    )


@contextlib.contextmanager
def serving(
    count: int,
    job_key: str,
    log_dir: str | None = None,
    record: str | None = None,
    live: bool = False,
    machines: Machines = Machines(),
    replication: int | None = None,
    control: str = "",
) -> Iterator[dict[str, str]]:
    """`count` servers for the duration of the block; yields the environment workers need.

    What `shoal run --servers S` and `shoal train` (with a strategy whose
    `server_processes()` is > 0) wrap around their worker launch. Servers and
    workers publish events and per-worker metrics to a `Monitor` here, which
    appends them to `record` (JSON lines) and, with `live`, shows a table.
    With `machines.nnodes` > 1 every machine's launcher calls this with the same
    `count` and `rdzv_endpoint`; each starts its share of the servers and
    shows its own machine's rows. With `server_nodes` H > 0 the servers run
    on H more machines (`serve_only` there) and machine 0 tells those when
    its workers have ended. `control`: the job's control plane (`SHOAL_CONTROL`),
    where the shards' records then live (`shoal.ps.records`). On one machine the
    job's sockets are ipc:// in a private directory made here and removed at the
    end (`shoal.comm.ipc`; SHOAL_PS_IPC=0: TCP with CURVE).
    """
    if count <= 0:
        yield {}
        return
    from shoal.comm import ipc
    from shoal.comm.security import Transport
    from shoal.comm.wire import Codec
    from shoal.ps.monitor import Monitor

    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    m = machines
    several = m.nnodes > 1 or m.server_nodes > 0
    replication = replication_for(count, replication)
    share = (
        machine_share(count, m.nnodes, m.node_rank, m.rdzv_endpoint, m.server_nodes, replication=replication)
        if several
        else None
    )
    private = ipc.make_dir() if not several and ipc.enabled() else None  # this job's sockets (`shoal.comm.ipc`)
    try:
        codec = Codec(job_key.encode(), transport=Transport(job_key.encode(), private_dir=private))
        monitor = Monitor(codec, record=record, live=live).start()
    except BaseException:
        ipc.remove(private)
        raise
    events = {
        env.PS_EVENTS: monitor.endpoint,
        **ipc.environ_for(private),
        **({env.CONTROL: control} if control else {}),
    }
    try:
        group = start_servers(count, job_key, log_dir=log_dir, extra_env=events, share=share, replication=replication)
        ended = "failed"
        try:
            yield {**group.env, **events}
            ended = "ok"
        finally:
            if share is not None and m.server_nodes and m.node_rank == 0:
                _announce_end(share.store, ended, m.server_nodes)
            group.stop()
    finally:
        monitor.stop()
        ipc.remove(private)


def serve_only(
    count: int,
    job_key: str,
    server_nodes: int,
    server_node_rank: int,
    rdzv_endpoint: str,
    log_dir: str | None = None,
    record: str | None = None,
    live: bool = False,
) -> None:
    """A machine that runs only servers (`shoal run --server-node-rank J`): its share of the
    job's servers until machine 0's launcher says the workers have ended; ShoalError if they
    failed, if a server failed, or if machine 0's store went away."""
    from shoal.comm.wire import Codec
    from shoal.ps.monitor import Monitor

    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    share = machine_share(count, 1, -1, rdzv_endpoint, server_nodes, server_node_rank)
    monitor = Monitor(Codec(job_key.encode()), record=record, live=live).start()
    try:
        group = start_servers(count, job_key, log_dir=log_dir, extra_env={env.PS_EVENTS: monitor.endpoint}, share=share)
        try:
            ended = _wait_for_end(share.store, group, log_dir)
        finally:
            group.stop()
    finally:
        monitor.stop()
    if ended != "ok":
        raise WorkerError("the job's workers failed (machine 0's launcher says so); see the workers' machines")


def _announce_end(store: ps_store.SignedStore, ended: str, server_nodes: int, wait_s: float = 10.0) -> None:
    """Machine 0: tell the server nodes how the workers ended, and keep the store open until they have read it
    (they look every 0.5 s; at most `wait_s`, for one whose launcher died and that never will)."""
    store.set(ps_store.JOB_END_KEY, ended)
    deadline = time.monotonic() + wait_s
    while store.raw.add(ps_store.JOB_LEFT_KEY, 0) < server_nodes and time.monotonic() < deadline:
        time.sleep(0.1)


def _wait_for_end(store: ps_store.SignedStore, group: ServerGroup, log_dir: str | None) -> str:
    """A server node: wait until machine 0 writes how the workers ended ("ok" or "failed")."""
    while True:
        try:
            if store.raw.check([ps_store.JOB_END_KEY]):
                break
        except Exception as exc:
            raise ShoalError(
                f"machine 0's rendezvous store went away before the job ended ({first_line(str(exc))}); "
                "its launcher probably died: see its output"
            ) from None
        for code in [] if group.respawner is not None else group.poll():  # replicated: exits are replaced
            if code not in (None, 0):
                where = f" (logs in {log_dir})" if log_dir else ""
                raise ShoalError(f"a parameter server on this machine exited with code {code}{where}")
        time.sleep(0.5)
    ended = store.get(ps_store.JOB_END_KEY)
    store.raw.add(ps_store.JOB_LEFT_KEY, 1)
    return ended
