"""A torch `TCPStore` that listens only where asked, and whose values are signed with the job key.

A TCPStore has no credentials, so anyone who reaches it can rewrite a key.
Two defences, for every store shoal opens (the parameter servers' rendezvous,
`shoal.ps.store`; the control plane's members meeting across machines,
`shoal.control.launch`):

- it listens only where asked: torch's own server binds every interface
  whatever host it is given, so `listen` binds the socket itself, to that
  host, and hands torch the descriptor (`master_listen_fd`);
- every value shoal writes is signed (`SignedStore`): HMAC-SHA256 under the
  job key over the session, the key's name and the value, checked on every
  read. A forged, unsigned or moved value stops the reader with one sentence
  instead of being trusted; the session makes a value recorded in an earlier
  run under the same key fail too.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
from collections.abc import Sequence
from datetime import timedelta

from torch.distributed import TCPStore  # pyright: ignore[reportPrivateImportUsage] -- documented, not in torch's stubs

from shoal import env
from shoal.errors import ShoalError

_DOMAIN = b"shoal-store-v1"


class SignedStore:
    """The job's store as shoal uses it: `set` signs with the job key, `get` checks the signature."""

    def __init__(self, store: TCPStore, key: bytes, session: str, address: str) -> None:
        self.raw = store
        self._key = key
        self.session = session
        self.address = address

    @property
    def port(self) -> int:
        return self.raw.port

    def _mac(self, name: str, value: bytes, session: str) -> str:
        message = b"\0".join([_DOMAIN, session.encode(), name.encode(), value])
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def signed(self, name: str, value: str, session: str | None = None) -> str:
        """`value` with its MAC in front, as stored under `name`."""
        return f"{self._mac(name, value.encode(), self.session if session is None else session)} {value}"

    def set(self, name: str, value: str, *, session: str | None = None) -> None:
        self.raw.set(name, self.signed(name, value, session))

    def get(self, name: str, *, session: str | None = None) -> str:
        """The value under `name`, or ShoalError if it is not signed by this job."""
        raw = self.raw.get(name)
        mac, _, value = raw.partition(b" ")
        want = self._mac(name, value, self.session if session is None else session).encode()
        if not hmac.compare_digest(mac, want):
            raise ShoalError(
                f"the value under {name!r} in the job's store at {self.address} is not signed with this "
                f"job's key, so it is not trusted: another process rewrote it, or this process has another "
                f"{env.JOB_KEY} than the launcher; keep the store's port closed to others and restart the job"
            )
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise ShoalError(f"the value under {name!r} in the job's store is not text") from None

    def compare_set(self, name: str, expected: str, new: str) -> bool:
        """Set `name` to `new` if it holds `expected` (both signed); whether it did. Atomic in the store."""
        signed_old, signed_new = self.signed(name, expected), self.signed(name, new)
        return self.raw.compare_set(name, signed_old, signed_new) == signed_new.encode()

    def wait(self, names: Sequence[str], timeout: timedelta) -> None:
        self.raw.wait(list(names), timeout)

    def wait_or_say(self, names: Sequence[str], timeout_s: float, sentence: str) -> None:
        """Until every one of `names` is set; ShoalError(`sentence`) if that takes over `timeout_s`."""
        try:
            self.raw.wait(list(names), timedelta(seconds=timeout_s))
        except Exception:
            raise ShoalError(sentence) from None


def open_shared(host: str, port: int, key: bytes, hosting: bool, timeout_s: float, session_key: str) -> SignedStore:
    """A store that several machines share: `hosting` (machine 0) listens on `host`:`port` only and draws
    the session, which it writes under `session_key`; the others connect and read it there. Raises
    what torch or the socket raise (the callers say in one sentence what it means for them)."""
    address = f"{host}:{port}"
    if hosting:
        store = SignedStore(listen(host, port, timeout_s, multi_tenant=True), key, secrets.token_hex(16), address)
        store.set(session_key, store.session, session="")
        return store
    raw = TCPStore(host, port, is_master=False, timeout=timedelta(seconds=timeout_s))
    store = SignedStore(raw, key, "", address)
    store.session = store.get(session_key, session="")
    return store


def listen(host: str, port: int, timeout_s: float, multi_tenant: bool = False) -> TCPStore:
    """A store server listening on `host` only (torch's own would listen on every interface);
    with `multi_tenant`, the job's store that other machines reach, so a host *name* that
    resolves only to loopback here (Debian's 127.0.1.1 for the machine's name) is refused."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(f"cannot resolve {host!r} ({exc.strerror})") from None
    if multi_tenant and not _is_ip(host) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos):
        raise OSError(f"{host!r} resolves only to loopback {infos[0][4][0]} here, which other machines cannot reach")
    last: OSError | None = None
    for family, kind, proto, _, addr in infos:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        bound = sock.getsockname()[1]
        fd = sock.detach()  # the store owns the descriptor from here on
        try:
            return TCPStore(
                host,
                bound,
                is_master=True,
                wait_for_workers=False,
                multi_tenant=multi_tenant,
                timeout=timedelta(seconds=timeout_s),
                master_listen_fd=fd,
                use_libuv=True,
            )
        except Exception:
            os.close(fd)
            raise
    why = last.strerror if last is not None and last.strerror else "no address"
    raise OSError(f"cannot listen on {host}:{port}: {why}")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True
