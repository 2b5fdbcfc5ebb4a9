"""A control-plane client on a test host, driven by files the test creates (no stdin under the harness).

    python -m tests.workers.control_partition RAFT_MEMBERS DIR

Prints JSON lines: {"leader": i} once a write commits; then writes w/0, w/1, ...
in a thread (1 s per try), and when DIR/cut appears samples which members say
they lead (and in which term) and tries a write through the old leader alone;
when DIR/healed appears, stops writing and prints what was acknowledged and
what every member holds.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from shoal.control import ControlError, RaftControl


def wait_for(path: Path, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"{path} never appeared")
        time.sleep(0.05)


def say(**fields) -> None:
    print(json.dumps(fields), flush=True)


def leader_of(ctl: RaftControl) -> int:
    while True:
        for i in range(len(ctl.members)):
            try:
                if ctl.local(i, "\0", timeout=0.5)["leader"]:
                    return i
            except ControlError:
                pass
        time.sleep(0.05)


def sample_leaders(members: list[str], seconds: float) -> list[list[int]]:
    """[term, member] of every member that said it leads, sampled for `seconds` (right after the cut)."""
    seen: set[tuple[int, int]] = set()
    end = time.monotonic() + seconds
    with RaftControl(members) as ctl:
        while time.monotonic() < end:
            for i in range(len(members)):
                try:
                    state = ctl.local(i, "\0", timeout=0.2)
                except ControlError:
                    continue
                if state["leader"]:
                    seen.add((state["term"], i))
            time.sleep(0.02)
    return sorted([term, i] for term, i in seen)


def main(members: list[str], folder: Path) -> None:
    with RaftControl(members, timeout=60) as ctl:
        ctl.put("ready", True)
        leader = leader_of(ctl)
    say(leader=leader)
    acked: list[int] = []
    stop = threading.Event()

    def write() -> None:
        with RaftControl(members, timeout=1.0) as w:
            i = 0
            while not stop.is_set():
                try:
                    w.put(f"w/{i}", i)
                    acked.append(i)
                except ControlError:
                    pass
                i += 1

    writer = threading.Thread(target=write)
    writer.start()
    wait_for(folder / "cut")
    at_cut = len(acked)
    say(leaders=sample_leaders(members, seconds=1.5))
    with RaftControl([members[leader]], timeout=2.0) as alone:
        try:
            alone.put("through-the-cut-off-leader", True)
            say(cut_off_put="acknowledged")
        except ControlError as exc:
            say(cut_off_put=str(exc))
    time.sleep(1.0)
    say(acked_during_cut=len(acked) - at_cut)
    wait_for(folder / "healed")
    time.sleep(0.5)
    stop.set()
    writer.join()
    with RaftControl(members, timeout=10) as ctl:
        held = ctl.range("w/")
        end = time.monotonic() + 5.0  # the healed member catches up within a few heartbeats
        while True:
            local = [ctl.local(i, "w/")["items"] for i in range(len(members))]
            if all(set(m) >= {f"w/{i}" for i in acked} for m in local) or time.monotonic() > end:
                break
            time.sleep(0.1)
    say(
        acked=acked,
        lost=[i for i in acked if held.get(f"w/{i}") != i],
        missing_per_member=[len({f"w/{i}" for i in acked} - set(m)) for m in local],
        cut_off_key=held.get("through-the-cut-off-leader"),
    )


if __name__ == "__main__":
    main(sys.argv[1].split(","), Path(sys.argv[2]))
