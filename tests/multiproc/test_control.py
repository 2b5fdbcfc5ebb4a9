"""The embedded control plane: three real member processes on this machine.

A write is acknowledged once a majority holds it and every member applies it;
compare-and-set is atomic under racing clients; a lease's keys go when it
expires; after the leader is SIGKILLed writes succeed again within seconds,
and with two of three gone nothing is acknowledged and the client stops in
time with one sentence, and once the lost members restart from their
journals the acknowledged writes are all there; without the job key nothing changes the state and no
byte reaches pysyncobj's unpickler; the members `shoal run --control raft`
starts serve the job and are killed when it ends.
"""

from __future__ import annotations

import os
import pickle
import re
import signal
import socket
import struct
import threading
import time
import zlib

import pytest

from shoal.control import GENERATION, ControlError, Event, connect, hold
from shoal.control.auth import raft_password
from tests.helpers.cli import finish, start_shoal
from tests.helpers.control import KEY, Cluster, members_of
from tests.helpers.procs import MARK, Processes


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with Processes() as procs:
        cluster = Cluster.start(procs, tmp_path_factory.mktemp("control"))
        cluster.wait_ready()
        yield cluster


def test_a_put_is_applied_by_every_member(cluster):
    with cluster.client() as ctl:
        ctl.put("config/lr", {"value": 0.1, "steps": [1, 2]})
        assert ctl.get("config/lr") == {"value": 0.1, "steps": [1, 2]}
        deadline = time.monotonic() + 2.0  # followers apply a commit with the next heartbeat
        while time.monotonic() < deadline:
            seen = [ctl.local(i, "config/")["items"].get("config/lr") for i in range(3)]
            if all(v == {"value": 0.1, "steps": [1, 2]} for v in seen):
                break
            time.sleep(0.05)
        assert seen == [{"value": 0.1, "steps": [1, 2]}] * 3
        assert sum(ctl.local(i)["leader"] for i in range(3)) == 1


