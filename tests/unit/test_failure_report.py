"""The launcher names the worker that failed by itself, not those that failed because of it."""

from __future__ import annotations

import signal
from pathlib import Path
from types import SimpleNamespace

import pytest

from shoal.errors import caused_by_peer
from shoal.launch.agent import _describe_failure, _own_errors


def failures(tmp_path: Path, ranks: dict[int, tuple[int, str]]) -> SimpleNamespace:
    """A ChildFailedError's `failures`, each rank with its exit code and the stderr it left, all at one second."""
    out = {}
    for rank, (code, stderr) in ranks.items():
        log = tmp_path / "job" / "attempt_0" / str(rank) / "stderr.log"
        log.parent.mkdir(parents=True)
        log.write_text(stderr)
        out[rank] = SimpleNamespace(exitcode=code, timestamp=1000, local_rank=rank, pid=100 + rank)
    return SimpleNamespace(failures=out)


TERMINATED = "[rank0]: torch.distributed.elastic.multiprocessing.api.SignalException: Process 100 got signal: 15\n"
ABORTED = "terminate called without an active exception\n"
PEER_CLOSED = "[rank0]: RuntimeError: [../gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:5123\n"


@pytest.mark.parametrize("secondary", [(-signal.SIGTERM, TERMINATED), (-signal.SIGABRT, ABORTED), (1, PEER_CLOSED)])
def test_a_killed_worker_is_named_not_the_one_that_lost_its_peer(tmp_path, secondary):
    err = failures(tmp_path, {0: secondary, 1: (-signal.SIGKILL, "")})
    assert _describe_failure(err, str(tmp_path)).startswith("worker rank 1 was killed by SIGKILL")


def test_a_worker_that_raised_is_named_even_when_the_agent_then_stopped_it(tmp_path):
    raised = 'Traceback (most recent call last):\n  File "x.py"\nValueError: bad batch\n'
    err = failures(tmp_path, {0: (-signal.SIGABRT, ABORTED), 1: (-signal.SIGTERM, raised)})
    assert _describe_failure(err, str(tmp_path)).startswith("worker rank 1 failed: ValueError: bad batch")


def test_peer_failures_are_recognised():
    assert caused_by_peer(PEER_CLOSED) and caused_by_peer(TERMINATED) and caused_by_peer(ABORTED)
    assert not caused_by_peer("ValueError: bad batch")


def test_a_gloo_abort_is_named_before_a_rank_the_agent_stopped(tmp_path):
    err = failures(tmp_path, {0: (-signal.SIGTERM, TERMINATED), 1: (-signal.SIGABRT, ABORTED)})
    assert _describe_failure(err, str(tmp_path)).startswith("worker rank 1 was killed by SIGABRT")


HYDRA = """[rank1]: Error executing job with overrides: ['lr=0.1']
[rank1]: Traceback (most recent call last):
[rank1]:   File "/app/train.py", line 40, in main
[rank1]:     trainer.fit()
[rank1]:   File "/app/train.py", line 21, in fit
[rank1]:     raise RuntimeError("the data set is empty")
[rank1]: RuntimeError: the data set is empty
[rank1]:
[rank1]: Set the environment variable HYDRA_FULL_ERROR=1 for a complete stack trace.
"""

LOAD_STATE = """Traceback (most recent call last):
  File "/app/mnist.py", line 120, in <module>
    model.load_state_dict(torch.load("mnist_cnn.pt"))
    ~~~~~~~~~~~~~~~~~~~~~^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  File "/venv/torch/nn/modules/module.py", line 2624, in load_state_dict
    raise RuntimeError(
RuntimeError: Error(s) in loading state_dict for Net:
\tMissing key(s) in state_dict: "conv1.weight", "conv1.bias".
\tUnexpected key(s) in state_dict: "module.conv1.weight", "module.conv1.bias".
"""

