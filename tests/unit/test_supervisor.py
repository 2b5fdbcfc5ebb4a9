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
        # its servers die with it, the other machines' copies take their shards over, and they come back
        # as replacements (shoal.ps.replacement); with one copy of a shard, or on machine 0, they cannot
        ((2, "static", AWAY, 1), 2, "", 1, ""),
        ((2, "static", AWAY, 1), 1, "", 1, "one copy of each shard"),
        ((2, "static", AWAY, 1), 2, "", 0, "holds the static rendezvous's store"),
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


def test_servers_asked_to_keep_one_copy_of_each_shard_are_not_supervised(monkeypatch):
    monkeypatch.delenv(env.SUPERVISED, raising=False)
    reason = reason_to_supervise(2, "static", AWAY, 1, servers=2, control="", node_rank=1, replication=1)
    assert "one copy of each shard" in reason


def test_the_servers_a_supervised_launcher_started_are_found_by_their_pids(monkeypatch, tmp_path):
    """`shoal.supervised`: what the launcher's servers and members leave for the supervisor, in a folder
    only this user may enter; one that another could have made is refused in one sentence."""
    from shoal import supervised
    from shoal.errors import ShoalError

    monkeypatch.setattr(supervised.tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv(env.SUPERVISED, "4242")
    supervised.tell("server1", 777)
    supervised.tell("member0", 778)
    assert supervised.serving_pids(4242) == {777, 778}
    assert oct(supervised.folder(4242).stat().st_mode & 0o777) == "0o700"
    monkeypatch.setenv(env.SUPERVISED, "4343")
    supervised.folder(4343).mkdir(mode=0o777)
    supervised.folder(4343).chmod(0o777)  # as someone else could have left it
    with pytest.raises(ShoalError, match="is not a private folder of this user: remove it"):
        supervised.tell("server0", 779)


@pytest.mark.parametrize(
    ("early", "orphans", "serving", "relaunched"),
    [
        ({}, {101: 0, 102: 0}, set(), False),
        ({}, {101: 0, 102: -9}, set(), True),
        ({}, {101: 0, 102: -9}, {102}, False),
        ({101: -9}, {102: -9}, set(), True),  # one died (PDEATHSIG) and was reaped before the launcher was
        ({101: 0}, {102: 0}, set(), False),
    ],
)
def test_a_killed_launcher_whose_workers_had_all_finished_well_is_not_started_again(
    monkeypatch, capsys, early, orphans, serving, relaunched
):
    """Its orphaned workers had exited 0 by themselves (the job's end came before PDEATHSIG): the job is done
    here, and a launcher started again would wait in a rendezvous the others never come to. A parameter
    server (or control-plane member) it left, ended by the supervisor, is not one of its workers. `early`:
    orphans reaped while the launcher's exit was awaited, counted with those the supervisor ended."""
    from shoal.launch import supervisor

    started = []

    class Launcher:
        pid = 100

        def __init__(self, *args, **kwargs) -> None:
            started.append(kwargs["env"].get(env.RELAUNCHED))

    codes = iter([(-9, None), (0, None)])  # killed; the one started again finishes (or says the job had)
    ends = []
    monkeypatch.setattr(supervisor.subprocess, "Popen", Launcher)
    monkeypatch.setattr(supervisor, "_wait", lambda child, hang_s, reaped: reaped.update(early) or next(codes))
    monkeypatch.setattr(supervisor, "end_orphans", lambda: ends.append(1) or dict(orphans))
    monkeypatch.setattr(supervisor.supervised, "serving_pids", lambda owner: serving)
    monkeypatch.setattr(supervisor, "_become_subreaper", lambda: None)
    monkeypatch.setattr(supervisor.signal, "signal", lambda *args: None)
    assert supervisor.supervise(["run"], restarts=2, hang_s=8) == 0
    assert started == ([None, "1"] if relaunched else [None])
    assert len(ends) == len(started)  # what each launcher left is ended, the last one's too
    said = capsys.readouterr().err
    assert ("after its workers finished; the job is done here" in said) != relaunched, said
    if relaunched:
        assert f"ended the {len(early) + len(orphans)} process(es) it left and started it again (1 of 2)" in said
