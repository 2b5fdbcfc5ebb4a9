"""Replicated parameter servers (`shoal.ps.replication`): a server process killed or stopped
mid-run loses no acknowledged update. One decisive case per failure kind; the repeated
trials and the failover times are in benchmarks/chaos.py.

With 2 servers each process holds the primary of its shard and the backup of the other's,
so killing process 0 takes shard 0's primary and shard 1's backup at once; the launcher
then starts a replacement process 0, which becomes the backup of both shards again.
"""

from __future__ import annotations

import secrets
import time

import numpy as np
import pytest

from shoal.control.launch import serving as control_serving
from shoal.ps.store import ShardRecord, first_record, shard_key
from tests.helpers.cli import shoal
from tests.helpers.faults import Faults
from tests.helpers.procs import pid_alive
from tests.helpers.ps import run_ps_job, server_stats
from tests.workers import ps_tasks

pytestmark = pytest.mark.slow

STEPS = 10


def _job(consistency: str, faults: Faults | None, optim: str = "adam", env=None, before_stop=None, **more):
    args = {
        "task": "equiv",
        "optim": optim,
        "steps": STEPS,
        "params": True,
        # 1 KiB pieces: both shards hold part of every layer
        "strategy": {"consistency": consistency, "servers": 2, "chunk_bytes": 1024},
        **more,
    }
    env = env or (faults.env() if faults else None)
    return run_ps_job(2, 2, ps_tasks.run, args, env=env, before_stop=before_stop or _holders)


def _holders(group):
    """Each shard's record (who is primary, the generation) and its primary's own counters."""
    return [(shard.record, stats) for shard, stats in zip(group.shards(), server_stats(group), strict=True)]


def _ok(job):
    assert job.codes == [0, 0], "\n----\n".join(job.logs)


def test_bsp_two_servers_killed_one_after_the_other_end_bit_identical(tmp_path):
    """SIGKILL of process 0 at step 4: process 1 takes shard 0 over, the launcher starts a replacement
    process 0, which becomes the backup of both shards again; then SIGKILL of process 1 at step 8: the
    replacement takes both shards over. Every clock is applied once, and the final parameters are
    bit-identical to the fault-free run's."""
    clean = _job("bsp", None)
    _ok(clean)
    faults = Faults(tmp_path).kill("server", 0, 4).kill("server", 1, 8)
    job = _job("bsp", faults, await_backups_at=6)  # the workers wait at step 6 until both shards have two copies
    _ok(job)
    faults.assert_fired("server", 0, 4, "kill")
    faults.assert_fired("server", 1, 8, "kill")
    (record0, (stats0, _)), (record1, (stats1, _)) = job.stats
    assert (record0.primary, record1.primary) == (0, 0) and min(record0.gen, record1.gen) >= 4, (record0, record1)
    for stats in (stats0, stats1):
        assert stats["bsp_done"] == STEPS and set(stats["steps"].values()) == {STEPS}  # every clock applied once
    for result in job.results:  # each worker turned to process 1 for shard 0, then to the replacement for both
        assert sorted((t["shard"], t["gen"]) for t in result["takeovers"]) == [(0, 2), (0, 4), (1, 4)], result
    want = ps_tasks.single_process("adam", STEPS, world=2)
    got = job.arrays()
    for name in want:
        assert np.array_equal(got[name], clean.arrays()[name]), name  # bit for bit: the fault-free run's
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)


