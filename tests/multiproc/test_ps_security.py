"""Strangers against a live parameter server and the launcher's event monitor.

- Memory: a raw TCP client with no key opens many connections and sends
  multipart messages whose last frame never comes (ZeroMQ limits each frame,
  not the message, and holds the frames until the last one), and twice the
  server's cap of silent connections. CURVE closes such connections at the
  handshake, and a server process holds at most its cap of files, so the server
  grows by < 10 MB, an idle unauthenticated connection is closed after the
  handshake interval, and a job run afterwards ends where one process ends.
- Under CURVE messages carry no MAC (`shoal.comm.wire`), so the connection
  is the only check of who sent them: strangers with well-formed messages
  (another job's CURVE keys, the job's server key but their own client key,
  no CURVE at all) get nothing accepted, nothing answered, and nothing even
  reaches the server's message checks.
- Replay: requests recorded in one run are dropped by the next run's server
  under the same SHOAL_JOB_KEY, and 250 replays of one stats request are
  dropped without growing the server. Here CURVE is off (SHOAL_CURVE=0), as
  it would be where the per-message MAC is the only defence; messages
  signed with another key, or not signed, are dropped too.
- One machine (`shoal.comm.ipc`): what `shoal run` and `shoal train` set up
  there listens only in the job's private directory (0700), which another
  user cannot open, without CURVE or MAC; the directory goes when the job ends,
  also when it fails. The tests above start servers as across machines (TCP).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import stat
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import zmq

from shoal import env
from shoal.comm.security import HANDSHAKE_S, Transport
from shoal.comm.wire import Codec
from shoal.ps.client import Client, request_stats
from shoal.ps.servers import start_servers
from tests.helpers.procs import Processes
from tests.helpers.ranks import start_ranks, wait_all
from tests.workers import ps_tasks
from tests.workers.ps_tasks import single_process

MB = 1 << 20
CAP = 256
"""The server's cap on its open files here (SHOAL_PS_MAX_CONNECTIONS): twice as many silent
connections stay well inside a CI machine's usual limit of 1,024 files for the test process."""
FRAME = MB  # under the servers' per-frame limit below, so ZeroMQ itself does not refuse it


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _greeting(mechanism: bytes) -> bytes:
    """A ZMTP 3.0 greeting (signature, version, mechanism, as-server, filler): 64 bytes."""
    return b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + mechanism.ljust(20, b"\0") + b"\0" + b"\0" * 31


