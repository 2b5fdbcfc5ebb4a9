"""Start a job's parameter-server processes: the one function a launcher calls.

    servers = start_servers(2, job_key)        # before the workers start
    env = {**worker_env, **servers.env}        # SHOAL_PS_STORE, SHOAL_JOB_KEY
    ...run the workers...
    servers.stop()                             # always, in a finally

Discovery goes through a rendezvous store (torch's TCPStore): each server
binds a random port and publishes its ZeroMQ endpoint under
`shoal/ps/server/<i>`; workers read the keys. Nothing is hard-coded but the
store's own address, which the launcher hands out. On one machine the store
is hosted here, on a free port. Across machines it is the job's rendezvous
store: machine 0's launcher opens it on `--rdzv-endpoint` before torch's
static rendezvous, which shares it (`multi_tenant`), every other machine's
launcher connects to it, and machine k starts servers k, k + M, k + 2M, ...
of the job's S, which bind every interface and publish the address by which
this machine reaches machine 0 (or SHOAL_PS_ADVERTISE). Servers are children of the launcher on
their machine, stopped by pid (SIGTERM, then SIGKILL), and they exit by
themselves if it dies.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

from shoal.config import split_endpoint
from shoal.errors import ConfigError, ShoalError, first_line

STORE_ENV = "SHOAL_PS_STORE"


@dataclass
class ServerGroup:
    procs: list[subprocess.Popen]
    store: object
    address: str
    job_key: str
    env: dict[str, str] = field(default_factory=dict)
    """What workers need: the store address, the server count and the job key."""

    def endpoints(self, timeout_s: float = 60.0) -> list[str]:
        """Every server's endpoint (this machine's and the others')."""
        return read_endpoints(self.store, int(self.store.get("shoal/ps/servers")), timeout_s)

    def poll(self) -> list[int | None]:
        return [p.poll() for p in self.procs]

    def stop(self, grace_s: float = 5.0) -> list[int]:
        """Stop every server (by pid); their exit codes."""
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

    def wait(self, timeout_s: float) -> list[int | None]:
        """Wait for the servers to exit by themselves (after every worker said goodbye)."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            try:
                p.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        return self.poll()


def start_servers(
    count: int,
    job_key: str,
    host: str = "127.0.0.1",
    timeout_s: float = 60.0,
    extra_env: dict[str, str] | None = None,
    log_dir: str | None = None,
    store=None,
    address: str = "",
    indices: list[int] | None = None,
    advertise: str = "",
) -> ServerGroup:
    """Start servers `indices` (default: all `count`) of a job, and the store through
    which workers find them unless one is given with its `address`."""
    from torch.distributed import TCPStore

    if count < 1:
        raise ShoalError(f"--servers must be >= 1, not {count}")
    if store is None:
        try:
            store = TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
        except RuntimeError as exc:
            raise ShoalError(f"could not open the parameter-server rendezvous store on {host}: {exc}") from None
        address = f"{host}:{store.port}"
        store.set("shoal/ps/servers", str(count))
    env = {STORE_ENV: address, "SHOAL_JOB_KEY": job_key}
    procs = []
    for i in range(count) if indices is None else indices:
        penv = {
            **os.environ,
            **(extra_env or {}),
            **env,
            "SHOAL_PS_INDEX": str(i),
            "SHOAL_PS_HOST": host,
            "PYTHONUNBUFFERED": "1",
        }
        if advertise:
            penv["SHOAL_PS_ADVERTISE"] = advertise
        out = open(os.path.join(log_dir, f"server{i}.log"), "w") if log_dir else None
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "shoal.ps.server"],
                env=penv,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
        )
        if out:
            out.close()
    return ServerGroup(procs, store, address, job_key, env)


def open_job_store(count: int, nnodes: int, node_rank: int, rdzv_endpoint: str, timeout_s: float = 300.0):
    """The job's rendezvous store across machines (machine 0 hosts it); checks that
    every machine asks for the same number of servers."""
    from torch.distributed import TCPStore

    host, port = split_endpoint(rdzv_endpoint)
    try:
        if node_rank == 0:
            store = TCPStore(
                host,
                port,
                is_master=True,
                multi_tenant=True,
                wait_for_workers=False,
                timeout=timedelta(seconds=timeout_s),
            )
            store.set("shoal/ps/servers", str(count))
        else:
            store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
            asked = int(store.get("shoal/ps/servers"))
    except Exception as exc:
        if node_rank == 0:
            raise ShoalError(
                f"cannot open the job's rendezvous store on port {port} ({first_line(str(exc)) or type(exc).__name__}); is the port in use? choose another --rdzv-endpoint port on every machine"
            ) from None
        raise ShoalError(
            f"cannot reach the job's rendezvous store at {rdzv_endpoint} ({first_line(str(exc)) or type(exc).__name__}); is machine 0's launcher running?"
        ) from None
    if node_rank and asked != count:
        raise ConfigError(
            f"machine 0 started the job with --servers {asked}, this machine with {count}; pass the same --servers on every machine"
        )
    return store


def local_address_towards(host: str) -> str:
    """This machine's address on the route to `host` (how other machines reach it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # no packet is sent: this only picks the route
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


