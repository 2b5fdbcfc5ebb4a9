"""The rendezvous store through which a job's parameter servers are found.

A torch `TCPStore` holds two kinds of keys, named here and nowhere else:

- `SERVER_COUNT_KEY` (`shoal/ps/servers`): how many servers the job has,
  set by the launcher of machine 0 when it opens the store;
- `server_key(i)` (`shoal/ps/server/<i>`): server i's ZeroMQ endpoint, set
  by server i once it is bound.

Nothing is hard-coded but the store's own address, which the launcher hands
to servers and workers in SHOAL_PS_STORE. On one machine the launcher hosts
the store on a free port; across machines it is the job's rendezvous store
on `--rdzv-endpoint`, hosted by machine 0's launcher before torch's static
rendezvous, which shares it (`multi_tenant`).
"""

from __future__ import annotations

import os
from datetime import timedelta

from torch.distributed import TCPStore  # pyright: ignore[reportPrivateImportUsage] -- documented, not in torch's stubs

from shoal import env
from shoal.config import split_endpoint
from shoal.errors import ConfigError, ShoalError, first_line

SERVER_COUNT_KEY = "shoal/ps/servers"
"""How many servers the job has."""


def server_key(index: int) -> str:
    """The key under which server `index` publishes its endpoint."""
    return f"shoal/ps/server/{index}"


def open_local_store(host: str, count: int, timeout_s: float) -> tuple[TCPStore, str]:
    """A store for a job on this machine, on a free port of `host`; (store, its HOST:PORT)."""
    try:
        store = TCPStore(host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s))
    except RuntimeError as exc:
        raise ShoalError(f"could not open the parameter-server rendezvous store on {host}: {exc}") from None
    store.set(SERVER_COUNT_KEY, str(count))
    return store, f"{host}:{store.port}"


def open_job_store(count: int, nnodes: int, node_rank: int, rdzv_endpoint: str, timeout_s: float = 300.0) -> TCPStore:
    """The job's rendezvous store across machines (machine 0 hosts it); checks that
    every machine asks for the same number of servers."""
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
            store.set(SERVER_COUNT_KEY, str(count))
            return store
        store = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
        asked = int(store.get(SERVER_COUNT_KEY))
    except Exception as exc:
        why = first_line(str(exc)) or type(exc).__name__
        if node_rank == 0:
            raise ShoalError(
                f"cannot open the job's rendezvous store on port {port} ({why}); is the port in use? "
                "choose another --rdzv-endpoint port on every machine"
            ) from None
        raise ShoalError(
            f"cannot reach the job's rendezvous store at {rdzv_endpoint} ({why}); is machine 0's launcher running?"
        ) from None
    if asked != count:
        raise ConfigError(
            f"machine 0 started the job with --servers {asked}, this machine with {count}; "
            "pass the same --servers on every machine"
        )
    return store


def connect(address: str, timeout_s: float) -> TCPStore:
    """A client of the store at `address` (HOST:PORT, as in SHOAL_PS_STORE)."""
    host, port = split_endpoint(address, what=env.PS_STORE, key=env.PS_STORE)
    return TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))


def read_endpoints(store: TCPStore, count: int, timeout_s: float) -> list[str]:
    """Every server's endpoint, once all `count` have published theirs."""
    keys = [server_key(i) for i in range(count)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception:
        raise ShoalError(
            f"the {count} parameter server(s) did not publish their addresses within {timeout_s:.0f}s; "
            "see the servers' logs"
        ) from None
    return [store.get(k).decode() for k in keys]


def connect_store(timeout_s: float = 60.0) -> tuple[TCPStore, int]:
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
