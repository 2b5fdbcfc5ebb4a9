"""The real-style scripts under examples/, run as a user runs them (`shoal run`), per strategy.

Each is a script from pytorch/examples or the DDP tutorials, ported by changing
its constructor; what they do wrong under a strategy must stop with one sentence.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.helpers.cli import shoal

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def accuracy(stdout: str) -> float:
    return float(re.findall(r"final accuracy ([0-9.]+)", stdout)[-1])


@pytest.mark.parametrize(
    ("strategy", "servers"), [("data_parallel", 0), ("parameter_server", 1), ("pipeline", 0), ("sharded", 0)]
)
def test_mnist_trains_saves_and_reloads_into_the_plain_net(tmp_path, strategy, servers):
    saved = tmp_path / "mnist_cnn.pt"
    args = ["run", "-n", 2, "--servers", servers, EXAMPLES / "mnist.py", "--epochs", 2, "--strategy", strategy]
    done = shoal(*args, "--save-model", "--model-path", saved, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "departed" not in done.stderr, "a worker that ended its script looked dead to the servers"
    assert accuracy(done.stdout) > 0.8 and saved.exists()
    assert "reloaded into a plain Net" in done.stdout


def test_mnist_under_tensor_parallel_says_why_not(tmp_path):
    done = shoal("run", "-n", 2, EXAMPLES / "mnist.py", "--epochs", 1, "--strategy", "tensor_parallel", timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr.splitlines()[-1]
    assert "split" in done.stderr.splitlines()[-1], done.stderr[-2000:]


def test_multigpu_torchrun_resumes_from_its_snapshot_without_losing_a_batch(tmp_path):
    snapshot = tmp_path / "snapshot.pt"
    script = [EXAMPLES / "multigpu_torchrun.py"]
    first = shoal("run", "-n", 2, *script, 2, 1, "--snapshot", snapshot, "--optimizer", "adamw", timeout=180)
    assert first.returncode == 0, first.stderr[-3000:]
    steps = 2048 // (32 * 2)  # per epoch: the peek at a batch (next(iter(loader))) takes none
    assert f"ran {2 * steps} steps" in first.stdout
    again = shoal("run", "-n", 2, *script, 3, 1, "--snapshot", snapshot, "--optimizer", "adamw", timeout=180)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Resuming training from snapshot at Epoch 2" in again.stdout and f"ran {steps} steps" in again.stdout


def test_word_language_model_hand_update_runs_under_dp_and_the_parameter_server_asks_for_an_optimizer(tmp_path):
    script = EXAMPLES / "word_language_model.py"
    done = shoal("run", "-n", 2, script, "--epochs", 2, "--steps", 10, "--save", tmp_path / "m.pt", timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "best valid loss" in done.stdout and (tmp_path / "m.pt").exists()
    ps = shoal("run", "-n", 2, "--servers", 1, script, "--strategy", "parameter_server", "--steps", 5, timeout=180)
    assert ps.returncode == 1 and "prepare_optimizer(optimizer)" in ps.stderr.splitlines()[-1], ps.stderr[-2000:]