CHAINED = """Traceback (most recent call last):
  File "a.py", line 3, in <module>
    open("missing.csv")
FileNotFoundError: [Errno 2] No such file or directory: 'missing.csv'

During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "a.py", line 5, in <module>
    raise ValueError("no training data: give --data")
ValueError: no training data: give --data
"""


@pytest.mark.parametrize(
    ("stderr", "reason"),
    [
        (HYDRA, "RuntimeError: the data set is empty"),
        (LOAD_STATE, "RuntimeError: Error(s) in loading state_dict for Net: Missing key(s) in state_dict: "),
        (CHAINED, "ValueError: no training data: give --data"),
        ('Traceback (most recent call last):\n  File "a.py"\nshoal.errors.ShoalError: say it', "ShoalError: say it"),
        ("warming up\nsomething went wrong without a traceback\n", "something went wrong without a traceback"),
    ],
)
def test_the_summary_quotes_the_exception_not_the_last_line(tmp_path, stderr, reason):
    err = failures(tmp_path, {1: (1, stderr)})
    said = _describe_failure(err, str(tmp_path))
    assert said.startswith(f"worker rank 1 failed: {reason}"), said
    assert "(full log: " in said and said.endswith("stderr.log)")


def test_the_log_read_is_the_failed_runs_own_not_the_newest_in_a_shared_folder(tmp_path):
    ours = failures(tmp_path, {1: (1, 'Traceback (most recent call last):\n  File "a.py"\nValueError: ours\n')})
    other = tmp_path / "other-job" / "attempt_0" / "1" / "stderr.log"  # a later job sharing the log folder
    other.parent.mkdir(parents=True)
    other.write_text('Traceback (most recent call last):\n  File "b.py"\nKeyError: theirs\n')
    ours.failures[1].error_file = str(tmp_path / "job" / "attempt_0" / "1" / "error.json")
    assert _describe_failure(ours, str(tmp_path)).startswith("worker rank 1 failed: ValueError: ours")


def test_only_workers_that_all_raised_errors_of_their_own_are_not_restarted(tmp_path):
    raised = 'Traceback (most recent call last):\n  File "x.py"\nValueError: bad batch\n'
    said = "shoal: worker 1: parameter-server shard(s) [0] (w) lost: neither process holding them answered\n"
    for code in (1, -signal.SIGTERM):
        one_line = failures(tmp_path / f"said{code}", {0: (1, said), 1: (code, said)}).failures
        assert _own_errors(one_line, str(tmp_path / f"said{code}"))  # a shoal train worker's one line
    for code in (1, -signal.SIGTERM):  # SIGTERM: the agent ended it on its way out, after its peer exited
        own = failures(tmp_path / f"own{code}", {0: (1, PEER_CLOSED), 1: (code, raised)}).failures
        assert _own_errors(own, str(tmp_path / f"own{code}"))  # a bug, which its peer lost: a restart meets it again
    for name, ranks in {
        "killed": {0: (1, raised), 1: (-signal.SIGKILL, "")},  # the OOM killer: restart
        "peer": {0: (1, PEER_CLOSED)},  # a lost peer, a timeout (its cause not seen yet: a hang): restart
        "silent": {0: (1, "")},  # nothing said: restart
        "printed": {0: (-signal.SIGTERM, "step 5 loss 0.31\n")},  # ended from outside, no traceback: restart
    }.items():
        assert not _own_errors(failures(tmp_path / name, ranks).failures, str(tmp_path / name)), name


def test_quiet_silences_child_loggers_with_levels_of_their_own(caplog):
    import logging

    from shoal.logs import quiet

    child = logging.getLogger("shoal-test-parent.agent")
    child.setLevel(logging.INFO)  # as torch's elastic loggers do
    with quiet("shoal-test-parent"), caplog.at_level(logging.INFO):
        child.warning("Received 15 death signal, shutting down workers")
    assert "death signal" not in caplog.text
    assert child.level == logging.INFO  # back after the block
