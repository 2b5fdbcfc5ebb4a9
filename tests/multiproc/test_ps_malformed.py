"""A live server against a client that holds the job key but sends what no
shoal worker sends: every field wrong in type or range, optimizer switches
changed mid-run, non-finite gradients and hyperparameters. Each message is
dropped and counted, or applied as a skip, and the server goes on serving
the well-behaved worker; what cannot go on stops the job in one sentence.

The test process plays the workers (shoal.ps.client.Client) and forges with
`Client._send`, which signs with the job key and numbers messages as a real
worker does; only the server is a separate process."""

from __future__ import annotations

import time

import pytest
import torch

from shoal import env
from shoal.comm.wire import Codec
from shoal.errors import ShoalError
from shoal.ps.client import Client
from shoal.ps.store import ServerAddress
from tests.helpers.faults import Faults
from tests.helpers.procs import Processes
from tests.helpers.ps import servers

LIMIT = 1 << 20
NAN, INF = float("nan"), float("inf")


def _spec(**extra) -> dict:
    return {
        "optim": "Adam",
        "timeout_s": 30.0,
        "groups": [{"lr": 0.1, "betas": [0.9, 0.999], "eps": 1e-8, "amsgrad": False}],
        "keys": [["w", "float32", [8], "bsp", 0, 0], ["b", "float32", [2], "asp", 0, 0]],
        **extra,
    }


@pytest.fixture
def server(tmp_path):
    def start(extra_env=None):
        group = servers(procs, 1, {env.PS_MAX_BYTES: str(LIMIT), **(extra_env or {})})
        started.append(group)
        return group, group.endpoints()[0], Codec(group.job_key.encode(), LIMIT)

    started: list = []
    with Processes() as procs:
        try:
            yield start
        finally:
            for group in started:
                group.stop()


@pytest.fixture
def connect():
    """Clients that are closed at once when the test ends (a context left to the garbage collector may block)."""
    made: list[Client] = []

    def make(endpoint: ServerAddress, codec: Codec, rank: int, world: int) -> Client:
        made.append(Client([endpoint], codec, rank=rank, world=world, timeout_s=20))
        return made[-1]

    yield make
    for c in made:
        if not c.ctx.closed:
            for sock in c.socks:
                sock.close(linger=0)
            c.ctx.term()


def _push(client: Client, clock: int, grads, hp=None, **extra) -> None:
    header = {"op": "push", "clock": clock, "keys": ["w", "b"], "hp": [{"lr": 0.1}] if hp is None else hp, **extra}
    client._send(0, header, grads)


