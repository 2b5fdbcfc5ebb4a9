"""Unit tests start no processes: a test that tries fails and says where it belongs."""

from __future__ import annotations

import subprocess

import pytest


class _NoProcesses(subprocess.Popen):
    def __init__(self, args, *a, **kw):
        raise AssertionError(f"a unit test started a process ({args!r}); move the test to tests/multiproc/")


@pytest.fixture(autouse=True)
def _no_processes(monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", _NoProcesses)
