"""The static rendezvous in rounds (`shoal.launch.rounds`): which round each machine's agent enters, and
each round's own bootstrap store (tests/multiproc/test_hosts.py: a launcher started again rejoins)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import pytest
from torch.distributed import PrefixStore, TCPStore  # pyright: ignore[reportPrivateImportUsage]
from torch.distributed.elastic.rendezvous import RendezvousTimeoutError

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
    assert together(store, [0, 1]) == [3, 3]


def test_a_round_that_a_machine_does_not_come_to_names_it(store):
    with pytest.raises(RendezvousTimeoutError, match=r"machine\(s\) 1, 2 did not come to round 1 .* within 0.5 s"):
        join_round(store, 0, 3, 0.5)
    store.set(f"{PREFIX}node0", "1")  # as if round 1 had completed: the next is a restart
    with pytest.raises(RestartTimeoutError, match=r"machine\(s\) 1, 2 did not come to round 2 "):
        join_round(store, 0, 3, 0.5)


def test_each_round_has_its_own_bootstrap_store_on_machine_0():
    """Both machines' agents name the same store for their workers (worker rank 0 hosts it), a new one each round."""
    raw = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10), multi_tenant=True
    )  # as machine 0's launcher holds it: its agent's rank-0 rendezvous shares it
    agents = [RoundedStaticRendezvous("127.0.0.1", raw.port, rank, 2, "run", 10) for rank in (0, 1)]
    assert not agents[0].use_agent_store and agents[0].get_backend() == "shoal-static"

    def rendezvous() -> list[tuple[str, int]]:
        with ThreadPoolExecutor(2) as pool:
            infos = list(pool.map(lambda agent: agent.next_rendezvous(), agents))
        assert [info.rank for info in infos] == [0, 1]
        return [(info.bootstrap_store_info.master_addr, info.bootstrap_store_info.master_port) for info in infos]

    first, second = rendezvous(), rendezvous()
    assert first[0] == first[1] and second[0] == second[1]
    assert first[0][0] == "127.0.0.1" and raw.port not in (first[0][1], second[0][1])
    assert first[0][1] != second[0][1] or len({first[0], second[0]}) == 1  # a free port: may be drawn again
