"""Chaos: kill or stop one process of a running job at a random step, many times; how fast it comes back,
how much it redoes, and whether it ends where the fault-free run ends.

Each scenario is a function `(rng, workdir) -> dict` run once per trial, returning

- `detect_s`: from the fault (the fault record's mtime, written and fsynced just
  before it fires) to the next round of workers starting (its log folder: the
  failure was seen and the old round stopped); None where it does not apply;
- `recover_s`: from the fault to training running again (the `restart` record,
  written once every rank has loaded its recovery point), or, for the control
  plane, to the first acknowledged write;
- `redone_steps`: steps done before the fault and done again after it;
- `equal`: the final parameters and optimizer state equal the fault-free run's bit for bit
  (the control plane: no acknowledged write lost);
- `fired`: the fault fired (from its record).

Scenarios: `dp-rank-kill`, `dp-rank-stop` (SIGSTOP, found by the process group's
timeout, here `--launch.timeout_s=10`), `pipeline-stage-kill` (two pipeline
stages under `shoal train`), `control-leader-kill` (benchmarks/control.py's trial),
`control-member-kill` (a random member of a running `shoal run --control raft` job's three:
`equal` when its launcher started it again and the job ended well), `control-majority-stop`
(two of them SIGSTOPped: `detect_s` is the time to the job's stop, `equal` that it stopped
with the one sentence and left no process), and those of benchmarks/chaos_ps.py where it
exists (parameter-server workers).

    PYTHONPATH=. python benchmarks/chaos.py [--scenario NAME ...] [--trials 20]
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness

from tests.helpers.cli import finish, shoal, start_shoal
from tests.helpers.control import members_of
from tests.helpers.faults import Faults
from tests.helpers.procs import Processes
from tests.helpers.runs import final_params

Scenario = Callable[[random.Random, pathlib.Path], dict]

STEPS = 30
QUIET = ["--logging.tensorboard=false", "--logging.progress=false", f"--train.steps={STEPS}", "--checkpoint.every=0"]
DP = ["--model.dropout=0.2", "--optimizer.schedule=cosine"]
PIPELINE = ["--strategy.name=pipeline", "--strategy.stages=2", "--strategy.microbatches=4", "--strategy.split=params"]
HUNG_TIMEOUT_S = 10
_fault_free: dict[tuple[str, ...], dict] = {}


def train(root: Path, name: str, args: list[str], env: dict[str, str] | None = None) -> Path:
    result = shoal("train", f"--logging.run_dir={root}", f"--logging.name={name}", *QUIET, *args, env=env, timeout=600)
    if result.returncode != 0:
        raise SystemExit(f"{result.stderr[-3000:]}\nshoal train {name} exited with code {result.returncode}")
    if result.survivors:
        raise SystemExit(f"shoal train {name} left processes behind: {result.survivors}")
    return root / name


def fault_free(args: list[str], workdir: Path) -> dict:
    """The fault-free run's final state for these arguments (run once per benchmark)."""
    key = tuple(args)
    if key not in _fault_free:
        run = train(workdir.parent, f"fault-free-{len(_fault_free)}", args)
        _fault_free[key] = dict(zip(("model", "optim"), final_params(run), strict=True))
    return _fault_free[key]


def same(got: dict, want: dict) -> bool:
    def flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {}
        for k, v in tree.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}/"))
            elif isinstance(v, torch.Tensor):
                out[f"{prefix}{k}"] = v
        return out

    a, b = flat(got), flat(want)
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def restart_trial(rng: random.Random, workdir: Path, args: list[str], action: str, extra: list[str]) -> dict:
    """One `shoal train` run (2 workers, one restart allowed) whose worker of a random rank is
    killed or stopped at a random step."""
    rank, step = rng.randrange(2), rng.randrange(2, STEPS - 1)
    faults = Faults(workdir)
    if action == "kill":
        faults.kill("worker", rank=rank, step=step)
    else:
        faults.stop("worker", rank=rank, step=step, seconds=600)
    run = train(workdir, "run", [*args, *extra, "--launch.max_restarts=1"], env=faults.env())
    fired = [r for r in faults.fired() if r["rank"] == rank and r["step"] == step and r["action"] == action]
    at = faults.record.stat().st_mtime
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    restarts = [r for r in records if r["kind"] == "restart"]
    rounds = sorted(p.stat().st_mtime for p in run.glob("logs/*/attempt_1/*"))
    want = fault_free(args, workdir)
    got = dict(zip(("model", "optim"), final_params(run), strict=True))
    return {
        "rank": rank,
        "step": step,
        "detect_s": rounds[0] - at if rounds else None,
        "recover_s": restarts[0]["unix_time"] - at if restarts else None,
        "redone_steps": (step - 1) - restarts[0]["step"] if restarts else None,
        "equal": same(got, want),
        "fired": len(fired) == 1,
        "restarts": len(restarts),
    }


def dp_rank_kill(rng: random.Random, workdir: pathlib.Path) -> dict:
    return restart_trial(rng, workdir, DP, "kill", [])


def dp_rank_stop(rng: random.Random, workdir: pathlib.Path) -> dict:
    return restart_trial(rng, workdir, DP, "stop", [f"--launch.timeout_s={HUNG_TIMEOUT_S}"])


def pipeline_stage_kill(rng: random.Random, workdir: pathlib.Path) -> dict:
    return restart_trial(rng, workdir, PIPELINE, "kill", [])


