"""The launcher's supervisor: which machines it supervises (tests/multiproc/test_supervisor.py: what it ends)."""

from __future__ import annotations

import pytest

from shoal import env
from shoal.launch.supervisor import reason_to_supervise

AWAY = "10.255.255.1:29400"  # not an address of this machine: another machine holds the c10d store


@pytest.mark.parametrize(
    ("job", "servers", "control", "node_rank", "why"),
    [
        ((2, "c10d", AWAY, 1), 0, "", 1, ""),
        ((3, "etcd-v2", "127.0.0.1:2379", 2), 0, "", 0, ""),  # the store is etcd's, not a launcher's
        ((1, "c10d", AWAY, 1), 0, "", 0, "one machine"),
        ((2, "c10d", AWAY, 0), 0, "", 1, "no restarts"),
        ((2, "static", AWAY, 1), 0, "", 1, ""),  # it rejoins in the next round (shoal.launch.rounds)
        ((2, "static", AWAY, 1), 0, "", 0, "holds the static rendezvous's store"),
        ((2, "static", AWAY, 1), 0, "raft", 1, ""),
        ((2, "c10d", "127.0.0.1:29400", 1), 0, "", 0, "holds the c10d store"),
        ((2, "c10d", AWAY, 1), 2, "", 1, "parameter servers"),
        # its members come back with their journals (shoal.control.launch), on the addresses they had
        ((2, "c10d", AWAY, 1), 0, "raft", 1, ""),
        ((3, "etcd-v2", "127.0.0.1:2379", 1), 0, "raft", 0, "where the control plane's members meet"),
        ((3, "etcd-v2", "127.0.0.1:2379", 1), 0, "etcd://10.255.255.1:2379", 0, ""),  # started elsewhere
    ],
)
def test_a_launcher_is_supervised_only_where_one_started_again_rejoins(
    monkeypatch, job, servers, control, node_rank, why
):
    """`job`: nnodes, the rendezvous backend and endpoint, --max-restarts."""
    monkeypatch.delenv(env.SUPERVISED, raising=False)
    reason = reason_to_supervise(*job, servers=servers, control=control, node_rank=node_rank)
    assert (why in reason) if why else reason == ""


def test_a_supervised_launcher_does_not_supervise_again(monkeypatch):
    monkeypatch.setenv(env.SUPERVISED, "1234")
    assert reason_to_supervise(2, "c10d", AWAY, 1, servers=0, control="", node_rank=1) == "already supervised"
