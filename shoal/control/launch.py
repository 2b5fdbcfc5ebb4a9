"""How a launcher starts the embedded members (the commands; starting them is the launcher's)."""

from __future__ import annotations

import sys
from pathlib import Path

MEMBERS = 3
"""Three members: any one may be lost; two lost stop the job (no majority)."""


def member_argv(index: int, members: list[str], directory: Path | str) -> list[str]:
    """The command of member `index` of `members` (host:port each), keeping its files in `directory`."""
    return [
        sys.executable,
        "-m",
        "shoal.control.member",
        "--index",
        str(index),
        "--members",
        ",".join(members),
        "--dir",
        str(directory),
    ]


def spec(members: list[str]) -> str:
    """The `connect` spec of these members."""
    return "raft://" + ",".join(members)


def client_address(raft_address: str) -> str:
    """The client endpoint of the member whose Raft address is host:port (the next port)."""
    host, port = raft_address.rsplit(":", 1)
    return f"{host}:{int(port) + 1}"
