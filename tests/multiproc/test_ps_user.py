"""The parameter server as users write their loop: the model holds the new
parameters right after `optimizer.step()` in every mode, and `shoal run
--servers S` sets the server count when the script does not."""

from __future__ import annotations

import numpy as np
import pytest

from tests.helpers.cli import shoal
from tests.helpers.ps import run_ps_job, server_stats
from tests.workers import ps_user
from tests.workers.ps_tasks import single_process


def _ok(job):
    assert job.codes == [0] * len(job.codes), "\n----\n".join(job.logs)


def _arrays(state: dict) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in state.items()}


def _assert_same(got: dict, want: dict, atol: float = 0.0, what: str = ""):
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(_arrays(got)[name], _arrays(want)[name], atol=atol, rtol=0, err_msg=f"{what} {name}")


def _assert_moved(after: dict, before: dict):
    """The last step changed the model (else "current" would prove nothing)."""
    a, b = _arrays(after), _arrays(before)
    assert max(float(np.abs(a[n] - b[n]).max()) for n in a) > 1e-4


def test_bsp_state_dict_right_after_step_equals_one_process():
    steps = 5
    args = {
        "optim": "adam",
        "steps": steps,
        "strategy": {"consistency": "bsp", "servers": 2, "chunk_bytes": 1024},
    }
    job = run_ps_job(2, 2, ps_user.train, args)
    _ok(job)
    want = single_process("adam", steps, world=2)
    for rank, out in enumerate(job.results):
        _assert_moved(out["after_step"], out["before_last"])
        _assert_same(out["after_step"], want, atol=1e-5, what=f"rank {rank} vs one process:")
        _assert_same(out["fresh"], out["after_step"], what=f"rank {rank} fresh pull vs after step:")


@pytest.mark.parametrize(
    "strategy",
    [
        {"consistency": "asp", "servers": 2, "chunk_bytes": 1024},
        {"consistency": "ssp", "staleness": 4, "servers": 2, "chunk_bytes": 1024},
    ],
    ids=["asp", "ssp"],
)
def test_asp_ssp_model_holds_what_the_servers_hold_after_step(strategy):
    """The ranks train one after the other, so nothing changes the servers between a
    rank's last step and its fresh pull; the last rank's model is the servers' final state."""
    steps = 4
    args = {"optim": "sgd", "steps": steps, "turns": True, "strategy": strategy}
    job = run_ps_job(2, 2, ps_user.train, args, before_stop=server_stats)
    _ok(job)
    for rank, out in enumerate(job.results):
        _assert_moved(out["after_step"], out["before_last"])
        _assert_same(out["after_step"], out["fresh"], what=f"rank {rank} after step vs fresh pull:")
    held: dict[str, dict[int, np.ndarray]] = {}  # name -> start -> the server's values of that piece
    for header, tensors in job.stats:
        assert header["pushed"] == [steps, steps]
        for key, value in zip(header["keys"], tensors, strict=True):
            name, _, start = key.partition("#")
            held.setdefault(name, {})[int(start or 0)] = np.asarray(value).ravel()
    last = _arrays(job.results[1]["after_step"])
    assert held.keys() == last.keys()
    for name, pieces in held.items():
        servers = np.concatenate([pieces[start] for start in sorted(pieces)])
        np.testing.assert_array_equal(servers, last[name].ravel(), err_msg=name)


def test_hybrid_both_workers_hold_the_servers_final_state_after_step():
    args = {
        "optim": "sgd",
        "steps": 4,
        "strategy": {"consistency": "bsp", "overrides": {"2.*": "asp"}, "servers": 1},
    }
    job = run_ps_job(2, 1, ps_user.train, args)
    _ok(job)
    for rank, out in enumerate(job.results):
        _assert_moved(out["after_step"], out["before_last"])
        _assert_same(out["after_step"], out["fresh"], what=f"rank {rank} after step vs fresh pull:")
    _assert_same(job.results[0]["after_step"], job.results[1]["after_step"], what="rank 0 vs rank 1:")


def test_asp_evaluate_scores_one_model_the_servers_current_one():
    """Under asp each worker holds what its own last pull returned; `strategy.evaluate`
    scores the same parameters on every rank, the ones a user then holds."""
    args = {"steps": 30, "strategy": {"consistency": "asp", "servers": 2}}
    job = run_ps_job(2, 2, ps_user.evaluate, args)
    _ok(job)
    first, second = job.results
    _assert_same(first["state"], second["state"], what="rank 0 vs rank 1 after evaluate:")
    assert first["evaluate"] == second["evaluate"]
    assert abs(first["by_hand"] - first["evaluate"]) < 1e-6 and first["by_hand"] == second["by_hand"]


def test_the_launchers_server_count_is_the_default(tmp_path):
    """examples/ps_loop.py as the README runs it (no `servers=`: the launcher's 2), SSP, 2 epochs."""
    example = ["examples/ps_loop.py", "--epochs", "2", "--consistency", "ssp"]
    result = shoal("run", "-n", "2", "--servers", "2", "--log-dir", tmp_path / "logs", *example)
    assert result.returncode == 0, result.stderr[-3000:]
    accuracy = float(result.stdout.strip().splitlines()[-1].split("test accuracy ")[1].split()[0])
    assert accuracy >= 0.9, result.stdout
    assert sorted(p.name for p in (tmp_path / "logs").glob("server*.log")) == ["server0.log", "server1.log"]
    assert not result.survivors

    wrong = shoal("run", "-n", "2", "--servers", "2", "tests/workers/ps_servers.py", "1")
    assert wrong.returncode != 0
    assert "the launcher started 2 parameter server(s) but the strategy asks for servers=1" in wrong.stderr, (
        wrong.stderr[-3000:]
    )
    assert "Traceback" not in wrong.stderr.split("shoal:")[-1], wrong.stderr[-3000:]
    assert not wrong.survivors


def test_a_script_that_ends_without_close_says_goodbye_and_every_rank_finishes():
    """Without a goodbye, the first rank to exit looked dead to the servers and the monitor killed the
    other before it finished (exit code 1)."""
    result = shoal("run", "-n", "2", "--servers", "1", "tests/workers/ps_no_close.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "[rank0]: done 0" in result.stdout and "[rank1]: done 1" in result.stdout, result.stdout
    assert "departed" not in result.stderr, result.stderr[-3000:]
    assert not result.survivors
