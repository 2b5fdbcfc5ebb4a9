"""The static rendezvous in rounds (`shoal.launch.rounds`): which round each machine's agent enters, each
round's own bootstrap store, and a launcher started again after the job finished elsewhere
(`shoal.launch.finished`; tests/multiproc/test_hosts.py: a launcher started again rejoins)."""

from __future__ import annotations

import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import pytest
from torch.distributed import PrefixStore, TCPStore  # pyright: ignore[reportPrivateImportUsage]
from torch.distributed.elastic.rendezvous import RendezvousClosedError, RendezvousTimeoutError

from shoal import env
from shoal.launch import finished
from shoal.launch.finished import FinishedElsewhereError
from shoal.launch.rounds import PREFIX, RestartTimeoutError, RoundedStaticRendezvous, join_round


@pytest.fixture
def store():
    raw = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    return PrefixStore("run/", raw)


def together(store, nodes: list[int], of: int = 2) -> list[int]:
    """Machines `nodes` enter a round at once, each through a client of its own (as each agent has)."""
    clients = [PrefixStore("run/", TCPStore("127.0.0.1", store.underlying_store.port, is_master=False)) for _ in nodes]
    with ThreadPoolExecutor(len(nodes)) as pool:
        return list(pool.map(lambda n, client: join_round(client, n, of, 10), nodes, clients))


def test_every_machine_enters_the_same_round_and_the_next_one_after_it(store):
    assert together(store, [0, 1]) == [1, 1]
    assert together(store, [0, 1]) == [2, 2]


def test_a_machine_that_died_waiting_in_a_round_comes_back_to_the_round_the_others_restart_in(store):
    assert together(store, [0, 1]) == [1, 1]
    store.set(f"{PREFIX}2/node1", "1")  # machine 1's launcher entered round 2, then was killed in it
    assert join_round(store, 0, 2, 10) == 2  # machine 0 completes round 2 (its workers then fail: no peer)
    # machine 0 restarts in round 3; machine 1's new launcher, whose last completed round is 1, joins it
    # (it comes later: started at once, it might read round 2 as the newest and enter it, already complete)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(join_round, store_client(store), 0, 2, 10)
        while int(store.get(f"{PREFIX}newest")) < 3:
            time.sleep(0.01)
        assert join_round(store, 1, 2, 10) == 3 and first.result() == 3


def test_a_round_that_a_machine_does_not_come_to_names_it(store):
    with pytest.raises(RendezvousTimeoutError, match=r"machine\(s\) 1, 2 did not come to round 1 .* within 0.5 s"):
        join_round(store, 0, 3, 0.5)
    store.set(f"{PREFIX}node0", "1")  # as if round 1 had completed: the next is a restart
    with pytest.raises(RestartTimeoutError, match=r"machine\(s\) 1, 2 did not come to round 2 "):
        join_round(store, 0, 3, 0.5)


def test_each_round_has_its_own_bootstrap_store_on_machine_0():
    """Both machines' agents name the same store for their workers, which machine 0's agent holds on its
    rendezvous address only (torch's would listen on every interface), a new one each round, the round
    before's closed."""
    raw = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10), multi_tenant=True
    )  # as machine 0's launcher holds it: its agent's rank-0 rendezvous shares it
    agents = [RoundedStaticRendezvous("127.0.0.1", raw.port, rank, 2, "run", 10) for rank in (0, 1)]
    assert agents[0].use_agent_store and agents[0].get_backend() == "shoal-static"  # workers are its clients

    def rendezvous() -> list[tuple[str, int]]:
        with ThreadPoolExecutor(2) as pool:
            infos = list(pool.map(lambda agent: agent.next_rendezvous(), agents))
        assert [info.rank for info in infos] == [0, 1]
        return [(info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port) for info in infos]

    first = rendezvous()
    assert first[0] == first[1] and first[0][0] == "127.0.0.1" and first[0][1] != raw.port
    assert listening_on(first[0][1]) == ["127.0.0.1"]
    worker = TCPStore(*first[0], is_master=False, timeout=timedelta(seconds=5))  # as a worker connects
    worker.set("k", "v")
    second = rendezvous()
    assert second[0] == second[1] and second[0][1] != first[0][1] and listening_on(second[0][1]) == ["127.0.0.1"]
    assert not TCPStore(*second[0], is_master=False, timeout=timedelta(seconds=5)).check(["k"])  # no stale keys
    with pytest.raises(ConnectionRefusedError), socket.create_connection(first[0], timeout=5):
        pass  # the first round's store is closed


def listening_on(port: int) -> list[str]:
    """The IPv4 addresses this machine listens on at `port` (/proc/net/tcp; state 0A: LISTEN)."""
    found = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, at = local.split(":")
        if state == "0A" and int(at, 16) == port:
            found.append(socket.inet_ntoa(bytes.fromhex(address)[::-1]))
    return found


def test_a_launcher_started_again_after_the_job_finished_elsewhere_stops_and_releases_the_others(store):
    """Its workers were killed after the job's last collective; the other agents' workers finished and their
    agents wait in torch's exit barrier, having marked the job finished: it stops waiting for a round nobody
    enters, and counts itself in their barrier so that they end now."""
    assert together(store, [0, 1]) == [1, 1]
    barrier = finished.exit_store(store, "run")
    barrier.add(f"{finished.EXIT_BARRIER}/num_members", 1)  # machine 0's agent, in its exit barrier
    finished.mark(store, "run", 2)  # through the PrefixStore: the marker lies in the raw store
    assert store.underlying_store.check([finished.key("run")])
    began = time.monotonic()
    with pytest.raises(FinishedElsewhereError, match="had finished on the other machines") as raised:
        join_round(store, 1, 2, 10, finished_run="run")
    assert time.monotonic() - began < 2 and raised.value.exit_code == 0
    assert barrier.check([f"{finished.EXIT_BARRIER}/last_member"])  # machine 0's barrier is complete