def test_compare_and_set_is_atomic_under_two_racing_clients(cluster):
    wins = [0, 0]

    def bump(who: int) -> None:
        with cluster.client() as ctl:
            while wins[who] < 25:
                n = ctl.get("race") or 0
                if ctl.compare_and_set("race", n or None, n + 1):
                    wins[who] += 1

    threads = [threading.Thread(target=bump, args=(who,)) for who in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with cluster.client() as ctl:
        assert ctl.get("race") == 50  # no increment lost or applied twice
        assert [ctl.incr("generation") for _ in range(3)] == [1, 2, 3]


def test_a_lease_keeps_its_keys_alive_and_they_go_when_it_expires(cluster):
    with cluster.client() as ctl:
        lease = ctl.register("worker0", {"pid": 1}, ttl=0.6)
        end = time.monotonic() + 1.5
        while time.monotonic() < end:  # kept alive past twice its TTL
            assert ctl.keep_alive(lease)
            time.sleep(0.15)
        assert ctl.alive() == {"worker0": {"pid": 1}}
        watch = ctl.watch("members/", interval=0.05, timeout=3.0)
        stopped = time.monotonic()
        assert next(watch) == Event("members/worker0", None)
        assert time.monotonic() - stopped < 0.6 + 1.0
        assert ctl.alive() == {} and not ctl.keep_alive(lease)
        with pytest.raises(ControlError, match="expired"):
            ctl.put("members/late", 1, lease=lease)
        other = ctl.grant(30)
        ctl.put("held", 1, lease=other)
        assert ctl.revoke(other) and ctl.get("held") is None


def test_a_held_record_lives_while_its_keeper_runs_and_goes_when_closed(cluster):
    """`hold` renews from a thread: the record outlives three TTLs with no call from the owner."""
    with cluster.client() as ctl, hold(ctl, "worker1", {"pid": 2}, ttl=0.6) as held:
        time.sleep(1.8)
        assert ctl.alive() == {"worker1": {"pid": 2}}
        assert held.renewals >= 3 and not held.lost.is_set()
    with cluster.client() as ctl:
        assert ctl.alive() == {}  # revoked on close, not left for the TTL
        assert not ctl.keep_alive(held.lease)


def test_without_the_job_key_nothing_changes_and_nothing_is_unpickled(cluster, tmp_path):
    with cluster.client() as ctl:
        ctl.put("guarded", "original")
    stranger = cluster.client(key="not-the-job-key-0123456789", timeout=1.5)
    with stranger, pytest.raises(ControlError, match="did not acknowledge put"):
        stranger.put("guarded", "hijacked")
    # What a member without the key sends: pysyncobj's framing of a pickle that
    # would create a file when unpickled, in the clear and under a wrong password.
    from pysyncobj.encryptor import getEncryptor

    marker = tmp_path / "unpickled"
    payload = zlib.compress(pickle.dumps(_Exploit(str(marker))), 3)
    wrong = getEncryptor(raft_password("a-different-job-key-0123")).encrypt(payload)
    for data in (payload, wrong):
        for member in cluster.members:
            host, port = member.rsplit(":", 1)
            with socket.create_connection((host, int(port)), timeout=2) as s:
                s.sendall(struct.pack("i", len(data)) + data)
                time.sleep(0.1)
    time.sleep(0.3)
    assert not marker.exists()
    with cluster.client() as ctl:
        assert ctl.get("guarded") == "original"
        ctl.put("after-attack", 1)  # the members still serve


class _Exploit:
    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_the_leader_killed_then_a_second_member_lost(cluster):
    """The last test of the module's cluster: it leaves it with one member."""
    with cluster.client(timeout=2.0) as ctl:
        for i in range(20):
            ctl.put(f"acked/{i}", i)
        cluster.kill(cluster.leader())
        killed = time.monotonic()
        ctl.timeout = 10.0
        ctl.put("after-failover", True)
        failover = time.monotonic() - killed
        assert failover < 3.0, f"writes resumed {failover:.2f} s after the leader's SIGKILL"
        assert ctl.range("acked/") == {f"acked/{i}": i for i in range(20)}

        keeper_ctl = cluster.client(timeout=0.3)
        held = hold(keeper_ctl, "worker2", {}, ttl=1.0)
        cluster.kill(cluster.leader())  # one member left: no majority
        lost_at = time.monotonic()
        assert held.lost.wait(5.0), "the keeper never noticed that its lease could not be renewed"
        assert time.monotonic() - lost_at < 1.0 + 1.5  # one TTL without a renewal, plus the last try
        held.close()
        keeper_ctl.close()
        ctl.timeout = 2.0
        started = time.monotonic()
        with pytest.raises(ControlError) as err:
            ctl.put("lost", True)
        assert time.monotonic() - started < 2.0 + 0.5
        message = str(err.value)
        assert "did not acknowledge put within 2 s" in message and "2 of 3" in message
        assert "\n" not in message

        # Both lost members come back from their journals: a majority again, nothing acknowledged lost.
        lost = [i for i in range(3) if cluster.running[i] is None]
        for i in lost:
            cluster.restart(i)
        ctl.timeout = 30.0
        ctl.put("healed", True)
        assert ctl.range("acked/") == {f"acked/{i}": i for i in range(20)}
        assert ctl.get("after-failover") is True
        for i in lost:  # each restarted member applied the log it missed
            deadline = time.monotonic() + 10
            while ctl.local(i, "acked/")["items"] != ctl.range("acked/") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert ctl.local(i, "acked/")["items"] == {f"acked/{i}": i for i in range(20)}


def test_the_launchers_members_serve_the_job_and_go_with_it():
    """What `shoal run --control raft` wraps around its workers (`shoal.control.launch.serving`)."""
    from shoal import env
    from shoal.control.launch import serving
    from tests.helpers.procs import marked_pids

    with Processes() as procs:  # marks the members, so that none can outlive the test
        os.environ[MARK] = f"{procs.token}.members"
        try:
            with serving("raft", KEY) as job_env:
                spec = job_env[env.CONTROL]
                assert len(marked_pids(f"{procs.token}.members")) == 3
                with connect(spec, key=KEY) as ctl:
                    assert ctl.incr(GENERATION) == 1
        finally:
            del os.environ[MARK]
        assert marked_pids(f"{procs.token}.members") == []  # killed by pid when the job ended


def test_a_job_starts_a_lost_member_again_and_stops_in_one_sentence_when_the_majority_is_gone():
    """`shoal run --control raft`: member 0 SIGKILLed is started again from its journal and the job goes
    on; members 1 and 2 SIGSTOPped (no majority) stop the job within the guard's lease, exit 1, in one
    sentence naming them, and nothing is left running."""
    from shoal.control.guard import LEASE_S

    with Processes() as procs:
        job = start_shoal(procs, "run", "-n", "1", "--control", "raft", "tests/workers/ticking.py", "90", timeout=120)
        members = job.until(lambda: len(m := members_of(job.pid)) == 3 and m, 60)
        job.until(lambda: "tick 5 " in job.stdout(), 60)
        os.kill(members[0], signal.SIGKILL)
        job.until(lambda: "control member 0 (" in job.stderr(), 10)
        assert "was killed by signal 9; started again from its journal (1 of 3)" in job.stderr()
        again = job.until(lambda: members_of(job.pid).get(0) not in (None, members[0]), 10)
        assert again
        ticks = job.stdout().count("tick ")
        job.until(lambda: job.stdout().count("tick ") > ticks + 10, 10)  # the job went on
        for i in (1, 2):
            os.kill(members[i], signal.SIGSTOP)
        stopped = time.monotonic()
        done = finish(job)
        took = time.monotonic() - stopped
    assert done.returncode == 1, done.stderr[-3000:]
    said = done.stderr.strip().splitlines()[-1]
    assert said.startswith("shoal: the control plane lost its majority (2 of its 3 members must answer"), said
    assert re.search(r"member\(s\) 1 on 127\.0\.0\.1:\d+, 2 on 127\.0\.0\.1:\d+ do not answer\) for 5 s", said), said
    assert LEASE_S <= took < LEASE_S + 10, took
    assert "tick 899 " not in done.stdout and not done.survivors