def test_malformed_but_signed_requests_are_dropped_and_the_server_keeps_serving(server, connect):
    group, endpoint, codec = server()
    client = connect(endpoint, codec, 0, 1)
    w0, b0 = torch.arange(8, dtype=torch.float32), torch.ones(2)
    client.init([_spec(max_bytes=64 << 10)], [[w0, b0]])
    g = [torch.full((8,), 0.5), torch.full((2,), -1.0)]
    forged = {
        "bad_hyperparameters": [
            [{"lr": 0.1, "amsgrad": True}],  # an Adam switch changed mid-run (needs state the server lacks)
            [{"lr": NAN}],
            [{"lr": INF}],
            [{"lr": -0.1}],
            [{"eps": -1.0}],
            [{"betas": [1.0, 0.5]}],  # beta 1 divides by zero in Adam's bias correction
            [{"betas": [0.9]}],
            [{"lr": "0.1"}],
            [{"lr": 0.1}, {"lr": 0.1}],  # a param group that does not exist
            [{"momentum": 0.9}],  # not Adam's
            "all",
        ],
    }
    for hp in forged["bad_hyperparameters"]:
        _push(client, 0, g, hp=hp)
    bad_clocks = ["0", 0.0, True, None, [0]]
    for clock in bad_clocks:
        _push(client, clock, g)  # pyright: ignore[reportArgumentType]
    for clock in ["1", 1.0]:
        client._send(0, {"op": "pull", "clock": clock})
    malformed = 0
    for skip in (1, "yes", 0):
        _push(client, 0, g, skip=skip)
        malformed += 1
    for exact in (1, "yes"):  # a pull for whole values says so with true or false
        client._send(0, {"op": "pull", "clock": 0, "exact": exact})
        malformed += 1
    # restores: optimizer state that torch's Adam cannot step from, or non-finite values
    w, b = torch.full((8,), 5.0), torch.full((2,), 3.0)
    bad_restores = [
        ([["w", ["step"]], ["b", []]], [w, torch.tensor(1.0), b]),  # Adam's step without its moments
        ([["w", ["exp_avg", "exp_avg_sq"]], ["b", []]], [w, w, w, b]),  # moments without the step
        ([["w", []], ["b", []]], [torch.full((8,), NAN), b]),
        ([["w", ["step", "exp_avg", "exp_avg_sq"]], ["b", []]], [w, torch.tensor(1.0), w * INF, w, b]),
        ([["w", ["step", "exp_avg", "exp_avg_sq"]], ["b", []]], [w, torch.tensor(-1.0), w, w, b]),
    ]
    for layout, ts in bad_restores:
        client._send(0, {"op": "restore", "state": layout}, ts)
        malformed += 1
    for world in (10**12, "2", True, 0, -1):  # a second init, with an absurd or mistyped world size
        client._send(0, {"op": "init", "world": world, "spec": _spec()})
        malformed += 1
    client._send(0, {"op": "push", "clock": 0, "keys": ["w", "b"], "hp": [{}], "pad": "x" * (80 << 10)}, g)

    # the well-behaved worker: Adam steps as torch's own do
    ref_w, ref_b = w0.clone(), b0.clone()
    ref = torch.optim.Adam([ref_w, ref_b], lr=0.1, foreach=False)

    def ref_step(gw, gb):
        ref_w.grad, ref_b.grad = gw.clone(), gb.clone()
        ref.step()

    client.push(0, [(["w", "b"], g)], [{"lr": 0.1}])
    client.request_pull(1)
    ((_, (w1, b1)),) = client.wait_pull(1)
    ref_step(*g)
    torch.testing.assert_close([w1, b1], [ref_w, ref_b], rtol=0, atol=1e-6)

    # a non-finite gradient (no compression, so no flag): applied as a skip, nothing poisoned
    client.push(1, [(["w", "b"], [torch.full((8,), NAN), torch.tensor([INF, 1.0])])], [{"lr": 0.1}])
    client.request_pull(2)
    ((_, (w2, b2)),) = client.wait_pull(2)
    torch.testing.assert_close([w2, b2], [w1, b1], rtol=0, atol=0)

    client.push(2, [(["w", "b"], g)], [{"lr": 0.05}])  # an LR schedule still drives the server
    client.request_pull(3)
    ((_, (w3, b3)),) = client.wait_pull(3)
    ref.param_groups[0]["lr"] = 0.05
    ref_step(*g)
    torch.testing.assert_close([w3, b3], [ref_w, ref_b], rtol=0, atol=1e-6)

    stats, _ = client.stats(0)
    assert stats["dropped"] == {
        "bad_hyperparameters": len(forged["bad_hyperparameters"]),
        "bad_clock": len(bad_clocks) + 2,
        "malformed": malformed,
        "oversized": 1,
    }, stats["dropped"]
    assert stats["pushed"] == [3] and stats["skipped"] == 1 and stats["nonfinite"] == 1
    assert stats["steps"] == {"w": 2, "b": 2}
    assert group.poll() == [None]


