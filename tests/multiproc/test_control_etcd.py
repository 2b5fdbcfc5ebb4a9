"""The etcd backend against a real etcd (Debian's etcd-server), same interface as the embedded one."""

from __future__ import annotations

import shutil
import time

import pytest

from shoal.control import ControlError, connect
from tests.helpers.procs import Processes, free_port

ETCD = shutil.which("etcd")
pytestmark = pytest.mark.skipif(ETCD is None, reason="no etcd binary (apt-get install etcd-server to run these)")


@pytest.fixture(scope="module")
def etcd(tmp_path_factory):
    data = tmp_path_factory.mktemp("etcd")
    client, peer = free_port(), free_port()
    argv = [ETCD, "--name", "t", "--data-dir", str(data / "data")]
    argv += [
        "--listen-client-urls",
        f"http://127.0.0.1:{client}",
        "--advertise-client-urls",
        f"http://127.0.0.1:{client}",
    ]
    argv += [
        "--listen-peer-urls",
        f"http://127.0.0.1:{peer}",
        "--initial-advertise-peer-urls",
        f"http://127.0.0.1:{peer}",
    ]
    argv += ["--initial-cluster", f"t=http://127.0.0.1:{peer}"]
    with Processes() as procs:
        proc = procs.start(argv, timeout=300)
        spec = f"etcd://127.0.0.1:{client}/test/"
        end = time.monotonic() + 30
        while True:
            try:
                with connect(spec, timeout=1.0) as ctl:
                    ctl.put("ready", True)
                break
            except ControlError:
                assert proc.poll() is None and time.monotonic() < end, proc.stderr()[-2000:]
        yield spec


def test_etcd_backend_keys_compare_and_set_and_generation(etcd):
    with connect(etcd) as ctl:
        ctl.put("config", {"lr": 0.1, "steps": [1, 2]})
        assert ctl.get("config") == {"lr": 0.1, "steps": [1, 2]} and ctl.get("absent") is None
        assert ctl.compare_and_set("primary/0", None, "server-a")
        assert not ctl.compare_and_set("primary/0", None, "server-b")
        assert not ctl.compare_and_set("primary/0", "server-b", "server-c")
        assert ctl.compare_and_set("primary/0", "server-a", "server-b") and ctl.get("primary/0") == "server-b"
        assert ctl.compare_and_set("primary/0", "server-b", None) and ctl.get("primary/0") is None
        assert [ctl.incr("generation") for _ in range(3)] == [1, 2, 3]
        assert ctl.range("config") == {"config": {"lr": 0.1, "steps": [1, 2]}}
        assert ctl.delete("config") and not ctl.delete("config")


def test_etcd_backend_lease_expiry_is_seen_by_watch(etcd):
    with connect(etcd) as ctl:
        lease = ctl.register("worker0", {"pid": 1}, ttl=2)
        assert ctl.keep_alive(lease) and ctl.alive() == {"worker0": {"pid": 1}}
        event = next(ctl.watch("members/", interval=0.1, timeout=10))
        assert event.key == "members/worker0" and event.value is None
        assert not ctl.keep_alive(lease) and not ctl.revoke(lease)
        with pytest.raises(ControlError, match="expired or was revoked"):
            ctl.put("members/late", 1, lease=lease)
        other = ctl.grant(30)
        ctl.put("held", 1, lease=other)
        assert ctl.revoke(other) and ctl.get("held") is None


def test_an_unreachable_etcd_stops_the_client_with_one_sentence():
    started = time.monotonic()
    with pytest.raises(ControlError, match=r"did not acknowledge put within 1 s.*check that etcd runs"):
        connect(f"etcd://127.0.0.1:{free_port()}", timeout=1.0).put("k", 1)
    assert time.monotonic() - started < 3.0
