"""A process's line in /proc/PID/stat, read in one place (Linux).

The command name in that line is in parentheses and may hold spaces or ')', so
the fields are those after the last ')': the state letter first, the parent pid next.
"""

from __future__ import annotations

from pathlib import Path


def stat_fields(pid: int) -> list[str]:
    """The fields of `pid`'s stat line after its command name ([] when it is gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return []


def state_of(pid: int) -> str:
    """`pid`'s state letter ('' when it is gone)."""
    fields = stat_fields(pid)
    return fields[0] if fields else ""


def parent_of(pid: int) -> int | None:
    """`pid`'s parent (None when it is gone)."""
    fields = stat_fields(pid)
    return int(fields[1]) if len(fields) > 1 and fields[1].isdigit() else None


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid`."""
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit() and parent_of(int(e.name)) == pid]
