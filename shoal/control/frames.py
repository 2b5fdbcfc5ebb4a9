"""Client <-> member messages: `[HMAC-SHA256, msgpack map]`, checked before parsing.

The same rules as `shoal.comm.wire` (MAC first, msgpack with limits, never
pickle) without its tensors, so that members and clients start without
importing torch. Requests carry (session, number), so a replayed request
changes nothing (`shoal.control.state.apply`).
"""

from __future__ import annotations

import hashlib
import hmac

import msgpack

MAX_BYTES = 1 << 24
MAC_BYTES = 32


class FrameError(Exception):
    """A message to drop: wrong key, malformed, oversized."""


class Frames:
    def __init__(self, key: bytes):
        self._key = key

    def encode(self, header: dict) -> list[bytes]:
        body = bytes(msgpack.packb(header, use_bin_type=True) or b"")
        return [hmac.new(self._key, body, hashlib.sha256).digest(), body]

    def decode(self, frames: list[bytes]) -> dict:
        if len(frames) != 2 or len(frames[0]) != MAC_BYTES or len(frames[1]) > MAX_BYTES:
            raise FrameError("malformed or oversized message")
        if not hmac.compare_digest(hmac.new(self._key, frames[1], hashlib.sha256).digest(), frames[0]):
            raise FrameError("MAC does not match the job key")
        try:
            header = msgpack.unpackb(frames[1], raw=False, strict_map_key=False, max_ext_len=0)
        except Exception as exc:  # msgpack raises several types for bad input
            raise FrameError(f"not msgpack ({type(exc).__name__})") from None
        if not isinstance(header, dict):
            raise FrameError("not a map")
        return header