def control_leader_kill(rng: random.Random, workdir: pathlib.Path) -> dict:
    """benchmarks/control.py's trial: three members, the leader SIGKILLed, time to the next acknowledged write
    (it asserts that the write acknowledged before the kill is still there)."""
    import control

    (seconds,) = control.trials(control.TIMINGS["shoal"], 1)
    return {"detect_s": None, "recover_s": seconds, "redone_steps": 0, "equal": True, "fired": True}


def _guarded_job(rng: random.Random, act: Callable[[dict[int, int], random.Random], None], seconds: float) -> dict:
    """`shoal run -n 1 --control raft` of tests/workers/ticking.py for `seconds`; once it ticks (after a random
    0.5-3 s more), `act(members, rng)` on its members (index -> pid); how the job ended, and when."""
    with Processes() as procs:
        argv = ["run", "-n", "1", "--control", "raft", "tests/workers/ticking.py", seconds]
        job = start_shoal(procs, *argv, timeout=seconds + 60)
        members = job.until(lambda: len(m := members_of(job.pid)) == 3 and "tick 5 " in job.stdout() and m, 60)
        time.sleep(rng.uniform(0.5, 3.0))
        acted = time.monotonic()
        act(members, rng)
        done = finish(job)
        return {"took": time.monotonic() - acted, "done": done}


def control_member_kill(rng: random.Random, workdir: pathlib.Path) -> dict:
    """A random member of a running job's three SIGKILLed: `equal` when its launcher said it started it
    again and the job ended well, every tick done and nothing left."""
    killed: list[float] = []

    def kill(members: dict[int, int], rng: random.Random) -> None:
        os.kill(members[rng.randrange(3)], signal.SIGKILL)
        killed.append(time.monotonic())

    ended = _guarded_job(rng, kill, 8)
    done = ended["done"]
    again = "started again from its journal (1 of 3)" in done.stderr
    return {
        "detect_s": None,
        "recover_s": None,
        "redone_steps": 0,
        "equal": done.returncode == 0 and again and "tick 79 " in done.stdout and not done.survivors,
        "fired": bool(killed),
    }


def control_majority_stop(rng: random.Random, workdir: pathlib.Path) -> dict:
    """Two random members of a running job's three SIGSTOPped: the job stops (`detect_s`: from the second
    stop to the launcher's exit) with one sentence that names both (`equal`), leaving no process."""

    def stop(members: dict[int, int], rng: random.Random) -> None:
        for i in rng.sample(range(3), 2):
            os.kill(members[i], signal.SIGSTOP)

    ended = _guarded_job(rng, stop, 120)
    done = ended["done"]
    said = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ""
    return {
        "detect_s": ended["took"],
        "recover_s": None,
        "redone_steps": None,
        "equal": done.returncode == 1 and "the control plane lost its majority" in said and not done.survivors,
        "fired": True,
    }


SCENARIOS: dict[str, Scenario] = {
    "dp-rank-kill": dp_rank_kill,
    "dp-rank-stop": dp_rank_stop,
    "pipeline-stage-kill": pipeline_stage_kill,
    "control-leader-kill": control_leader_kill,
    "control-member-kill": control_member_kill,
    "control-majority-stop": control_majority_stop,
}
try:  # parameter-server workers, written beside this one
    import chaos_ps  # pyright: ignore[reportMissingImports]  # its parameter-server scenarios
except ImportError:
    pass
else:
    SCENARIOS.update(chaos_ps.SCENARIOS)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summarize(name: str, trials: list[dict]) -> tuple[dict, str]:
    def pct(key: str) -> dict[str, float | None]:
        values = [t[key] for t in trials if t.get(key) is not None]
        return {"p50": percentile(values, 50), "p95": percentile(values, 95)}

    def shown(stats: dict[str, float | None]) -> str:
        return "n/a" if stats["p50"] is None else f"p50 {stats['p50']:.2f} s, p95 {stats['p95']:.2f} s"

    redone = [t["redone_steps"] for t in trials if t.get("redone_steps") is not None]
    stats = {
        "trials": len(trials),
        "detect_s": pct("detect_s"),
        "recover_s": pct("recover_s"),
        "redone_steps_mean": statistics.mean(redone) if redone else None,
        "redone_steps_max": max(redone) if redone else None,
        "equal": sum(bool(t["equal"]) for t in trials),
        "fired": sum(bool(t["fired"]) for t in trials),
    }
    line = (
        f"{name}: {len(trials)} trials, detection {shown(stats['detect_s'])}, recovery {shown(stats['recover_s'])}, "
        f"redone steps mean {stats['redone_steps_mean'] if redone else 'n/a'} max {stats['redone_steps_max']}, "
        f"equal {stats['equal']}/{len(trials)}, fired {stats['fired']}/{len(trials)}"
    )
    return stats, line


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=sorted(SCENARIOS), default=list(SCENARIOS))
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="shoal-chaos-"))
    result: dict = {"trials": args.trials, "seed": args.seed, "steps": STEPS, "scenarios": {}}
    lines = []
    for name in args.scenario:
        trials = []
        for n in range(args.trials):
            workdir = root / name / f"trial{n}"
            workdir.mkdir(parents=True)
            trials.append(SCENARIOS[name](rng, workdir))
            print(f"{name} {n + 1}/{args.trials}: {json.dumps(trials[-1])}", flush=True)
        stats, line = summarize(name, trials)
        result["scenarios"][name] = {**stats, "each": trials}
        lines.append(line)
        print(line, flush=True)
    _harness.write("chaos", result, "\n".join(lines))


if __name__ == "__main__":
    main()
