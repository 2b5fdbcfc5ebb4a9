"""Workers and servers keep the memory they free for the next step (`shoal.allocator`)."""

from __future__ import annotations

import ctypes

import pytest
import torch

from shoal import allocator, env
from shoal.errors import ConfigError


class MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


def _mallinfo() -> MallInfo2:
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = MallInfo2
    return mallinfo2()


def test_a_freed_buffer_stays_in_the_heap_for_the_next_step():
    """A 24 MiB buffer comes from the heap, not a mapping of its own (glibc's default threshold is 128 KiB,
    so its first one is mapped, then unmapped when freed), and freeing it gives nothing back to the OS."""
    assert allocator.keep_freed_memory()  # glibc took both settings
    before = _mallinfo()
    buffer = torch.ones(6 << 20)  # 24 MiB
    during = _mallinfo()
    # in the heap (maybe in space freed before), not in a mapping of its own
    assert during.hblkhd == before.hblkhd and during.uordblks >= before.uordblks + (24 << 20)
    del buffer
    after = _mallinfo()
    assert after.arena >= during.arena  # kept: the next step's buffer reuses these pages, no faults


def test_the_setting_is_checked_and_default_leaves_glibc_alone(monkeypatch):
    monkeypatch.setattr(allocator, "_done", None)
    monkeypatch.setenv(env.MALLOC, "never")
    with pytest.raises(ConfigError, match=r"SHOAL_MALLOC must be 'keep' .* or 'default'"):
        allocator.keep_freed_memory()
    monkeypatch.setenv(env.MALLOC, "default")
    monkeypatch.setattr(allocator, "_set", lambda: pytest.fail("mallopt called"))
    assert allocator.keep_freed_memory() is False


def test_a_bad_setting_stops_the_launcher_before_anything_starts(monkeypatch, capsys):
    from shoal import cli

    monkeypatch.setenv(env.MALLOC, "never")
    assert cli.main(["run", "-n", "1", "script.py"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("shoal: SHOAL_MALLOC must be 'keep'") and "Traceback" not in err
