"""Bad input through a real `shoal` process: exit code 2, one line, no traceback."""

from __future__ import annotations

from tests.helpers.cli import shoal


def test_cli_bad_toml_and_process_exit(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    result = shoal("train", bad, timeout=60)
    assert result.returncode == 2
    assert "is not valid TOML" in result.stderr and "Traceback" not in result.stderr
    result = shoal("train", "--data.name=imagenet", timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