@contextlib.contextmanager
def serving(
    count: int,
    job_key: str,
    log_dir: str | None = None,
    host: str = "127.0.0.1",
    record: str | None = None,
    live: bool = False,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str = "",
):
    """`count` servers for the duration of the block; yields the environment workers need.

    What `shoal run --servers S` and `shoal train` (with a strategy whose
    `server_processes()` is > 0) wrap around their worker launch. Servers and
    workers publish events and per-worker metrics to a `Monitor` here, which
    appends them to `record` (JSON lines) and, with `live`, shows a table.
    With `nnodes` > 1 every machine's launcher calls this with the same
    `count` and `rdzv_endpoint`; each starts its share of the servers and
    shows its own machine's rows.
    """
    if count <= 0:
        yield {}
        return
    from shoal.comm.pubsub import EVENTS_ENV
    from shoal.comm.wire import Codec
    from shoal.ps.monitor import Monitor

    if log_dir:
        os.makedirs(log_dir, exist_ok=True)
    where: dict = {}
    if nnodes > 1:
        if not os.environ.get("SHOAL_JOB_KEY"):
            raise ConfigError(
                "a parameter-server job on several machines needs the same secret on every machine: "
                "set SHOAL_JOB_KEY (e.g. to the output of `openssl rand -hex 32`) before `shoal` on each"
            )
        rdzv_host, _ = split_endpoint(rdzv_endpoint)
        where = {
            "store": open_job_store(count, nnodes, node_rank, rdzv_endpoint),
            "address": rdzv_endpoint,
            "indices": list(range(node_rank, count, nnodes)),
            "host": "0.0.0.0",
            "advertise": os.environ.get("SHOAL_PS_ADVERTISE") or local_address_towards(rdzv_host),
        }
    monitor = Monitor(Codec(job_key.encode()), record=record, live=live, host=host).start()
    events = {EVENTS_ENV: monitor.endpoint}
    try:
        group = start_servers(count, job_key, log_dir=log_dir, extra_env=events, **{"host": host, **where})
        try:
            yield {**group.env, **events}
        finally:
            group.stop()
    finally:
        monitor.stop()


def read_endpoints(store, count: int, timeout_s: float) -> list[str]:
    keys = [f"shoal/ps/server/{i}" for i in range(count)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception:
        raise ShoalError(
            f"the {count} parameter server(s) did not publish their addresses within {timeout_s:.0f}s; see the servers' logs"
        ) from None
    return [store.get(k).decode() for k in keys]


def connect_store(timeout_s: float = 60.0):
    """The job's parameter-server store, from SHOAL_PS_STORE; (store, server count)."""
    from torch.distributed import TCPStore

    address = os.environ.get(STORE_ENV, "")
    if not address:
        raise ShoalError(
            "the parameter_server strategy needs server processes: start the script with "
            "`shoal run -n N --servers S script.py`, or `shoal train` with strategy.name = 'parameter_server'"
        )
    host, _, port = address.rpartition(":")
    try:
        store = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
        count = int(store.get("shoal/ps/servers"))
    except Exception as exc:
        raise ShoalError(
            f"cannot reach the parameter-server store at {address} ({exc}); is the launcher still running?"
        ) from None
    return store, count