def test_a_non_finite_push_under_bsp_drops_the_clock_without_a_stall(server, connect):
    _, endpoint, codec = server()
    workers = [connect(endpoint, codec, r, 2) for r in range(2)]
    spec = {**_spec(), "optim": "SGD", "groups": [{"lr": 0.5}]}
    w0, b0 = torch.arange(8, dtype=torch.float32), torch.ones(2)
    for c in workers:
        c._send(0, {"op": "init", "world": 2, "spec": spec}, [w0, b0] if c.rank == 0 else [])
    for c in workers:
        c._collect("params", 0)
    start = time.monotonic()
    workers[0].push(0, [(["w", "b"], [torch.ones(8), torch.ones(2)])], [{"lr": 0.5}])
    workers[1].push(0, [(["w", "b"], [torch.ones(8), torch.full((2,), NAN)])], [{"lr": 0.5}])
    for c in workers:
        c.request_pull(1)
    answers = [c.wait_pull(1)[0][1] for c in workers]
    assert time.monotonic() - start < 10
    # w (bsp): the whole clock is dropped, as DP skips a step; b (asp): worker 0's step alone
    for w1, b1 in answers:
        torch.testing.assert_close([w1, b1], [w0, b0 - 0.5], rtol=0, atol=0)
    for c in workers:
        c.push(1, [(["w", "b"], [torch.full((8,), 2.0 * (c.rank + 1)), torch.zeros(2)])], [{"lr": 0.5}])
        c.request_pull(2)
    for c in workers:
        ((_, (w2, _)),) = c.wait_pull(2)
        torch.testing.assert_close(w2, w0 - 0.5 * 3.0, rtol=0, atol=0)
    stats, _ = workers[0].stats(0)
    assert stats["nonfinite"] == 1 and stats["bsp_done"] == 2 and stats["steps"]["w"] == 1


def test_the_join_phase_waits_only_timeout_s(server, connect):
    group, endpoint, codec = server()
    alone = connect(endpoint, codec, 0, 2)
    start = time.monotonic()
    with pytest.raises(ShoalError, match=r"worker\(s\) \[1\] did not join within 1.5s"):
        alone.init([_spec(timeout_s=1.5)], [[torch.zeros(8), torch.zeros(2)]])
    assert time.monotonic() - start < 10  # not SHOAL_PS_TIMEOUT_S's 60
    group.procs[0].wait(10)
    assert group.poll() == [1]


def test_max_message_mb_above_the_servers_ceiling_stops_the_job_in_one_sentence(server, connect):
    group, endpoint, codec = server()
    client = connect(endpoint, codec, 0, 1)
    with pytest.raises(ShoalError, match=r"max_message_mb \(2\) is above parameter server 0's limit of 1 MB; .*"):
        client.init([_spec(max_bytes=2 * LIMIT)], [[torch.zeros(8), torch.zeros(2)]])
    group.procs[0].wait(10)
    assert group.poll() == [1]


def test_an_unexpected_error_in_the_server_stops_the_job_at_once_in_one_sentence(server, connect, tmp_path):
    faults = Faults(tmp_path).raise_at("server", 0, 1)
    group, endpoint, codec = server(faults.env())
    client = connect(endpoint, codec, 0, 1)
    client.init([_spec()], [[torch.zeros(8), torch.zeros(2)]])
    start = time.monotonic()
    client.push(0, [(["w", "b"], [torch.ones(8), torch.ones(2)])], [{"lr": 0.1}])
    client.request_pull(1)
    with pytest.raises(ShoalError) as err:
        client.wait_pull(1)
    assert time.monotonic() - start < 10, "not after the 30 s timeout"
    faults.assert_fired("server", 0, 1, "raise")
    message = str(err.value)
    assert message.startswith("parameter server 0 stopped on an unexpected InjectedFaultError")
    assert "\n" not in message and "so the job is stopped" in message
    group.procs[0].wait(10)
    assert group.poll() == [1]


def test_a_timeout_names_the_refused_message_that_held_the_clock_back(server, connect):
    _, endpoint, codec = server()
    workers = [connect(endpoint, codec, r, 2) for r in range(2)]
    spec = _spec(timeout_s=2.0)
    for c in workers:
        c._send(0, {"op": "init", "world": 2, "spec": spec}, [torch.zeros(8), torch.zeros(2)] if c.rank == 0 else [])
    for c in workers:
        c._collect("params", 0)
    g = [(["w", "b"], [torch.ones(8), torch.ones(2)])]
    workers[0].push(0, g, [{"lr": 0.1}])
    workers[1].push(0, g, [{"lr": 0.1, "amsgrad": True}])  # turned on after prepare: refused
    workers[0].request_pull(1)
    with pytest.raises(ShoalError) as err:
        workers[0].wait_pull(1)
    assert "worker(s) [1]" in str(err.value)
    assert "worker 1's last refused message: bad_hyperparameters: amsgrad cannot change" in str(err.value)
