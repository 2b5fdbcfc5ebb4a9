"""A user's own loop (examples/recover_loop.py, three lines of `shoal.Recovery`) survives a worker that
is SIGKILLed, and one that hangs (SIGSTOP) past the process group's timeout, under
`shoal run -n 2 --max-restarts 1`: it ends with the fault-free run's parameters, bit for bit."""

from __future__ import annotations

import pytest
import torch

from tests.helpers.cli import shoal
from tests.helpers.faults import Faults

SCRIPT = ["examples/recover_loop.py", "--steps", "12", "--every", "5"]


def run_loop(out, *, restarts: int = 0, env: dict[str, str] | None = None):
    return shoal("run", "-n", "2", "--max-restarts", restarts, *SCRIPT, "--out", out, timeout=120, env=env)


@pytest.fixture(scope="module")
def fault_free(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("loop") / "whole.pt"
    result = run_loop(out)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)


def assert_same(got: dict, want: dict) -> None:
    assert got["model"].keys() == want["model"].keys()
    for key in want["model"]:
        torch.testing.assert_close(got["model"][key], want["model"][key], atol=0, rtol=0)
    assert got["optimizer"]["state"].keys() == want["optimizer"]["state"].keys()
    for key, state in want["optimizer"]["state"].items():
        torch.testing.assert_close(got["optimizer"]["state"][key], state, atol=0, rtol=0)


@pytest.mark.parametrize("action", ["kill", "stop"])
def test_own_loop_recovers_from_a_dead_or_hung_rank_bit_identical(tmp_path, fault_free, action):
    faults = Faults(tmp_path)
    if action == "kill":
        faults.kill("worker", rank=1, step=7)
        extra = {}
    else:  # hung far longer than the 8 s timeout: the survivor's collective times out
        faults.stop("worker", rank=1, step=7, seconds=120)
        extra = {"SHOAL_TIMEOUT_S": "8"}
    result = run_loop(tmp_path / "final.pt", restarts=1, env={**faults.env(), **extra})
    assert result.returncode == 0, result.stderr[-3000:]
    faults.assert_fired("worker", 1, 7, action)  # once: the redone step 7 does not fire it again
    assert not result.survivors, f"processes outlived the job: {result.survivors}"
    # one restart, from the recovery point of step 5 (points every 5 steps; step 7 was under way)
    assert result.stdout.count("restarted: resuming at step 5") == 1, result.stdout[-3000:]
    assert_same(torch.load(tmp_path / "final.pt", weights_only=True), fault_free)
