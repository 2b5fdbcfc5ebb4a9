"""Parameter-server workers that die: the servers notice within 2 s, keep running while the worker
comes back, and take it back at the clock they hold for it (`shoal.ps.membership`).

- SSP: the survivor goes on without waiting for the dead worker, which rejoins later; every push is
  applied exactly once (the server's own counts).
- BSP under `shoal train --launch.max_restarts=1`: torch's agent restarts both workers, they rejoin
  the running servers, and the run ends bit-identical to the fault-free one.
"""

from __future__ import annotations

import json
import re
import sys

from tests.helpers.faults import Faults
from tests.helpers.procs import Processes
from tests.helpers.ps import server_stats, servers
from tests.helpers.runs import assert_same_final_state, ps_train_args, train_whole_and_killed

STEPS, KILL_AT = 30, 8


def test_ssp_survivor_goes_on_and_the_killed_worker_rejoins_at_its_clock(tmp_path):
    faults = Faults(tmp_path).kill("worker", rank=1, step=KILL_AT)
    with Processes() as procs:
        group = servers(procs, 1, {"SHOAL_PS_TIMEOUT_S": "120"})
        env = {**group.env, **faults.env()}

        def worker(rank: int, name: str):
            argv = [sys.executable, "-m", "tests.workers.ps_rejoin", str(rank), "2", str(STEPS), str(tmp_path)]
            return procs.start(argv, timeout=240, env=env, name=name)

        first = [worker(0, "w0"), worker(1, "w1")]
        survivor, killed = (p.wait() for p in first)
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert survivor.returncode == 0, survivor.stderr[-3000:]  # it finished all its steps alone
        again = worker(1, "w1-again").wait()
        assert again.returncode == 0, again.stderr[-3000:]
        ((stats, _),) = server_stats(group)
    kill = faults.assert_fired("worker", 1, KILL_AT, "kill")
    assert kill["pid"] == first[1].pid != json.loads((tmp_path / "rank1.json").read_text())["pid"]
    # the server's own record: worker 1 left at the clock of its 7 pushes and came back there
    assert [(d["worker"], d["clock"]) for d in stats["departures"]] == [(1, KILL_AT - 1)]
    assert [(r["worker"], r["clock"]) for r in stats["rejoins"]] == [(1, KILL_AT - 1)]
    assert json.loads((tmp_path / "rank1.json").read_text())["joined_at"] == KILL_AT - 1
    # every push applied once: STEPS clocks from each, no repeat refused, nothing else dropped
    assert stats["pushed"] == [STEPS, STEPS] and stats["applied"] == 2 * STEPS and not stats["dropped"]
    # detected within 2 s of the kill, and the survivor never waited 2 s for a step
    killed_at = (tmp_path / "faults.jsonl").stat().st_mtime  # the record line is written right before the kill
    assert stats["departures"][0]["unix_time"] - killed_at < 2.0, stats["departures"]
    gaps = json.loads((tmp_path / "rank0.json").read_text())["gaps"]
    assert max(gaps) < 2.0, gaps


COMMON = [*ps_train_args(12), "--strategy.consistency=bsp"]


def test_bsp_worker_killed_mid_push_is_restarted_rejoins_and_the_run_ends_bit_identical(tmp_path):
    """Killed in its 7th push, after its message to server 0 and before server 1's: server 0 holds
    7 of its pushes, server 1 holds 6. Its replacement computes step 7 again from the values before
    server 0 applied it (`shoal.ps.reads.answer_previous`); worker 0, stopped by the agent, rejoins
    both servers at one clock."""
    killed = train_whole_and_killed(tmp_path, COMMON, timeout=240, role="push")
    assert re.search(r"\[rank0\]: shoal: restart 1: resuming at step 7 from the parameter servers", killed.stdout)
    assert "the servers hold clocks [7, 6] for this worker (killed mid-push)" in killed.stderr
    events = [json.loads(line) for line in (tmp_path / "killed" / "ps_events.jsonl").read_text().splitlines()]
    assert sorted(e["clock"] for e in events if e.get("departed") == 1) == [6, 7]
    assert sorted(e["clock"] for e in events if e.get("rejoined") == 1) == [6, 7]
    assert_same_final_state(tmp_path / "whole", tmp_path / "killed")
