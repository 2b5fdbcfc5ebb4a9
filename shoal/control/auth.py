"""Keys of the control plane, derived from the job key (never the raw key).

Two keys, each an HMAC-SHA256 of the job key with its own label, so that
neither reveals the job key or the other:

- the Raft password: pysyncobj encrypts and authenticates every message
  between members with Fernet (AES-128-CBC + HMAC-SHA256, checked before
  decrypting) under a key it derives from this password; its transport
  unpickles what it decrypts, so a byte that does not carry a valid
  Fernet token never reaches the unpickler and the connection is dropped;
- the client key: requests and replies between clients and members are
  msgpack frames with an HMAC (`shoal.comm.wire.Codec`); nothing is
  unpickled on that path.
"""

from __future__ import annotations

import hashlib
import hmac

from shoal.comm.keys import job_key


def derive(label: str, key: str | bytes | None = None) -> bytes:
    """HMAC-SHA256(job key, label): a key for one use."""
    return hmac.new(job_key(key), f"shoal control-plane {label}".encode(), hashlib.sha256).digest()


def raft_password(key: str | bytes | None = None) -> str:
    """The members' pysyncobj password (hex: pysyncobj wants text)."""
    return derive("raft password", key).hex()


def client_key(key: str | bytes | None = None) -> bytes:
    """The key of the client protocol's HMAC."""
    return derive("client protocol", key)
