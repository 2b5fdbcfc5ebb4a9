"""Control plane failover: SIGKILL the leader of three embedded members, time until writes succeed again.

Each trial: every member up and holding the last write; the leader (asked of
the members) is SIGKILLed; a client that was writing before the kill keeps
calling `put` (it retries on its own: next member, leader hints) and the time
from the kill to the first acknowledged write is recorded. The killed member
is restarted on its own journal before the next trial, so it also rejoins.
Shoal's timing (elections after 0.3-0.6 s of silence, heartbeat 0.02 s) is
compared in the same run with pysyncobj's defaults (0.4-1.4 s, 0.1 s).

    PYTHONPATH=. python benchmarks/control.py [--trials 20] [--only shoal|defaults]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

from shoal import env
from tests.helpers.control import Cluster
from tests.helpers.procs import Processes

TIMINGS = {"shoal": "0.3,0.6,0.02", "defaults": "0.4,1.4,0.1"}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def caught_up(cluster: Cluster, key: str, timeout: float = 120.0) -> None:
    """Until every member has applied `key` (a restarted member has rejoined)."""
    end = time.monotonic() + timeout
    with cluster.client() as ctl:
        while time.monotonic() < end:
            try:
                if all(key in ctl.local(i, key, timeout=0.5)["items"] for i in range(3)):
                    return
            except Exception:
                pass
            time.sleep(0.1)
    raise SystemExit(f"a member did not catch up with {key} within {timeout} s")


def trials(timing: str, count: int) -> list[float]:
    times = []
    with Processes() as procs, tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster.start(procs, Path(tmp), env={env.CONTROL_TIMING: timing})
        cluster.wait_ready()
        with cluster.client(timeout=30) as ctl:
            for n in range(count):
                ctl.put(f"before/{n}", n)
                caught_up(cluster, f"before/{n}")
                leader = cluster.leader()
                cluster.kill(leader)
                killed = time.monotonic()
                ctl.put(f"after/{n}", n)
                times.append(time.monotonic() - killed)
                assert ctl.get(f"before/{n}") == n, "an acknowledged write was lost"
                print(f"  {timing}: trial {n + 1}/{count}: member {leader} killed, writes back in {times[-1]:.3f} s")
                cluster.restart(leader)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--only", choices=sorted(TIMINGS))
    args = parser.parse_args()
    result, parts = {"trials": args.trials, "timings": {}}, []
    for name, timing in TIMINGS.items():
        if args.only and name != args.only:
            continue
        times = trials(timing, args.trials)
        stats = {q: round(percentile(times, q), 3) for q in (50, 95, 99)}
        result["timings"][name] = {
            "election_min_max_heartbeat_s": timing,
            "seconds": times,
            "mean": statistics.mean(times),
        }
        result["timings"][name].update({f"p{q}": v for q, v in stats.items()})
        parts.append(f"{name} ({timing}) p50 {stats[50]:.2f} s, p95 {stats[95]:.2f} s, p99 {stats[99]:.2f} s")
    summary = f"control plane, writes again after the leader's SIGKILL, {args.trials} trials: " + "; ".join(parts)
    _harness.write("control", result, summary)


if __name__ == "__main__":
    main()