def test_a_launcher_started_again_without_a_marker_rejoins_as_before(store):
    """No marker (the job goes on, the others restart their workers): it joins their round, or names who did
    not come; a marker of another run is not this one's."""
    assert together(store, [0, 1]) == [1, 1]
    finished.mark(store, "another-run", 2)
    with ThreadPoolExecutor(2) as pool:
        rounds = pool.map(lambda n: join_round(store_client(store), n, 2, 10, "run" if n else ""), [0, 1])
        assert list(rounds) == [2, 2]
    with pytest.raises(RestartTimeoutError, match=r"machine\(s\) 0 did not come to round 3 "):
        join_round(store, 1, 2, 0.5, finished_run="run")


def test_an_agent_that_was_not_started_again_ignores_the_marker(store):
    """Only a launcher started again acts on it: an agent whose own workers failed after the others finished
    waits (and reports the failure), it does not say the job finished."""
    finished.mark(store, "run", 2)
    with pytest.raises(RendezvousTimeoutError, match=r"machine\(s\) 0 did not come to round 1 "):
        join_round(store, 1, 2, 0.5)


@pytest.mark.parametrize("relaunched", [True, False])
def test_only_the_first_round_of_a_launcher_started_again_watches_for_the_marker(monkeypatch, relaunched):
    raw = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10), multi_tenant=True
    )
    if relaunched:
        monkeypatch.setenv(env.RELAUNCHED, "1")
    else:
        monkeypatch.delenv(env.RELAUNCHED, raising=False)
    agent = RoundedStaticRendezvous("127.0.0.1", raw.port, 1, 2, "run", 1)
    finished.mark(raw, "run", 2)
    with pytest.raises(FinishedElsewhereError if relaunched else RendezvousTimeoutError):
        agent.next_rendezvous()
    with pytest.raises(RendezvousTimeoutError, match="did not come"):
        agent.next_rendezvous()  # its next one: a failure of its own workers is reported, not hidden


def test_a_c10d_launcher_started_again_stops_waiting_once_the_job_finished_elsewhere():
    """c10d: the watcher closes the rendezvous that the launcher started again waits in, once the marker is
    there; torch's wait then ends with RendezvousClosedError, which the agent reports as the job finished.
    It also counts itself in the exit barrier the other agent waits in, which then ends."""
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import C10dRendezvousBackend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import DynamicRendezvousHandler, RendezvousTimeout

    raw = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10), multi_tenant=True
    )
    client = TCPStore("127.0.0.1", raw.port, is_master=False, timeout=timedelta(seconds=10))
    timeout = RendezvousTimeout(join=timedelta(seconds=20))
    waiting = DynamicRendezvousHandler.from_backend(
        "run", client, C10dRendezvousBackend(client, "run"), 2, 2, timeout=timeout
    )
    barrier = finished.exit_store(raw, "run")
    barrier.add(f"{finished.EXIT_BARRIER}/num_members", 1)  # the other machine's agent, in its exit barrier
    threading.Timer(0.5, finished.mark, (raw, "run", 2)).start()
    began = time.monotonic()
    with finished.closing_when_finished("127.0.0.1", raw.port, "run", 2) as found:
        with pytest.raises(RendezvousClosedError):
            waiting.next_rendezvous()  # for a second machine that never comes
        assert found.is_set()
    assert time.monotonic() - began < 10
    assert barrier.check([f"{finished.EXIT_BARRIER}/last_member"])  # that agent's barrier is complete


def store_client(store) -> PrefixStore:
    return PrefixStore("run/", TCPStore("127.0.0.1", store.underlying_store.port, is_master=False))


def test_healthy_workers_follow_a_newer_round_only_in_a_job_that_asks_it():
    """Machine 1's launcher, started again, enters round 2; machine 0's agent, whose parameter-server
    worker is healthy, sees it waiting there (torch's agent then restarts its workers into it)."""
    raw = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10), multi_tenant=True
    )
    agents = [RoundedStaticRendezvous("127.0.0.1", raw.port, rank, 2, "run", 10) for rank in (0, 1)]
    agents[0].follow = True
    assert agents[0].num_nodes_waiting() == 0  # before any round: no store yet
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda agent: agent.next_rendezvous(), agents))
    assert [agent.num_nodes_waiting() for agent in agents] == [0, 0]
    again = RoundedStaticRendezvous("127.0.0.1", raw.port, 1, 2, "run", 10)  # the new launcher's agent
    with ThreadPoolExecutor(1) as pool:
        entered = pool.submit(again.next_rendezvous)
        deadline = time.monotonic() + 10
        while not raw.check([f"run/{PREFIX}2/node1"]):
            assert time.monotonic() < deadline and not entered.done()
            time.sleep(0.01)
        assert agents[0].num_nodes_waiting() == 1 and agents[1].num_nodes_waiting() == 0  # 1 does not follow
        agents[0].next_rendezvous()
        assert entered.result().rank == 1
    assert agents[0].num_nodes_waiting() == 0
