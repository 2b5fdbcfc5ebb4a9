"""Read what a `shoal train` run left in its run directory."""

from __future__ import annotations

from pathlib import Path

from shoal.train.checkpoint import load_tensors


def checkpoint_state(run_dir: Path, which: int = -1) -> dict:
    """The model and optimizer state of a kept checkpoint (default: the newest), as plain tensors
    (read as shoal reads it: verified, nothing unpickled but DCP's metadata classes)."""
    return load_tensors(sorted((run_dir / "checkpoints").glob("step-*"))[which])


def final_params(run_dir: Path) -> tuple[dict, dict]:
    """The newest checkpoint's model parameters and optimizer state."""
    state = checkpoint_state(run_dir)
    return dict(state["model"]), state["optim"]


def first_checkpoint_params(run_dir: Path) -> dict:
    """The model parameters of the run's oldest kept checkpoint."""
    return checkpoint_state(run_dir, 0)["model"]


def ps_train_args(steps: int) -> list[str]:
    """`shoal train` arguments of a small parameter-server job that recovery tests and the chaos
    benchmark kill parts of: 2 servers with a tensor split over both, dropout, Adam with a schedule,
    one checkpoint at the end."""
    return [
        "--strategy.name=parameter_server",
        "--strategy.servers=2",
        "--strategy.chunk_bytes=4096",
        f"--train.steps={steps}",
        f"--checkpoint.every={steps}",
        "--model.hidden=[64]",
        "--model.dropout=0.2",
        "--optimizer.name=adam",
        "--optimizer.schedule=cosine",
        "--data.batch_size=16",
        "--logging.tensorboard=false",
        "--logging.progress=false",
    ]


def train_whole_and_killed(
    run_dir: Path, args: list[str], timeout: float, rank: int = 1, step: int = 7, role: str = "worker"
):
    """`shoal train` twice in `run_dir`: fault-free ("whole") and with worker `rank` SIGKILLed at
    `step` (`role` "push": in that step's push, between two servers; `shoal.faults`) with the default
    config's restarts ("killed"); asserts both finish, the kill fired once and no process is left; the killed
    run's result."""
    from tests.helpers.cli import shoal
    from tests.helpers.faults import Faults

    whole = shoal("train", *args, f"--logging.run_dir={run_dir}", "--logging.name=whole", timeout=timeout)
    assert whole.returncode == 0, whole.stderr[-3000:]
    faults = Faults(run_dir).kill(role, rank=rank, step=step)
    killed_args = [*args, f"--logging.run_dir={run_dir}", "--logging.name=killed"]  # restarts: the default
    killed = shoal("train", *killed_args, timeout=timeout, env=faults.env())
    assert killed.returncode == 0, killed.stderr[-3000:]
    faults.assert_fired(role, rank, step, "kill")  # once: the redone step does not fire it again
    assert not killed.survivors
    return killed


def assert_same_final_state(want_dir: Path, got_dir: Path) -> None:
    """The two runs' final parameters and optimizer state are bit-identical."""
    import torch

    (want, want_opt), (got, got_opt) = final_params(want_dir), final_params(got_dir)
    assert want.keys() == got.keys() and want_opt["state"].keys() == got_opt["state"].keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], atol=0, rtol=0)
    for key in want_opt["state"]:
        torch.testing.assert_close(got_opt["state"][key], want_opt["state"][key], atol=0, rtol=0)
