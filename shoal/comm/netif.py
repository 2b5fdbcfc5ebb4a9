"""Which address and interface of this machine face another machine.

Gloo and NCCL pick an interface from the hostname unless told
(`GLOO_SOCKET_IFNAME`, `NCCL_SOCKET_IFNAME`); on a machine whose hostname
resolves to loopback, or that has several networks, they then advertise an
address the other machines cannot reach and the job hangs in its first
collective. The launcher asks here which interface routes to the rendezvous
host and names it for them.
"""

from __future__ import annotations

import fcntl
import socket
import struct

_SIOCGIFADDR = 0x8915  # Linux: an interface's IPv4 address


def address_towards(host: str) -> str:
    """This machine's address on the route to `host` (how other machines reach it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))  # no packet is sent: this only picks the route
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


def is_this_machine(address: str) -> bool:
    """Whether IPv4 `address` is this machine's own: loopback, or held by one of its interfaces."""
    return address.startswith("127.") or interface_of(address) is not None


def interface_of(address: str) -> str | None:
    """The name of the interface that holds IPv4 `address`, or None (not Linux, or no such interface)."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this one
                continue
            if socket.inet_ntoa(raw[20:24]) == address:
                return name
    return None


def interface_towards(host: str) -> str | None:
    """The interface on the route to `host`, or None where it cannot be told."""
    return interface_of(address_towards(host))
