"""Who may connect to a shoal ZeroMQ socket: CURVE with a ZAP handler, keyed by the job key.

Why at the connection and not only per message: ZeroMQ limits the size of
one frame (MAXMSGSIZE), not of a multipart message, and it buffers a
message's frames until its last one arrives. Per-message MACs are checked
only then, so a stranger who never sends the last frame can make a process
hold gigabytes. With CURVE, a peer must complete a handshake that proves it
holds the job's client key before ZeroMQ reads a single message from it;
anything else is a protocol error that closes the connection at once, or a
handshake left unfinished that is closed after `HANDSHAKE_S`.

Keys: every key is derived from the job key (SHOAL_JOB_KEY) with HMAC-SHA256
and a label, so no process needs a key file and none reveals the job key:

- one server key pair for every socket that listens (parameter servers, the
  launcher's event subscriber, control-plane members); a connecting peer
  needs its public half, which only a holder of the job key can compute;
- one client key pair for every socket that connects; the ZAP handler of a
  listening socket admits that public key and no other.

CURVE also encrypts every frame with per-connection keys (XSalsa20-Poly1305)
and authenticates it, so across machines gradients and parameters no longer
travel in clear text, and bytes recorded from one connection cannot be
replayed into another; which is why, under CURVE, the wire codec signs no
message (`shoal.comm.wire` says what guarantees what). It is on by default;
SHOAL_CURVE=0 turns it off (on one machine for measurements; messages then
carry the per-message MAC again, but a stranger can make a process hold
memory again). Both ends must agree; `check_same_curve` says so in one
sentence where they do not.

On one machine a parameter-server job's sockets are instead `ipc://` sockets
in a directory only the user can open (`shoal.comm.ipc`): `Transport.for_job`
finds it in SHOAL_PS_IPC_DIR, and then neither CURVE nor a per-message MAC
is used on them, as the directory already keeps strangers out.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Mapping

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from shoal import env
from shoal.comm import ipc

log = logging.getLogger("shoal.comm.security")

HANDSHAKE_S = 5.0
"""An unauthenticated connection is closed after this long (ZeroMQ's default is 30 s)."""
HEARTBEAT_S = 10.0
"""How often a connection is pinged; a peer that answers no ping for `HEARTBEAT_TIMEOUT_S` is dropped.
ZeroMQ's I/O thread answers pings, so a peer busy in Python stays; only a vanished (or stopped) one goes.
Generous on purpose: replies queued for a dropped connection are lost, and the job's own `timeout_s`
already stops a job whose worker is gone, with a sentence that says so."""
HEARTBEAT_TIMEOUT_S = 300.0
BACKLOG = 64
"""Connections the kernel queues before ZeroMQ accepts them (ZeroMQ's default is 100)."""
DOMAIN = "shoal"


def curve_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process's sockets use CURVE: SHOAL_CURVE unset or '1' yes, '0' no."""
    value = (environ if environ is not None else os.environ).get(env.CURVE, "1").strip()
    if value not in ("0", "1"):
        from shoal.errors import ConfigError

        raise ConfigError(f"{env.CURVE} must be 0 or 1, not {value!r}", env.CURVE)
    return value == "1"


def curve_flag(environ: Mapping[str, str] | None = None) -> str:
    """How this process's parameter-server sockets are secured, as it publishes it next to an endpoint, for
    `check_same_curve`: 'ipc' in a job's private directory (`shoal.comm.ipc`), else its SHOAL_CURVE."""
    environ = os.environ if environ is None else environ
    return "ipc" if environ.get(env.PS_IPC_DIR) else f"curve={int(curve_enabled(environ))}"


def check_same_curve(flag: str, peer: str, environ: Mapping[str, str] | None = None) -> None:
    """One sentence (`ShoalError`) where `peer` published another SHOAL_CURVE (`curve_flag`) than this
    process's: with CURVE on one side only, the connection's handshake fails and no message would ever pass."""
    mine = curve_flag(environ)
    if flag != mine:
        from shoal.errors import ShoalError

        if "ipc" in (flag, mine):
            theirs, ours = ("a private ipc:// socket", "TCP") if flag == "ipc" else ("TCP", "a private ipc:// socket")
            raise ShoalError(
                f"{peer} listens on {theirs} and this process expects {ours}, so they cannot connect; start every "
                f"process of a job on one machine from one launcher (`shoal run`, `shoal train`), with the same "
                f"{env.PS_IPC} (unset means 1)"
            )
        raise ShoalError(
            f"{peer} runs with {env.CURVE}={flag.removeprefix('curve=')} and this process with "
            f"{env.CURVE}={mine.removeprefix('curve=')}, so they cannot connect; give every process of the job the "
            f"same {env.CURVE} (unset means 1)"
        )


def _secret(key: bytes, label: str) -> bytes:
    """A Z85-encoded 32-byte CURVE secret key for one role (any 32 bytes are a valid Curve25519 secret)."""
    return z85.encode(hmac.new(key, f"shoal transport {label}".encode(), hashlib.sha256).digest())


class _ClientKey:
    """The ZAP credentials check: only the job's client key is admitted."""

    def __init__(self, public: bytes):
        self.public = public

    def callback(self, domain: str, key: bytes) -> bool:
        ok = hmac.compare_digest(key, self.public)  # pyzmq hands the key over Z85-encoded
        if not ok:
            log.info("refused a connection whose CURVE key is not this job's")
        return ok


class Transport:
    """The connection security of one job's sockets (one per job key): CURVE over TCP, or
    (`private_dir`) ipc:// sockets in the job's private directory, with neither CURVE nor MAC."""

    def __init__(self, key: bytes, curve: bool | None = None, private_dir: str | None = None):
        self.private_dir = private_dir
        if private_dir is not None:
            ipc.check_dir(private_dir)
        self.curve = False if private_dir is not None else curve_enabled() if curve is None else curve
        if not self.curve:
            return
        self._server_secret = _secret(key, "curve server")
        self.server_public = zmq.curve_public(self._server_secret)
        self._client_secret = _secret(key, "curve client")
        self.client_public = zmq.curve_public(self._client_secret)
        self._auth: dict[int, ThreadAuthenticator] = {}

    @classmethod
    def for_job(cls, key: bytes, environ: Mapping[str, str] | None = None) -> Transport:
        """A parameter-server job's transport: in the private directory its launcher named
        (SHOAL_PS_IPC_DIR), else CURVE as SHOAL_CURVE says. Not for the control plane, whose
        members the launcher starts outside any such directory."""
        return cls(key, private_dir=ipc.job_dir(environ))

    @property
    def authenticated(self) -> bool:
        """Whether the connection itself keeps strangers out (CURVE, or the private directory), so
        that messages need no MAC (`shoal.comm.wire`)."""
        return self.curve or self.private_dir is not None

    def bind(self, sock: zmq.Socket, host: str, name: str, advertise: str = "") -> str:
        """Bind `sock` (after `listen`): in the private directory (a socket named after `name`), else on
        a free TCP port of `host`; the endpoint to publish (by `advertise` where given)."""
        if self.private_dir is not None:
            endpoint = ipc.endpoint(self.private_dir, name)
            sock.bind(endpoint)
            return endpoint
        port = sock.bind_to_random_port(f"tcp://{host}")
        return f"tcp://{advertise or host}:{port}"

    def listen(self, sock: zmq.Socket) -> None:
        """Make `sock` (before bind) admit only peers that hold the job's client key."""
        sock.setsockopt(zmq.HANDSHAKE_IVL, int(HANDSHAKE_S * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_S * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT_S * 1000))
        sock.setsockopt(zmq.BACKLOG, BACKLOG)
        if not self.curve:
            return
        ctx = sock.context
        if id(ctx) not in self._auth:  # one ZAP handler per context, started before the first bind
            auth = ThreadAuthenticator(ctx, log=log)
            auth.start()
            auth.configure_curve_callback(DOMAIN, credentials_provider=_ClientKey(self.client_public))
            self._auth[id(ctx)] = auth
        sock.setsockopt(zmq.ZAP_DOMAIN, DOMAIN.encode())
        sock.setsockopt(zmq.CURVE_SERVER, 1)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._server_secret)

    def connect(self, sock: zmq.Socket) -> None:
        """Make `sock` (before connect) prove the job's client key and accept only the job's servers."""
        sock.setsockopt(zmq.HEARTBEAT_IVL, int(HEARTBEAT_S * 1000))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, int(HEARTBEAT_TIMEOUT_S * 1000))
        if not self.curve:
            return
        sock.setsockopt(zmq.CURVE_SERVERKEY, self.server_public)
        sock.setsockopt(zmq.CURVE_PUBLICKEY, self.client_public)
        sock.setsockopt(zmq.CURVE_SECRETKEY, self._client_secret)

    def close(self, ctx: zmq.Context) -> None:
        """Stop `ctx`'s ZAP handler, if `listen` started one (before the context is terminated)."""
        auth = self._auth.pop(id(ctx), None) if self.curve else None
        if auth is not None:
            auth.stop()
