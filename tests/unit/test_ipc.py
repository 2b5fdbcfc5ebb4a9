"""One machine: the job's sockets are ipc:// in a private directory, without CURVE or MAC (`shoal.comm.ipc`)."""

from __future__ import annotations

import os
import stat

import pytest
import zmq

from shoal import env
from shoal.comm import ipc
from shoal.comm.pubsub import Publisher, Subscriber
from shoal.comm.security import Transport
from shoal.comm.wire import Codec
from shoal.errors import ConfigError, ShoalError
from shoal.ps import store as ps_store

KEY = b"k" * 32


@pytest.fixture
def private():
    path = ipc.make_dir()
    yield path
    ipc.remove(path)


def test_the_directory_is_this_users_alone_and_removed_with_its_sockets(private):
    st = os.lstat(private)
    assert stat.S_IMODE(st.st_mode) == 0o700 and st.st_uid == os.geteuid()
    transport = Transport(KEY, private_dir=private)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    transport.listen(sock)
    endpoint = transport.bind(sock, "127.0.0.1", "server0-shard0")
    assert endpoint.startswith(f"ipc://{private}/server0-shard0-")
    assert os.path.exists(endpoint.removeprefix("ipc://"))
    sock.close(linger=0)
    ctx.term()
    ipc.remove(private)
    assert not os.path.exists(private)


def test_a_gone_launchers_directory_is_swept_and_a_running_ones_kept(monkeypatch):
    """A SIGKILLed launcher cannot remove its directory: the next launcher of this user does."""
    import shutil
    import tempfile
    from pathlib import Path

    tmp_path = Path(tempfile.mkdtemp(prefix="sw", dir="/tmp"))  # short: socket paths must fit
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    gone = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process has it
    stale = tmp_path / f"shoal-ipc-{gone}-abc"
    stale.mkdir(mode=0o700)
    (stale / "server0-shard0-x").write_text("")
    live = tmp_path / f"shoal-ipc-{os.getpid()}-def"
    live.mkdir(mode=0o700)
    try:
        made = ipc.make_dir()
        assert not stale.exists() and live.exists() and os.path.basename(made).startswith(f"shoal-ipc-{os.getpid()}-")
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)


def test_messages_in_the_directory_carry_no_mac_and_no_curve_and_still_arrive(private):
    codec = Codec(KEY, transport=Transport.for_job(KEY, {env.PS_IPC_DIR: private}))
    assert codec.transport.private_dir == private and not codec.transport.curve and not codec.signed
    sub = Subscriber(codec)
    pub = Publisher(sub.endpoint, codec)
    try:
        assert sub.endpoint.startswith(f"ipc://{private}/events-")
        got = []
        for _ in range(50):  # PUB/SUB drops what it sends before the subscription has travelled
            pub.publish("event", {"message": "hello"})
            got = sub.poll(20)
            if got:
                break
        assert got and got[0]["message"] == "hello"
        frames = codec.encode({"x": 1})
        assert len(frames[0]) == 8 and frames[0] == frames[-1], "tags, not a MAC"
    finally:
        pub.close()
        sub.close()


def test_a_directory_others_may_open_or_not_owned_stops_in_one_sentence(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    with pytest.raises(ShoalError, match="mode 0700"):
        Transport(KEY, private_dir=str(loose))
    link = tmp_path / "link"
    good = tmp_path / "good"
    good.mkdir(mode=0o700)
    link.symlink_to(good)
    with pytest.raises(ShoalError, match="mode 0700"):
        ipc.job_dir({env.PS_IPC_DIR: str(link)})
    with pytest.raises(ShoalError, match="did its launcher exit"):
        ipc.job_dir({env.PS_IPC_DIR: str(tmp_path / "gone")})
    assert ipc.job_dir({}) is None


def test_published_endpoints_must_be_in_the_jobs_directory_or_tcp(private):
    inside = {env.PS_IPC_DIR: private}
    good = ps_store.ServerAddress(f"ipc://{private}/server0-shard0-ab", 0, "s")
    value = f"{good.endpoint} s ipc"
    assert ps_store.ServerAddress.parse(0, value, inside) == good
    for endpoint in (f"ipc://{private}/../x", f"ipc://{private}/a/b", "ipc:///tmp/elsewhere", "tcp://1.2.3.4:5"):
        with pytest.raises(ShoalError, match="not a socket in this job's directory"):
            ps_store.ServerAddress.parse(0, f"{endpoint} s ipc", inside)
    with pytest.raises(ShoalError, match="not a tcp:// endpoint"):
        ps_store.ServerAddress.parse(0, f"ipc://{private}/x s curve=1", {})
    with pytest.raises(ShoalError, match=r"private ipc:// socket.*SHOAL_PS_IPC"):
        ps_store.ServerAddress.parse(0, value, {})  # a process its launcher did not start in the directory
    with pytest.raises(ShoalError, match="listens on TCP"):
        ps_store.ServerAddress.parse(0, "tcp://127.0.0.1:5 s curve=1", inside)


def test_the_switch_reads_0_or_1():
    assert ipc.enabled({}) and ipc.enabled({env.PS_IPC: "1"}) and not ipc.enabled({env.PS_IPC: "0"})
    with pytest.raises(ConfigError, match="SHOAL_PS_IPC must be 0 or 1"):
        ipc.enabled({env.PS_IPC: "yes"})