def _flood(endpoint: str, kind: bytes, connections: int = 48, frames: int = 4) -> list[socket.socket]:
    """Half the connections send a NULL handshake and `frames` 1 MiB frames, each flagged 'more
    to come', never the last; the other half send a CURVE greeting and then nothing. Returns the
    open sockets. `kind` is the ZeroMQ socket type claimed."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    ready = b"\x05READY" + b"\x0bSocket-Type" + struct.pack(">I", len(kind)) + kind
    chunk = b"\x03" + struct.pack(">Q", FRAME) + b"x" * FRAME  # MORE | LONG
    socks = []
    for i in range(connections):
        s = socket.create_connection((host, int(port)), timeout=2)
        socks.append(s)
        try:
            if i % 2:
                s.sendall(_greeting(b"CURVE"))
                continue
            s.sendall(_greeting(b"NULL") + b"\x04" + bytes([len(ready)]) + ready)
            for _ in range(frames):
                s.sendall(chunk)
        except OSError:  # the peer closed the connection: what it should do
            pass
    return socks


def _connections(endpoint: str, count: int) -> list[socket.socket]:
    """`count` TCP connections that say nothing. Should this process run out of files, it closes
    them before it fails: the test process goes on to run other tests."""
    host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            socks.append(s)
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):  # completes in the kernel's backlog, accepted or not
                s.connect((host, int(port)))
    except OSError:
        for s in socks:
            s.close()
        raise
    return socks


def _closed_by_peer(s: socket.socket, wait_s: float) -> bool:
    s.settimeout(wait_s)
    try:
        while s.recv(1 << 16):  # the peer's greeting, then EOF once it gives up on us
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def test_strangers_cannot_make_a_server_or_the_monitor_hold_memory_and_the_job_ends_right():
    from shoal.comm.pubsub import Subscriber

    with Processes() as procs:
        limits = {env.PS_MAX_BYTES: str(4 * FRAME), env.PS_MAX_CONNECTIONS: str(CAP)}
        group = start_servers(1, secrets.token_hex(16), extra_env=procs.env(limits), log_dir=str(procs.logs))
        for p in group.procs:
            procs.adopt(p)
        socks: list[socket.socket] = []
        try:
            (address,) = group.endpoints()
            pid = group.procs[0].pid
            time.sleep(1.0)  # let the server settle after start
            before = _rss(pid)
            socks = _flood(address.endpoint, b"DEALER")
            socks += _connections(address.endpoint, 2 * CAP)  # more than the server's cap of files
            files = 0
            for _ in range(40):  # the kernel completes them as the server accepts: the most it held, in 4 s
                time.sleep(0.1)
                files = max(files, len(os.listdir(f"/proc/{pid}/fd")))
            grown = _rss(pid) - before

            args = {"task": "equiv", "optim": "adam", "steps": 4, "params": True}
            args["strategy"] = {"consistency": "bsp", "max_message_mb": 4}
            out = procs.logs / "results"
            out.mkdir()
            ranks = start_ranks(procs, ps_tasks.run, [args], 2, out, 90, group.env)  # while the strangers wait
            idle = [s for i, s in enumerate(socks) if i % 2]
            closed = sum(_closed_by_peer(s, HANDSHAKE_S + 3) for s in idle[:4])

            sub = Subscriber(Codec(group.job_key.encode()))  # the launcher's event monitor, here in-process
            try:
                mine = _rss(os.getpid())
                more = _flood(sub.endpoint, b"PUB")
                socks += more
                time.sleep(1.0)
                sub.poll(0)
                sub_grown = _rss(os.getpid()) - mine
            finally:
                sub.close()
            done = wait_all(ranks)
            got = json.loads((out / "rank0.json").read_text())["ok"] if (out / "rank0.json").exists() else None
        finally:
            for s in socks:
                s.close()
            group.stop()
    assert grown < 10 * MB, f"the server grew by {grown / MB:.1f} MB"
    assert files <= CAP, f"the server holds {files} files, over its cap of {CAP}"
    assert sub_grown < 10 * MB, f"the monitor's process grew by {sub_grown / MB:.1f} MB"
    assert closed == 4, "idle unauthenticated connections were kept open"
    assert [d.returncode for d in done] == [0, 0], [d.stdout + d.stderr for d in done]
    for name, value in single_process("adam", 4, world=2).items():
        np.testing.assert_allclose(np.asarray(got[name]), value, atol=1e-5, rtol=0, err_msg=name)


def _push(address, seq: int) -> dict:
    return {"op": "push", "src": 0, "seq": seq, "clock": 0, "keys": ["w"], "hp": [{}], **address.header}


def test_under_curve_messages_carry_no_mac_and_strangers_still_get_nothing_accepted():
    key, other = secrets.token_hex(16).encode(), secrets.token_hex(16).encode()
    codec = Codec(key, transport=Transport(key, curve=True))
    assert not codec.signed
    w0 = torch.arange(8, dtype=torch.float32)
    with Processes() as procs:
        group = start_servers(1, key.decode(), extra_env=procs.env({env.CURVE: "1"}), log_dir=str(procs.logs))
        procs.adopt(group.procs[0])
        ctx = zmq.Context()
        try:
            (address,) = group.endpoints()
            client = Client([address], codec, rank=0, world=1, timeout_s=20)
            client.init([_spec()], [[w0]])
            args = {"endpoint": address.endpoint, "header": address.header, "other_key": other.decode()}
            args["server_public"] = codec.transport.server_public.decode()
            for _ in range(3):  # the strangers' own process may abort in libzmq (tests/workers/strangers.py)
                strangers = procs.start([sys.executable, "-m", "tests.workers.strangers", json.dumps(args)], 60)
                done = strangers.wait()
                if done.returncode == 0:
                    break
                assert done.returncode == -signal.SIGABRT, done.stderr[-2000:]
            assert done.returncode == 0 and "sent" in done.stdout, done.stderr[-2000:]
            answered = json.loads(done.stdout.splitlines()[-1])
            client.push(0, [(["w"], [torch.ones(8)])], [{"lr": 0.5}])
            client.request_pull(1)
            ((_, (w1,)),) = client.wait_pull(1)
            stats, _ = request_stats(ctx, address, codec)
            client.close()
        finally:
            ctx.term()
            group.stop()
    torch.testing.assert_close(w1, w0 - 0.5, rtol=0, atol=0)  # only the member's push was applied
    assert stats["pushed"] == [1]
    assert not any(stats["dropped"].values()), stats["dropped"]  # refused at the connection, not message by message
    assert answered == [False, False, False]


def _spec() -> dict:
    return {"optim": "SGD", "timeout_s": 30.0, "groups": [{"lr": 0.5}], "keys": [["w", "float32", [8], "bsp", 0, 0]]}


def _recording(codec: Codec) -> list[tuple[str, list[bytes]]]:
    """Make `codec` keep a copy of every message it encodes (what an eavesdropper would record)."""
    recorded, encode = [], codec.encode

    def keep(header, tensors=()):
        frames = encode(header, tensors)
        recorded.append((header["op"], [bytes(f) for f in frames]))
        return frames

    codec.encode = keep  # type: ignore[method-assign]
    return recorded


def _record_a_run(group, codec: Codec, w0: torch.Tensor) -> list[list[bytes]]:
    """A worker's init and push to `group`'s server, as recorded on the wire."""
    recorded = _recording(codec)
    client = Client(group.endpoints(), codec, rank=0, world=1, timeout_s=20)
    client.init([_spec()], [[w0]])
    client.push(0, [(["w"], [torch.full((8,), 100.0)])], [{"lr": 0.5}])
    client.request_pull(1)
    client.wait_pull(1)
    client.close()
    return [frames for op, frames in recorded if op in ("init", "push")]


def test_requests_recorded_in_an_earlier_run_and_stats_replays_are_dropped(monkeypatch):
    key = secrets.token_hex(16)
    off = {env.CURVE: "0"}  # the per-message MAC is the only defence here
    monkeypatch.setenv(env.CURVE, "0")  # here too, as in every process of such a job (the store compares)
    codec = Codec(key.encode(), transport=Transport(key.encode(), curve=False))
    w0 = torch.arange(8, dtype=torch.float32)
    with Processes() as procs:
        # both runs' servers start at once (they share nothing but the key), to save a start-up
        for run in ("run1", "run2"):
            (procs.logs / run).mkdir()
        first, second = (
            start_servers(1, key, extra_env=procs.env(off), log_dir=str(procs.logs / r)) for r in ("run1", "run2")
        )
        procs.adopt(first.procs[0])
        procs.adopt(second.procs[0])
        try:
            old_run = _record_a_run(first, Codec(key.encode(), transport=codec.transport), w0)
        finally:
            first.stop()

        ctx = zmq.Context()
        try:
            (address,) = second.endpoints()
            replayer = ctx.socket(zmq.DEALER)
            replayer.setsockopt(zmq.LINGER, 0)
            replayer.connect(address.endpoint)
            for frames in old_run:  # before the real worker 0 joins: a replayed init would take its place
                replayer.send_multipart(frames)
            forged = Codec(b"another job's key 0123", transport=codec.transport)  # a stranger's MAC
            unsigned = Codec(key.encode(), transport=Transport(key.encode(), curve=True))  # tags, as under CURVE
            for stranger in (forged, unsigned):
                replayer.send_multipart(stranger.encode(_push(address, 10**6), [torch.full((8,), 100.0)]))
            time.sleep(0.5)
            client = Client([address], codec, rank=0, world=1, timeout_s=20)
            client.init([_spec()], [[w0]])
            client.push(0, [(["w"], [torch.ones(8)])], [{"lr": 0.5}])
            client.request_pull(1)
            ((_, (w1,)),) = client.wait_pull(1)

            stats_request = _recording(asked := Codec(key.encode(), transport=codec.transport))
            request_stats(ctx, address, asked)
            pid = second.procs[0].pid
            before = _rss(pid)
            for _ in range(250):
                replayer.send_multipart(stats_request[0][1])
            time.sleep(1.0)
            grown = _rss(pid) - before
            stats, _ = request_stats(ctx, address, codec)
            client.close()
            replayer.close()
        finally:
            ctx.term()
            second.stop()
    torch.testing.assert_close(w1, w0 - 0.5, rtol=0, atol=0)  # only this run's push was applied
    assert stats["dropped"].get("wrong_session") == len(old_run) == 2, stats["dropped"]
    assert stats["dropped"].get("unauthenticated") == 2, stats["dropped"]
    assert stats["dropped"].get("replayed") == 250, stats["dropped"]
    assert grown < 10 * MB, f"the server grew by {grown / MB:.1f} MB"


def _as_stranger(directory: str, path: str) -> int:
    """In a child that became user nobody (no exec: it needs no Python of its own): 0 where it can
    neither list `directory` nor connect to the socket `path`, 1 or 2 where it can."""
    pid = os.fork()
    if pid == 0:  # only system calls here, then _exit: nothing of the parent's threads is touched
        code = 3
        try:
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            code = 1
            with contextlib.suppress(PermissionError):
                os.listdir(directory)
                os._exit(code)
            code = 2
            with contextlib.suppress(PermissionError), socket.socket(socket.AF_UNIX) as s:
                s.connect(path)
                os._exit(code)
            code = 0
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_on_one_machine_the_job_listens_only_in_a_directory_no_other_user_opens_and_it_goes(monkeypatch):
    """One server started as `shoal run` starts it on one machine (about 4 s)."""
    from shoal.procfs import children_of
    from shoal.ps import store as ps_store
    from shoal.ps.servers import serving

    key = secrets.token_hex(16)
    with (
        Processes() as procs,
        pytest.raises(RuntimeError, match="the job failed"),  # the directory goes all the same
        serving(1, key, log_dir=str(procs.logs)) as job_env,
    ):
        for name, value in job_env.items():  # this process is now one of the job's, as a worker would be
            monkeypatch.setenv(name, value)
        private = job_env[env.PS_IPC_DIR]
        st = os.lstat(private)
        assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
        store, count = ps_store.connect_store(30)
        (address,) = ps_store.read_endpoints(store, count, 30)
        assert address.endpoint.startswith(f"ipc://{private}/") and job_env[env.PS_EVENTS].startswith("ipc://")
        codec = Codec(key.encode())
        assert not codec.transport.curve and not codec.signed
        ctx = zmq.Context()
        try:
            header, _ = request_stats(ctx, address, codec)  # the job's own process: no CURVE, no MAC
        finally:
            ctx.term()
        assert header["index"] == 0
        pids = children_of(os.getpid())
        tcp = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
        unix = subprocess.run(["ss", "-lxpH"], capture_output=True, text=True, check=True).stdout
        assert pids and not [line for line in tcp.splitlines() for p in pids if f"pid={p}," in line], tcp
        listening = [line for line in unix.splitlines() if private in line]  # the server, a child of this process
        assert any(f"pid={p}," in line for line in listening for p in pids), unix
        if os.geteuid() == 0:  # another user: neither the directory nor the socket
            path = address.endpoint.removeprefix("ipc://")
            os.chmod(path, 0o777)  # even a socket anyone may write is out of reach
            assert _as_stranger(private, path) == 0, "another user listed the directory or connected"
        raise RuntimeError("the job failed")
    assert not os.path.exists(private), "the job's directory outlived it"
