"""A worker group started again under the same restart count keeps the earlier group's logs."""

from __future__ import annotations

from pathlib import Path

from shoal.launch.log_folders import logs_specs


def test_a_second_start_of_one_attempt_moves_the_first_ones_logs_aside(tmp_path):
    specs = logs_specs(str(tmp_path), quiet=True)
    envs = {0: {"TORCHELASTIC_RUN_ID": "run", "TORCHELASTIC_RESTART_COUNT": "0"}}
    first = specs.reify({0: dict(envs[0])})
    Path(first.stderrs[0]).write_text("the first group's last words\n")
    for _ in range(2):  # a membership change, twice: torch's agent starts attempt 0 again
        again = specs.reify({0: dict(envs[0])})
    attempt = Path(again.stderrs[0]).parents[1]
    assert attempt.name == "attempt_0" and not Path(again.stderrs[0]).exists()  # a fresh folder
    assert (attempt.parent / "attempt_0.1" / "0" / "stderr.log").read_text() == "the first group's last words\n"
    assert (attempt.parent / "attempt_0.2" / "0").is_dir()
    restarted = specs.reify({0: {**envs[0], "TORCHELASTIC_RESTART_COUNT": "1"}})  # a restart: its own folder
    assert Path(restarted.stderrs[0]).parents[1].name == "attempt_1"