def test_asp_server_killed_mid_run_applies_every_push_exactly_once(tmp_path):
    """With the job's Raft control plane (`shoal run --control raft`), which then holds the shards'
    records (`shoal.ps.records`): the claim and the replacement's record are committed there."""
    faults = Faults(tmp_path).kill("server", 1, 4)
    key = secrets.token_hex(16)

    def holders_and_the_stores_records(group):
        return [*_holders(group), [ShardRecord.parse(group.store.get(shard_key(i))) for i in (0, 1)]]

    with control_serving("raft", key) as control_env:
        env = {**faults.env(), **control_env, "SHOAL_JOB_KEY": key}
        job = _job("asp", faults, optim="sgd", env=env, before_stop=holders_and_the_stores_records)
    _ok(job)
    faults.assert_fired("server", 1, 4, "kill")
    (record0, (stats0, _)), (record1, (stats1, _)), stored = job.stats
    assert stored == [first_record(0, 2, 2), first_record(1, 2, 2)]  # the store's copies never moved
    assert record0.primary == 0 and record1.primary == 0 and record1.gen >= 2
    for stats in (stats0, stats1):  # the servers' own record, the survivor's copy of shard 1 included
        assert stats["pushed"] == [STEPS, STEPS]
        assert set(stats["steps"].values()) == {2 * STEPS}  # ASP: each push applied once, none twice or lost
        assert stats["applied"] == 2 * STEPS


def test_a_stopped_primary_is_fenced_and_gives_its_shards_up_when_it_wakes(tmp_path):
    """SIGSTOP of process 0 for 4 s: its backup takes shard 0 over within the lease (well under 2.5 s);
    when process 0 wakes it finds a newer generation, gives both its replicas up and exits by itself,
    and nothing it sends after waking changes the run (it ends where one process with the combined batch does)."""
    faults = Faults(tmp_path).stop("server", 0, 4, seconds=4)

    def woke_and_left(group):
        deadline = time.monotonic() + 15
        while not group.replaced[0]:  # it wakes 4 s after the stop, finds itself fenced, and exits
            assert time.monotonic() < deadline, "process 0 did not leave"
            time.sleep(0.1)
        return _holders(group)

    args = {
        "task": "equiv",
        "optim": "adam",
        "steps": STEPS,
        "params": True,
        "strategy": {"consistency": "bsp", "servers": 2, "chunk_bytes": 1024},
    }
    job = run_ps_job(2, 2, ps_tasks.run, args, env=faults.env(), before_stop=woke_and_left)
    _ok(job)
    stopped = faults.assert_fired("server", 0, 4, "stop")
    (record0, _), (record1, _) = job.stats
    assert record0.primary == record1.primary == 1 and min(record0.gen, record1.gen) >= 2
    taken = [t["unix_time"] for r in job.results for t in r["takeovers"] if t["shard"] == 0]
    assert len(taken) == 2 and max(taken) - stopped["unix_time"] < 2.5, (taken, stopped)
    got = job.arrays()
    for name, value in ps_tasks.single_process("adam", STEPS, world=2).items():
        np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0, err_msg=name)


def test_both_copies_lost_stops_the_job_naming_the_pieces_and_the_checkpoint(tmp_path):
    """Both server processes killed at step 7 (so both copies of every shard): the job stops within
    the workers' timeout with one sentence naming the lost shards' pieces and the newest checkpoint
    (step 6) to resume from, and no process is left (the control plane's members neither: the job
    runs with `launch.control = "raft"`, where the shards' records then live)."""
    faults = Faults(tmp_path).kill("server", 0, 7).kill("server", 1, 7)
    result = shoal(
        "train",
        f"--logging.run_dir={tmp_path}",
        "--logging.name=lost",
        "--train.steps=12",
        "--checkpoint.every=3",
        "--model.hidden=[64]",
        "--data.batch_size=16",
        "--strategy.name=parameter_server",
        "--strategy.servers=2",
        "--strategy.timeout_s=10",
        "--launch.control=raft",
        "--logging.tensorboard=false",
        "--logging.progress=false",
        timeout=90,
        env=faults.env(),
    )
    assert result.returncode == 1, result.stderr[-3000:]
    killed = [faults.assert_fired("server", p, 7, "kill")["pid"] for p in (0, 1)]
    last = result.stderr.strip().splitlines()[-1]
    assert "parameter-server shard(s) [0, 1] (1.weight, 1.bias, 3.bias, 3.weight) lost" in last, last
    assert "neither process holding them answered within 10s" in last, last
    assert "resume from its newest checkpoint" in last and "step-00000006" in last, last
    assert "not restarted, for a restart would meet the same error" in last, last  # the shards are gone
    assert not result.survivors, f"processes outlived the job: {result.survivors}"
    assert not any(pid_alive(p) for p in killed)
