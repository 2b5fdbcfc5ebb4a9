"""The fault schedule (`shoal.faults`) in this process: parsing names the entry
that is wrong; matching, probability, raise and sleep act as written; each
fired fault is recorded. Kill and stop on a real child: tests/multiproc/test_fault_actions.py."""

from __future__ import annotations

import json
import time

import pytest

from shoal import env, faults
from tests.helpers.faults import Faults


@pytest.fixture
def with_schedule(monkeypatch):
    """Install a schedule as a child would find it in its environment."""

    def install(schedule: Faults) -> None:
        monkeypatch.setenv(env.FAULTS, schedule.env()[env.FAULTS])
        monkeypatch.setattr(faults, "_schedule", None)
        monkeypatch.setattr(faults, "_rngs", {})
        monkeypatch.setattr(faults, "_fired", {})

    return install


def test_a_bare_list_and_an_object_parse_to_the_same_faults():
    entries = [
        {"role": "worker", "rank": 1, "step": 5, "action": "kill"},
        {"role": "server", "rank": "*", "step": 3, "action": "stop", "seconds": 2},
        {"role": "worker", "action": "sleep", "seconds": 0.5, "prob": 0.25},
    ]
    bare = faults.parse(json.dumps(entries))
    full = faults.parse(json.dumps({"record": "/tmp/r.jsonl", "seed": 7, "faults": entries}))
    assert bare.faults == full.faults and (full.record, full.seed) == ("/tmp/r.jsonl", 7)
    kill, stop, sleep = full.faults
    assert (kill.rank, kill.step, stop.rank, stop.seconds, sleep.rank, sleep.step) == (1, 5, None, 2.0, None, None)
    assert kill.matches("worker", 1, 5) and not kill.matches("worker", 0, 5) and not kill.matches("server", 1, 5)
    assert sleep.matches("worker", 9, 123) and not sleep.matches("server", 9, 123)
    assert faults.parse("").faults == () and faults.parse("  ").faults == ()


@pytest.mark.parametrize(
    "text, says",
    [
        ("[{", "is not valid JSON"),
        ('{"faults": {}}', "must be a JSON list of faults"),
        ('{"faults": [], "recrod": "x"}', "must be a JSON list of faults"),
        ('{"faults": [], "seed": 1.5}', "'seed' (an integer)"),
        ('["kill"]', 'fault 0 ("kill") must be a JSON object'),
        ('[{"role": "worker", "action": "kill"}, {"role": "client", "action": "kill"}]', "fault 1 ("),
        ('[{"role": "client", "action": "kill"}]', "'role' must be one of worker, server"),
        ('[{"role": "worker", "action": "explode"}]', "'action' must be one of raise, kill, stop, sleep"),
        ('[{"role": "worker", "action": "kill", "rank": -1}]', "'rank' must be an integer >= 0 or '*'"),
        ('[{"role": "worker", "action": "kill", "rank": true}]', "'rank' must be an integer"),
        ('[{"role": "worker", "action": "kill", "step": 0}]', "'step' must be an integer >= 1 or '*'"),
        ('[{"role": "worker", "action": "kill", "step": "3"}]', "'step' must be an integer"),
        ('[{"role": "worker", "action": "stop"}]', "'stop' needs 'seconds' > 0"),
        ('[{"role": "worker", "action": "sleep", "seconds": "1"}]', "'seconds' must be a number"),
        ('[{"role": "worker", "action": "sleep", "seconds": 1, "prob": 2}]', "'prob' in [0, 1]"),
        ('[{"role": "worker", "action": "kill", "secs": 1}]', "unknown key(s) 'secs'"),
    ],
)
def test_parse_errors_name_the_entry(text, says):
    with pytest.raises(ValueError) as err:
        faults.parse(text)
    assert says in str(err.value) and env.FAULTS in str(err.value)


def test_no_schedule_is_a_no_op(monkeypatch):
    monkeypatch.delenv(env.FAULTS, raising=False)
    monkeypatch.setattr(faults, "_schedule", None)
    faults.at_step("worker", 0, 1)
    assert faults.schedule().faults == ()


def test_raise_fires_at_its_step_only_and_is_recorded_first(tmp_path, with_schedule):
    schedule = Faults(tmp_path).raise_at("worker", 1, 3)
    with_schedule(schedule)
    for step in (1, 2, 4):
        faults.at_step("worker", 1, step)
    faults.at_step("worker", 0, 3)
    faults.at_step("server", 1, 3)
    assert schedule.fired() == []
    with pytest.raises(faults.InjectedFaultError, match="injected fault: worker 1 at step 3"):
        faults.at_step("worker", 1, 3)
    (record,) = schedule.fired()
    assert {k: record[k] for k in ("role", "rank", "step", "action")} == {
        "role": "worker",
        "rank": 1,
        "step": 3,
        "action": "raise",
    }
    assert isinstance(record["pid"], int)


def test_a_fired_fault_stays_fired_in_a_restarted_process(tmp_path, with_schedule, monkeypatch):
    schedule = Faults(tmp_path).raise_at("worker", 1, 3)
    with_schedule(schedule)
    with pytest.raises(faults.InjectedFaultError):
        faults.at_step("worker", 1, 3)
    monkeypatch.setattr(faults, "_fired", {})  # a new process, as torch's agent starts after a failure
    faults.at_step("worker", 1, 3)  # the redone step: the record says it fired already
    assert len(schedule.fired()) == 1


def test_sleep_sleeps_and_probability_is_reproducible(tmp_path, with_schedule):
    schedule = Faults(tmp_path).sleep("worker", "*", 2, seconds=0.2)
    with_schedule(schedule)
    start = time.perf_counter()
    faults.at_step("worker", 5, 1)
    assert time.perf_counter() - start < 0.1
    faults.at_step("worker", 5, 2)
    assert time.perf_counter() - start >= 0.2
    assert [(r["rank"], r["step"], r["action"]) for r in schedule.fired()] == [(5, 2, "sleep")]

    def steps_fired(seed: int, rank: int) -> list[int]:
        where = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        where.mkdir()
        sched = Faults(where, seed=seed).sleep("worker", "*", "*", seconds=1e-4, prob=0.3)
        with_schedule(sched)
        for step in range(1, 201):
            faults.at_step("worker", rank, step)
        return [r["step"] for r in sched.fired()]

    once = steps_fired(0, 1)
    assert 30 <= len(once) <= 90  # about 30% of 200
    assert steps_fired(0, 1) == once  # the same seed and rank: the same stragglers
    assert steps_fired(0, 2) != once and steps_fired(1, 1) != once


def test_prob_zero_never_fires(tmp_path, with_schedule):
    schedule = Faults(tmp_path).add("worker", "*", "*", "raise", prob=0.0)
    with_schedule(schedule)
    for step in range(1, 50):
        faults.at_step("worker", 0, step)
    assert schedule.fired() == []


def test_the_helper_checks_its_schedule_before_any_process_sees_it(tmp_path):
    with pytest.raises(ValueError, match="fault 0"):
        Faults(tmp_path).add("worker", 0, 0, "kill").env()
