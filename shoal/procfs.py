"""A process's line in /proc/PID/stat, read in one place (Linux).

The command name in that line is in parentheses and may hold spaces or ')', so
the fields are those after the last ')': the state letter first, the parent pid next.
"""

from __future__ import annotations

import os
import shutil
import stat
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


def remove_orphaned(folder: Path, prefix: str) -> None:
    """Remove this user's directories `<prefix><pid>-*` in `folder` whose process `pid` no longer runs:
    one that was SIGKILLed could not remove its own (a launcher's recovery points, its job's sockets)."""
    for path in folder.glob(f"{prefix}*-*"):
        pid = path.name.removeprefix(prefix).split("-")[0]
        try:
            st = path.lstat()
        except OSError:
            continue
        mine = st.st_uid == os.getuid() and stat.S_ISDIR(st.st_mode)
        if mine and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(path, ignore_errors=True)
