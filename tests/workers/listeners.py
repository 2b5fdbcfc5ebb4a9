"""Under `shoal run`: rank 0 writes, as JSON to argv[1], every TCP socket its launcher listens on
([address, port], IPv4 as dotted quad, IPv6 as hex) and the MASTER_PORT torch's agent gave the workers."""

import json
import os
import socket
import struct
import sys
from pathlib import Path

import shoal


def _address(hex_addr: str) -> str:
    if len(hex_addr) == 8:
        return socket.inet_ntoa(struct.pack("<I", int(hex_addr, 16)))
    return hex_addr


def listeners(pid: int) -> list[list]:
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, _, port = fields[1].rpartition(":")
            if fields[3] == "0A" and fields[9] in inodes:
                found.append([_address(address), int(port, 16)])
    return found


rt = shoal.init()
if rt.rank == 0:
    result = {"launcher": listeners(os.getppid()), "master_port": int(os.environ["MASTER_PORT"])}
    Path(sys.argv[1]).write_text(json.dumps(result))
shoal.shutdown()
