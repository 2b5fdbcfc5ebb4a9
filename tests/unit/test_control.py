"""The control plane's pieces that need no process: the state machine, the frames, the keys, the specs."""

from __future__ import annotations

import pytest

from shoal.control import ControlError, connect
from shoal.control.auth import client_key, raft_password
from shoal.control.frames import FrameError, Frames
from shoal.control.launch import client_address, member_argv
from shoal.control.state import apply, check_value, new_state

KEY = "unit-test-job-key-0123456789"


def run(state, op, client="c", seq=None):
    run.seq = getattr(run, "seq", 0) + 1
    return apply(state, client, seq or run.seq, op)


def test_a_repeated_request_number_returns_its_first_answer_and_acts_once():
    state = new_state()
    assert apply(state, "a", 1, {"op": "incr", "key": "g"}) == ["ok", 1]
    assert apply(state, "a", 1, {"op": "incr", "key": "g"}) == ["ok", 1]  # a retry or a replay
    assert apply(state, "a", 0, {"op": "incr", "key": "g"})[0] == "error"  # older than the last
    assert apply(state, "b", 1, {"op": "incr", "key": "g"}) == ["ok", 2]


def test_compare_and_set_absent_present_and_delete():
    state = new_state()
    assert run(state, {"op": "cas", "key": "p", "expected": None, "new": "a"}) == ["ok", True]
    assert run(state, {"op": "cas", "key": "p", "expected": None, "new": "b"}) == ["ok", False]
    assert run(state, {"op": "cas", "key": "p", "expected": "a", "new": None}) == ["ok", True]
    assert run(state, {"op": "get", "key": "p"}) == ["ok", None]


def test_an_expiry_applies_only_if_no_keep_alive_came_first():
    state = new_state()
    lease = run(state, {"op": "grant", "ttl": 1.0})[1]
    run(state, {"op": "put", "key": "m/w0", "value": 1, "lease": lease})
    beat = state["leases"][lease]["beat"]
    assert run(state, {"op": "keepalive", "lease": lease}) == ["ok", True]
    assert apply(state, "", 0, {"op": "expire", "lease": lease, "beat": beat}) == ["ok", False]
    assert run(state, {"op": "get", "key": "m/w0"}) == ["ok", 1]
    assert apply(state, "", 0, {"op": "expire", "lease": lease, "beat": beat + 1}) == ["ok", True]
    assert run(state, {"op": "range", "prefix": "m/"})[1]["items"] == {}
    assert run(state, {"op": "put", "key": "x", "value": 1, "lease": lease})[0] == "error"


def test_a_key_moved_to_another_lease_outlives_the_first():
    state = new_state()
    first, second = run(state, {"op": "grant", "ttl": 1})[1], run(state, {"op": "grant", "ttl": 1})[1]
    run(state, {"op": "put", "key": "k", "value": 1, "lease": first})
    run(state, {"op": "put", "key": "k", "value": 2, "lease": second})
    run(state, {"op": "revoke", "lease": first})
    assert run(state, {"op": "get", "key": "k"}) == ["ok", 2]


def test_bad_operations_are_answers_not_crashes():
    state = new_state()
    run(state, {"op": "put", "key": "s", "value": "text"})
    assert run(state, {"op": "incr", "key": "s"})[0] == "error"
    assert run(state, {"op": "nonsense"})[0] == "error"
    assert run(state, {"op": "grant", "ttl": -1})[0] == "error"
    assert run(state, {"op": "put", "key": 7, "value": 1})[0] == "error"  # keys are strings: range stays sound
    assert run(state, {"op": "range", "prefix": ""})[1]["items"] == {"s": "text"}
    with pytest.raises(ValueError, match="JSON"):
        check_value({"t": object()})
    with pytest.raises(ValueError, match="absent"):
        check_value(None)


def test_frames_under_another_key_or_altered_are_refused():
    frames = Frames(client_key(KEY)).encode({"seq": 1})
    assert Frames(client_key(KEY)).decode(frames) == {"seq": 1}
    with pytest.raises(FrameError, match="MAC"):
        Frames(client_key("another-job-key-0123456789")).decode(frames)
    with pytest.raises(FrameError):
        Frames(client_key(KEY)).decode([frames[0], frames[1] + b"\x00"])


def test_derived_keys_are_distinct_and_not_the_job_key():
    password = raft_password(KEY)
    assert password != KEY and bytes.fromhex(password) != client_key(KEY)
    assert KEY.encode() not in client_key(KEY) and password != raft_password("another-job-key-0123456789")


def test_specs_and_member_commands():
    with pytest.raises(ControlError, match="raft://"):
        connect("zookeeper://h:1")
    with pytest.raises(ControlError, match="HOST:PORT"):
        connect("etcd://nohost")
    assert client_address("10.0.0.1:7400") == "10.0.0.1:7401"
    argv = member_argv(1, ["a:1", "b:3", "c:5"], "/tmp/m1")
    assert argv[-6:] == ["--index", "1", "--members", "a:1,b:3,c:5", "--dir", "/tmp/m1"]


def test_shoal_run_refuses_an_unknown_control_plane_before_starting_anything(capsys, monkeypatch):
    from shoal.cli import main

    assert main(["run", "--control", "zookeeper://h:1", "examples/own_loop.py"]) == 2
    assert "--control 'zookeeper://h:1' is not raft" in capsys.readouterr().err
    # on several machines the members meet in a store on machine 0's rendezvous port + 1, under one key
    argv = ["run", "--nnodes", "2", "--rdzv-endpoint", "no-such-host.invalid:1", "--control", "raft"]
    monkeypatch.delenv("SHOAL_JOB_KEY", raising=False)
    assert main([*argv, "examples/own_loop.py"]) == 2
    assert "needs the same secret on every machine: set SHOAL_JOB_KEY" in capsys.readouterr().err
    monkeypatch.setenv("SHOAL_JOB_KEY", "k" * 32)
    assert main([*argv, "examples/own_loop.py"]) == 1
    err = capsys.readouterr().err
    assert "the control plane's members meet on machine 0's rendezvous port + 1 (no-such-host.invalid:2)" in err
