"""Chaos trials for the parameter server: kill (SIGKILL) or stop (SIGSTOP) a worker, or a server
process, of a running `shoal train` job at a random step, and measure how the job recovers.

Each scenario is `SCENARIOS[name](rng, work_dir) -> dict` (merged into benchmarks/chaos.py's registry):

- `detect_s`: from the fault (the fault record's mtime: written and fsynced right before the signal)
  to the first server's "departed" event for that worker (its own clock, `unix_time`);
- `recover_s`: from the fault to the last "rejoined" event of the round the restart brought back
  (every worker rejoined: torch's agent restarts them all);
- `redone_steps`: steps the faulty worker had pushed and pushed again: its step at the fault minus
  one minus the clock the servers gave it back (0: it goes on from the step it was stopped in);
- `equal`: BSP, the final parameters and optimizer state are bit-identical to a fault-free run's;
  SSP/ASP, the servers' own final records show every worker's pushes applied exactly once (each
  piece stepped workers x steps times, no push refused or repeated);
- `fired`: the fault fired exactly once.

Server scenarios (`ps-server-{kill,stop}-{bsp,ssp,asp}`; shards replicated on both servers,
`shoal.ps.replication`): the fault hits server process 0 or 1 at a random step;

- `failover_s`: from the fault to the "takeover" event of the shard that process was primary for
  (its backup's claim won, and it told the workers);
- `stall_s`: the job's stall: the longest gap between two steps of a worker (a microsecond sleep
  fault at every worker step records its time) that spans the fault, less that worker's median gap;
- `equal`: as for workers (BSP bit-identical; SSP/ASP every push applied exactly once, from the
  final records of the shards' primaries at the end).

`ps-worker-kill-midpush-{bsp,asp}`: as `ps-worker-kill-*`, but the worker dies inside its push,
between its message to server 0 and to server 1; `redone_steps` counts from the lower clock.

`ps-server-kill-twice-bsp`: server process p is killed at step 2-4 and the other at step 14 (the
workers sleep 0.3 s a step, so about 3 s later); the second failure is survived only if the
launcher's replacement of p became both shards' backup in between (`shoal.ps.replacement`).
`rereplicated_s`: from the first kill to the second shard's "backup" event; `backed_up_in_time`:
whether that came before the second kill (if not, losing the job is the right outcome: both copies
of a shard went); `failover_s`: from the second kill to the first takeover; `equal`: bit-identical
to the fault-free run.

Every trial is a 2-worker, 2-server `shoal train` run (the digits MLP, Adam, dropout) with
`--launch.max_restarts=1`:

    PYTHONPATH=. .venv/bin/python benchmarks/chaos_ps.py --trials 20 [--only ps-worker-kill-bsp ...]

writes benchmarks/results/chaos_ps.json (after each scenario) and prints one line per scenario
(p50/p95). `--from-log LOG` rebuilds the JSON from the trial lines a run printed (one stopped early).
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import _harness

from tests.helpers.cli import shoal
from tests.helpers.faults import Faults
from tests.helpers.runs import final_params, ps_train_args

STEPS = 16
STOP_S = 4.0
"""How long a stopped server process stays stopped (its link's lease is 1.5 s)."""
WORKER_STOP_S = 6.0
"""How long a stopped worker stays stopped unless the launcher kills it first: longer than the servers'
4.45 s lease on a worker (`shoal.ps.membership`), so that every trial measures the detection."""
COMMON = ps_train_args(STEPS)
WORKERS = 2
_reference: dict[str, Path] = {}


def _train(root: Path, name: str, mode: str, *more: str, env: dict[str, str] | None = None):
    args = [*COMMON, f"--strategy.consistency={mode}", "--strategy.staleness=2", *more]
    return shoal("train", *args, f"--logging.run_dir={root}", f"--logging.name={name}", timeout=240, env=env)


def _reference_run(mode: str, work: Path) -> Path:
    """The fault-free run a BSP trial is compared with (one per process, in the first trial's folder)."""
    if mode not in _reference:
        done = _train(work, "reference", mode)
        if done.returncode != 0:
            raise RuntimeError(f"the fault-free {mode} run failed: {done.stderr[-2000:]}")
        _reference[mode] = work / "reference"
    return _reference[mode]


def _bit_identical(a: Path, b: Path) -> bool:
    (pa, oa), (pb, ob) = final_params(a), final_params(b)
    if pa.keys() != pb.keys() or oa["state"].keys() != ob["state"].keys():
        return False
    same = all(bool((pa[k] == pb[k]).all()) for k in pa)
    for key in oa["state"]:
        for name, value in oa["state"][key].items():
            other = ob["state"][key][name]
            same = same and (bool((value == other).all()) if hasattr(value, "shape") else value == other)
    return same


def _exactly_once(finals: list[dict], shards: int = 2) -> bool:
    """From each server's final record: every worker pushed STEPS clocks and each piece was stepped once per
    push (none applied twice, none lost; a repeated push the server refused is counted in `dropped`)."""
    if len(finals) != shards:  # one final record per shard, from whoever is its primary at the end
        return False
    for f in finals:
        if f["pushed"] != [STEPS] * WORKERS:
            return False
        if any(n != WORKERS * STEPS for n in f["steps"].values()):
            return False
    return True


def trial(mode: str, action: str, rng: random.Random, work: Path, role: str = "worker") -> dict:
    rank, step = rng.randrange(WORKERS), rng.randint(2, STEPS - 2)
    work.mkdir(parents=True, exist_ok=True)
    faults = Faults(work).add(role, rank, step, action, **({"seconds": WORKER_STOP_S} if action == "stop" else {}))
    done = _train(work, "faulty", mode, "--launch.max_restarts=1", env=faults.env())
    fired = [f for f in faults.fired() if (f["role"], f["rank"], f["step"]) == (role, rank, step)]
    out: dict = {"mode": mode, "action": action, "role": role, "rank": rank, "step": step, "fired": len(fired) == 1}
    out["returncode"] = done.returncode
    if done.returncode != 0:
        out["error"] = (done.stderr.strip().splitlines() or [""])[-1][:300]
        return {**out, "equal": False, "detect_s": None, "recover_s": None, "redone_steps": None}
    at = faults.record.stat().st_mtime
    events = [json.loads(line) for line in (work / "faulty" / "ps_events.jsonl").read_text().splitlines()]
    events = [e for e in events if e.get("topic") == "event"]
    departed = [e for e in events if e.get("departed") == rank and e["unix_time"] >= at - 0.5]
    rejoined = [e for e in events if "rejoined" in e and e["unix_time"] >= at]
    back = [e["clock"] for e in rejoined if e["rejoined"] == rank]
    out["detect_s"] = min(e["unix_time"] for e in departed) - at if departed else None
    out["recover_s"] = max(e["unix_time"] for e in rejoined) - at if rejoined else None
    out["redone_steps"] = (step - 1) - min(back) if back else None
    return _judge(mode, work, events, out)


def midpush_trial(mode: str, action: str, rng: random.Random, work: Path) -> dict:
    """The worker dies inside its push, after its message to server 0 and before server 1's (the fault
    schedule's `push` role): server 0 holds one more of its clocks than server 1."""
    return trial(mode, action, rng, work, role="push")


def _judge(mode: str, work: Path, events: list[dict], out: dict) -> dict:
    """`out` with `equal`: BSP, bit-identical to the fault-free run; SSP/ASP, every push applied once."""
    if mode == "bsp":
        out["equal"] = _bit_identical(_reference_run(mode, work), work / "faulty")
    else:
        finals = [e["final"] for e in events if "final" in e]
        out["equal"] = _exactly_once(finals)
        out["dropped"] = [f.get("dropped") for f in finals]
    return out


def _scenario(trial_of: Callable, role: str, mode: str, action: str) -> Callable[[random.Random, Path], dict]:
    def run(rng: random.Random, work: Path) -> dict:
        return trial_of(mode, action, rng, work)

    run.__name__ = f"ps_{role}_{action}_{mode}"
    return run


def _events(work: Path) -> list[dict]:
    lines = (work / "faulty" / "ps_events.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _stall(steps: list[dict], at: float) -> float | None:
    """The longest gap between two steps of a worker that spans `at`, less its median gap; the max over
    workers. `steps`: the fault record's microsecond sleeps, one per worker step, each with its time."""
    stalls = []
    for rank in range(WORKERS):
        times = sorted(f["unix_time"] for f in steps if f["rank"] == rank)
        gaps = [(b - a, a, b) for a, b in itertools.pairwise(times)]
        spanning = [g for g, a, b in gaps if a <= at <= b]
        if gaps and spanning:
            stalls.append(max(spanning) - statistics.median(g for g, _, _ in gaps))
    return max(stalls) if stalls else None


def server_trial(mode: str, action: str, rng: random.Random, work: Path) -> dict:
    process, step = rng.randrange(2), rng.randint(2, STEPS - 2)
    work.mkdir(parents=True, exist_ok=True)
    faults = Faults(work).add("server", process, step, action, **({"seconds": STOP_S} if action == "stop" else {}))
    faults.sleep("worker", "*", "*", 1e-6)  # a timestamp per worker step, for the stall
    done = _train(work, "faulty", mode, "--strategy.replication=2", env=faults.env())
    fired = [f for f in faults.fired() if (f["role"], f["rank"], f["step"]) == ("server", process, step)]
    out: dict = {"mode": mode, "action": action, "process": process, "step": step, "fired": len(fired) == 1}
    out["returncode"] = done.returncode
    if done.returncode != 0 or not fired:
        out["error"] = (done.stderr.strip().splitlines() or [""])[-1][:300]
        return {**out, "equal": False, "failover_s": None, "stall_s": None}
    at = fired[0]["unix_time"]
    events = _events(work)
    taken = [e for e in events if e.get("takeover") == process and e.get("unix_time", 0) >= at]
    out["failover_s"] = min(e["unix_time"] for e in taken) - at if taken else None
    out["stall_s"] = _stall([f for f in faults.fired() if f["role"] == "worker"], at)
    return _judge(mode, work, events, out)


TWICE_SLEEP_S = 0.6
"""Each worker step's sleep in `ps-server-kill-twice-bsp`: about 6 s between the two kills, time for a
replacement to start (a Python process importing torch: 1.5-4 s here, by load) and take the state."""


def twice_trial(mode: str, action: str, rng: random.Random, work: Path) -> dict:
    """SIGKILL one server process early, then the other late: the second failure is survived only if
    the launcher's replacement of the first became the backup of both shards in between."""
    first, step = rng.randrange(2), rng.randint(2, 4)
    second, later = 1 - first, STEPS - 2
    work.mkdir(parents=True, exist_ok=True)
    faults = Faults(work).add("server", first, step, "kill").add("server", second, later, "kill")
    faults.sleep("worker", "*", "*", TWICE_SLEEP_S)
    done = _train(work, "faulty", mode, "--strategy.replication=2", env=faults.env())
    fired = {(f["rank"], f["step"]): f["unix_time"] for f in faults.fired() if f["role"] == "server"}
    out: dict = {"mode": mode, "action": "kill-twice", "process": first, "step": step, "second_step": later}
    out.update(fired=len(fired) == 2, returncode=done.returncode)
    at, at2 = fired.get((first, step), 0.0), fired.get((second, later), 0.0)
    events = _events(work)
    if done.returncode != 0 or len(fired) != 2:
        out["error"] = (done.stderr.strip().splitlines() or [""])[-1][:300]
        backups = [e["unix_time"] for e in events if e.get("backup") is not None and e.get("unix_time", 0) < at2]
        out["backed_up_in_time"] = len(backups) >= 2  # False: the second kill came first, the loss is right
        return {**out, "equal": False, "rereplicated_s": None, "failover_s": None}
    backups = [e["unix_time"] for e in events if e.get("backup") is not None and at <= e.get("unix_time", 0)]
    out["rereplicated_s"] = max(backups[:2]) - at if len(backups) >= 2 else None  # both shards have two copies
    out["backed_up_in_time"] = len([t for t in backups if t < at2]) >= 2
    taken = [e["unix_time"] for e in events if e.get("takeover") is not None and e.get("unix_time", 0) >= at2]
    out["failover_s"] = min(taken) - at2 if taken else None
    return _judge(mode, work, events, out)


ACTIONS, MODES = ("kill", "stop"), ("bsp", "ssp", "asp")
SCENARIOS: dict[str, Callable[[random.Random, Path], dict]] = {
    f"ps-worker-{action}-{mode}": _scenario(trial, "worker", mode, action) for action in ACTIONS for mode in MODES
}
SCENARIOS.update({f"ps-server-{a}-{m}": _scenario(server_trial, "server", m, a) for a in ACTIONS for m in MODES})
SCENARIOS["ps-server-kill-twice-bsp"] = _scenario(twice_trial, "server", "bsp", "kill")
SCENARIOS.update({f"ps-worker-kill-midpush-{m}": _scenario(midpush_trial, "push", m, "kill") for m in ("bsp", "asp")})


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(name: str, trials: list[dict]) -> dict:
    figures: dict = {"trials": len(trials)}
    keys = ("failover_s", "stall_s") if name.startswith("ps-server") else ("detect_s", "recover_s", "redone_steps")
    if name == "ps-server-kill-twice-bsp":
        keys = ("rereplicated_s", "failover_s")
    for key in keys:
        values = [t[key] for t in trials if t.get(key) is not None]
        figures[key] = {"p50": statistics.median(values) if values else None, "p95": _pct(values, 0.95)}
    if name == "ps-server-kill-twice-bsp":
        figures["backed_up_in_time"] = sum(bool(t.get("backed_up_in_time")) for t in trials)
    figures["equal"] = sum(bool(t["equal"]) for t in trials)
    figures["fired"] = sum(bool(t["fired"]) for t in trials)
    figures["failed"] = sum(t.get("returncode") != 0 for t in trials)
    return figures


def line(name: str, f: dict) -> str:
    def fmt(key: str, unit: str = "s") -> str:
        p50, p95 = f[key]["p50"], f[key]["p95"]
        return "n/a" if p50 is None else f"p50 {p50:.2f}{unit} p95 {p95:.2f}{unit}"

    if "rereplicated_s" in f:
        timing = (
            f"both shards backed up again {fmt('rereplicated_s')} (before the second kill in "
            f"{f['backed_up_in_time']}), second failover {fmt('failover_s')}"
        )
    elif "failover_s" in f:
        timing = f"failover {fmt('failover_s')}, stall {fmt('stall_s')}"
    else:
        timing = f"detect {fmt('detect_s')}, recover {fmt('recover_s')}, redone steps {fmt('redone_steps', '')}"
    return (
        f"{name}: {f['trials']} trials, {timing}, equal {f['equal']}/{f['trials']}, fired {f['fired']}/{f['trials']}"
        f", failed runs {f['failed']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None, choices=sorted(SCENARIOS))
    parser.add_argument("--from-log", default=None, help="rebuild the JSON from the trial lines of a run's output")
    ns = parser.parse_args()
    command = "PYTHONPATH=. .venv/bin/python benchmarks/chaos_ps.py " + " ".join(sys.argv[1:])
    if ns.from_log:
        by_name: dict[str, list[dict]] = {}
        for text in Path(ns.from_log).read_text().splitlines():
            name, sep, record = text.partition(" trial ")
            if sep and name in SCENARIOS and ": " in record:
                by_name.setdefault(name, []).append(json.loads(record.split(": ", 1)[1]))
        return _write(command, by_name)
    root = Path(tempfile.mkdtemp(prefix="shoal-chaos-ps-"))
    by_name = {}
    for name in ns.only or list(SCENARIOS):
        rng = random.Random(f"{ns.seed}:{name}")
        by_name[name] = []
        for i in range(ns.trials):
            by_name[name].append(SCENARIOS[name](rng, root / name / f"trial{i}"))
            print(f"{name} trial {i}: {json.dumps(by_name[name][-1])}", flush=True)
        print(line(name, summarize(name, by_name[name])), flush=True)
        _write(command, by_name, quiet=True)
    _write(command, by_name)


def _write(command: str, by_name: dict[str, list[dict]], quiet: bool = False) -> None:
    results = {name: {"figures": summarize(name, trials), "trials": trials} for name, trials in by_name.items()}
    lines = "\n".join(line(name, r["figures"]) for name, r in results.items())
    _harness.write(
        "chaos_ps", {"command": command, "steps": STEPS, "workers": WORKERS, **results}, "" if quiet else lines
    )


if __name__ == "__main__":
    main()
