"""The parameter-server rendezvous store listens where asked and trusts only values signed by the job."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import TCPStore  # pyright: ignore[reportPrivateImportUsage]

from shoal.errors import ShoalError
from shoal.ps import store as ps_store

KEY = b"k" * 32


def _listening(port: int) -> list[str]:
    """The local addresses (hex, as in /proc/net/tcp*) on which something listens on `port`."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        path = Path(table)
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            address, _, hex_port = fields[1].rpartition(":")
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.append(address)
    return found


def test_the_local_store_listens_on_the_asked_address_only():
    store, address = ps_store.open_local_store("127.0.0.1", 2, 10, KEY)
    assert address == f"127.0.0.1:{store.port}"
    assert _listening(store.port) == ["0100007F"], "listening beyond 127.0.0.1"


def test_signed_values_round_trip_and_forged_ones_stop_the_reader():
    store, address = ps_store.open_local_store("127.0.0.1", 2, 10, KEY)
    assert store.get(ps_store.SERVER_COUNT_KEY) == "2"
    store.set(ps_store.server_key(0), "tcp://127.0.0.1:5000 aa")
    store.set(ps_store.server_key(1), "tcp://127.0.0.1:5001 bb")
    assert ps_store.read_endpoints(store, 2, 5) == [
        ps_store.ServerAddress("tcp://127.0.0.1:5000", 0, "aa"),
        ps_store.ServerAddress("tcp://127.0.0.1:5001", 1, "bb"),
    ]

    host, port = address.split(":")
    stranger = TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=5))
    signed_0 = stranger.get(ps_store.server_key(0))
    other_job = ps_store.SignedStore(stranger, b"x" * 32, store.session, address)
    earlier_run = ps_store.SignedStore(stranger, KEY, "an-earlier-session", address)
    forgeries = {
        "unsigned": lambda: stranger.set(ps_store.server_key(0), "tcp://127.0.0.1:6666"),
        "another key": lambda: other_job.set(ps_store.server_key(0), "tcp://127.0.0.1:6666"),
        "another session": lambda: earlier_run.set(ps_store.server_key(0), "tcp://127.0.0.1:6666"),
        "moved from another key": lambda: stranger.set(ps_store.server_key(0), stranger.get(ps_store.server_key(1))),
        "mac with another value": lambda: stranger.set(
            ps_store.server_key(0), signed_0.split(b" ")[0] + b" tcp://127.0.0.1:6666"
        ),
        "garbage": lambda: stranger.set(ps_store.server_key(0), b"\xff\x00"),
    }
    for what, forge in forgeries.items():
        forge()
        with pytest.raises(ShoalError, match="is not signed with this job's key") as err:
            ps_store.read_endpoints(store, 2, 5)
        assert "\n" not in str(err.value) and "shoal/ps/server/0" in str(err.value), what
    stranger.set(ps_store.server_key(0), signed_0)
    assert ps_store.read_endpoints(store, 2, 5)[0].endpoint == "tcp://127.0.0.1:5000"


def test_a_client_without_the_session_is_told_how_to_start(monkeypatch):
    monkeypatch.setenv("SHOAL_JOB_KEY", KEY.decode())
    monkeypatch.delenv("SHOAL_PS_SESSION", raising=False)
    with pytest.raises(ShoalError, match="SHOAL_PS_SESSION is not"):
        ps_store.connect("127.0.0.1:1", 1)


def test_the_job_store_listens_on_the_endpoint_address_only():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = ps_store.open_job_store(2, 2, 0, f"127.0.0.1:{port}", KEY, timeout_s=10)
    assert _listening(port) == ["0100007F"]
    other = ps_store.open_job_store(2, 2, 1, f"127.0.0.1:{port}", KEY, timeout_s=10)
    assert other.session == store.session
    with pytest.raises(ShoalError, match="not signed"):
        ps_store.open_job_store(2, 2, 1, f"127.0.0.1:{port}", b"y" * 32, timeout_s=10)


def test_a_host_name_that_resolves_only_to_loopback_is_refused_for_other_machines():
    with pytest.raises(ShoalError, match="resolves only to loopback"):
        ps_store.open_job_store(2, 2, 0, "localhost:29999", KEY, timeout_s=5)


def test_a_server_with_another_shoal_curve_is_named_at_once(monkeypatch):
    store, _ = ps_store.open_local_store("127.0.0.1", 1, 10, KEY)
    monkeypatch.setenv("SHOAL_CURVE", "0")
    store.set(ps_store.server_key(0), ps_store.ServerAddress("tcp://127.0.0.1:5000", 0, "aa").value)
    monkeypatch.setenv("SHOAL_CURVE", "1")  # the worker, where the server had CURVE off
    with pytest.raises(ShoalError) as err:
        ps_store.read_endpoints(store, 1, 5)
    assert "\n" not in str(err.value)
    assert "parameter server 0 runs with SHOAL_CURVE=0 and this process with SHOAL_CURVE=1" in str(err.value)
    monkeypatch.setenv("SHOAL_CURVE", "0")  # the same on both sides
    assert ps_store.read_endpoints(store, 1, 5)[0].session == "aa"
