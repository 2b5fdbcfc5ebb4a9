"""The embedded control plane across test hosts: a leader cut off by a partition cannot act.

Members on hosts 0-2 (network namespaces), a writing client on host 3. The
leader is cut from both other members (the client still reaches it): no two
members lead in one term, a write sent through it alone is not acknowledged, the other two elect a leader and
writes go on, and after healing no acknowledged write is missing anywhere.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from tests.helpers.control import KEY, Cluster
from tests.helpers.hosts import TestHosts, can_make_hosts
from tests.helpers.procs import Processes

pytestmark = pytest.mark.skipif(bool(can_make_hosts()), reason=can_make_hosts() or "test hosts can be made")


def lines(proc) -> list[dict]:
    return [json.loads(line) for line in proc.stdout().splitlines() if line.startswith("{")]


def wait_line(proc, key: str, timeout: float = 90.0) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = [row for row in lines(proc) if key in row]
        if found:
            return found[0]
        assert proc.poll() is None, f"the client exited: {proc.stderr()[-2000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no {key!r} from the client within {timeout} s: {proc.stderr()[-2000:]}")


def test_a_leader_cut_off_cannot_acknowledge_and_no_acknowledged_write_is_lost(tmp_path):
    with TestHosts(4) as hosts, Processes() as procs:
        cluster = Cluster.start(procs, tmp_path, hosts=hosts)
        argv = [sys.executable, "-m", "tests.workers.control_partition", ",".join(cluster.members), str(tmp_path)]
        client = procs.start(hosts[3].argv(argv), timeout=150, env={"SHOAL_JOB_KEY": KEY})
        leader = wait_line(client, "leader")["leader"]
        others = [i for i in range(3) if i != leader]
        time.sleep(1.0)  # some writes before the cut
        for other in others:
            hosts.cut(leader, other)
        (tmp_path / "cut").touch()
        leaders = wait_line(client, "leaders")["leaders"]
        during = wait_line(client, "acked_during_cut")
        for other in others:
            hosts.heal(leader, other)
        (tmp_path / "healed").touch()
        final = wait_line(client, "acked", timeout=60)
        cut_off = wait_line(client, "cut_off_put")["cut_off_put"]
        assert "did not acknowledge put" in cut_off  # the isolated leader acknowledged nothing
        terms = [term for term, _ in leaders]
        assert len(terms) == len(set(terms)), f"two leaders in one term: {leaders}"  # [term, member] pairs
        assert during["acked_during_cut"] > 0, "the majority side did not take writes during the cut"
        assert final["acked"] and final["lost"] == []
        assert final["missing_per_member"] == [0, 0, 0]
        assert final["cut_off_key"] is None  # its entry, never committed, was replaced on healing
