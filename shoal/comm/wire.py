"""The safe wire codec: a msgpack header plus raw tensor buffers, authenticated.

A message is the ZeroMQ frames `[seal, header, buf_0, ..., buf_n-1]`, and,
under CURVE or in a private ipc:// directory only, the seal once more at the end:

- `header` is msgpack (maps, lists, strings, numbers; never pickle, no
  extension types) and lists, in `"tensors"`, the dtype and shape of each
  buffer that follows;
- each `buf_i` is the tensor's raw bytes, sent without a copy where ZeroMQ
  allows and read back without one (`torch.frombuffer` on the received frame);
- `seal`, where the codec's `Transport` is TCP without CURVE (SHOAL_CURVE=0), is
  HMAC-SHA256 under the job's secret key over the frame count and every
  frame (the buffers, then the header), each prefixed by its length, so no
  frame can be added, dropped, cut or moved without the MAC failing;
- where it is CURVE (the default) or ipc (`shoal.comm.ipc`), `seal` is an 8-byte tag, new for each
  message this codec encodes, and ends the message too: no MAC is computed.

Why no MAC under CURVE: it was half of a PS worker's CPU per step and four
fifths of a server's (docs/benchmarks-ps.md section 4), and the
connection already gives each thing it gave:

- origin: the ZAP handler admits only a peer that proves the client key,
  which only a holder of the job key can derive: the MAC's signers exactly;
- integrity: CURVE seals every frame, with its more-to-come flag, under
  per-connection keys (Poly1305), with nonces that must increase, so a frame
  cannot be changed, added, repeated or reordered. An attacker on the path
  can still delete whole frames; a message that lost one fails the tensor
  count or the byte lengths, and one spliced from two messages (the head of
  one, the tail of the next: same shapes) fails on its two tags, which differ;
- replay across connections and runs: what a recording holds is ciphertext
  under keys drawn afresh for that connection; a new connection draws new
  ones, so recorded bytes fail its handshake and no stranger can replay
  them. The `session`/`to`/`seq` checks (`shoal.comm.replay`) stay, for
  what CURVE does not cover: a member's stale messages (an old process
  under a reused key, a server restarted with a new session).

On one machine the job's sockets are `ipc://` sockets in a directory only
the user can open (`shoal.comm.ipc`), and messages carry no MAC there either,
for the same three reasons: only the user's processes can connect (and the
user can read the job key anyway); the bytes never leave the kernel, so no
one on a path can change, drop or record them; and a connection no stranger
can open cannot be replayed into. The tags and the `session`/`to`/`seq`
checks stay.

This holds only on sockets that `transport` secured (`Transport.listen`,
`Transport.connect`): the parameter server's, its clients' and the event
publish/subscribe sockets, all set up through the codec's own transport.
Frames that travel otherwise keep their own MAC: the control plane
(`shoal.control.frames`) and the rendezvous store (`shoal.ps.store`).
Both ends read SHOAL_CURVE; where they differ the CURVE handshake fails
before any message passes, and a seal of the other kind is refused with a
sentence naming SHOAL_CURVE.

`Codec.decode` checks, in this order and before building anything from the
data: the total size against the limit, the seal (so unauthenticated bytes
are never parsed where a MAC is expected), the header's shape, the dtype
allow-list, and that every buffer's length is exactly its dtype's size
times its shape's element count. Any failure raises `WireError` with a short
reason, which a server counts and drops; nothing in a message can run code.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import math
import secrets
import struct
import warnings
from collections.abc import Sequence

import msgpack
import torch

from shoal import env
from shoal.comm.keys import job_key as job_key  # re-exported: the PS modules read the key here
from shoal.comm.security import Transport
from shoal.errors import ShoalError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAC_BYTES = 32
TAG_BYTES = 8
MAX_HEADER = 1 << 20
MAX_DIMS = 8


class WireError(Exception):
    """A message that must be dropped; `reason` is a short counter name."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a CPU tensor, without a copy when it is contiguous."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else memoryview(b"")


class Codec:
    """Encodes and checks messages for one job (one key, one size limit); `transport`
    secures the sockets that carry them (CURVE keys derived from the same key, or the
    job's private ipc:// directory), and decides the seal: a MAC where the connection
    does not keep strangers out, tags where it does (see the module docstring)."""

    def __init__(self, key: bytes, max_bytes: int = 1 << 30, transport: Transport | None = None):
        self._key = key
        self.max_bytes = int(max_bytes)
        self.transport = transport or Transport.for_job(key)
        self.signed = not self.transport.authenticated
        """Whether messages carry a MAC: only where the sockets are neither CURVE nor in a private directory."""
        self._tags = itertools.count(secrets.randbits(63))

    def _buffers_mac(self, bufs):
        # The buffers first and the header last, so one pass over large buffers
        # serves many receivers whose headers differ (see `encode_many`).
        m = hmac.new(self._key, digestmod=hashlib.sha256)
        m.update(struct.pack("<I", len(bufs) + 1))
        for b in bufs:
            m.update(struct.pack("<Q", len(b)))
            m.update(b)
        return m

    @staticmethod
    def _finish(m, head) -> bytes:
        m.update(struct.pack("<Q", len(head)))
        m.update(head)
        return m.digest()

    def _mac(self, frames) -> bytes:
        """The MAC of [header, *buffers]."""
        return self._finish(self._buffers_mac(frames[1:]), frames[0])

    def encode(self, header: dict, tensors: Sequence[torch.Tensor] = ()) -> list:
        """Frames for `send_multipart`; tensor buffers are views, not copies."""
        return self.encode_many([header], tensors)[0]

    def encode_many(self, headers: list[dict], tensors: Sequence[torch.Tensor] = ()) -> list[list]:
        """One message per header, all carrying the same tensors, which are read once."""
        specs = []
        for t in tensors:
            if t.dtype not in DTYPE_NAMES:
                raise ShoalError(
                    f"tensors of dtype {t.dtype} cannot be sent to the parameter server; use one of {', '.join(DTYPES)}"
                )
            specs.append([DTYPE_NAMES[t.dtype], list(t.shape)])
        bufs = [tensor_bytes(t) for t in tensors]
        heads = [msgpack.packb({**header, "tensors": specs}, use_bin_type=True) for header in headers]
        if not self.signed:
            return [self._sealed(head, bufs) for head in heads]
        base = self._buffers_mac(bufs)
        return [[self._finish(base.copy(), head), head, *bufs] for head in heads]

    def _sealed(self, head, bufs: Sequence) -> list:
        """The frames of one message as they go on the wire: MAC'd, or between two equal tags."""
        if self.signed:
            return [self._mac([head, *bufs]), head, *bufs]
        tag = struct.pack("<Q", next(self._tags))
        return [tag, head, *bufs, tag]

    def decode(self, frames: list) -> tuple[dict, list[torch.Tensor]]:
        """(header, tensors) of a received message, or `WireError`.

        `frames` are bytes or `zmq.Frame`s (from `recv_multipart(copy=False)`);
        the tensors share memory with the frames.
        """
        bufs = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames]
        if len(bufs) < 2:
            raise WireError("malformed", "fewer than two frames")
        if sum(len(b) for b in bufs) > self.max_bytes:
            raise WireError("oversized", f"over {self.max_bytes} bytes")
        head, data = self._unseal(bufs)
        try:
            header = msgpack.unpackb(
                head,
                raw=False,
                strict_map_key=True,
                max_str_len=MAX_HEADER,
                max_bin_len=MAX_HEADER,
                max_array_len=1 << 20,
                max_map_len=1 << 16,
                max_ext_len=0,
            )
        except Exception as exc:  # msgpack raises several types for bad input
            raise WireError("malformed", f"header is not msgpack ({type(exc).__name__})") from None
        if not isinstance(header, dict):
            raise WireError("malformed", "header is not a map")
        specs = header.pop("tensors", None)
        if not isinstance(specs, list) or len(specs) != len(data):
            raise WireError("malformed", "tensor list does not match the frames")
        with warnings.catch_warnings():
            # Received frames are read-only and nothing writes into these tensors (the
            # server copies gradients into its own accumulators): torch's warning is noise.
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            tensors = [_tensor(spec, buf) for spec, buf in zip(specs, data, strict=True)]
        return header, tensors

    def _unseal(self, bufs: list[memoryview]) -> tuple[memoryview, list[memoryview]]:
        """(header, buffers) of a message whose seal is right for this codec, or `WireError`."""
        seal, head = bufs[0], bufs[1]
        if len(head) > MAX_HEADER:
            raise WireError("malformed", "header too long")
        if self.signed:
            if len(seal) == TAG_BYTES:
                raise WireError("unauthenticated", f"not signed: is {env.CURVE}=0 here but not where it was sent?")
            if len(seal) != MAC_BYTES:
                raise WireError("malformed", "bad MAC length")
            data = bufs[2:]
            if not hmac.compare_digest(self._mac([head, *data]), bytes(seal)):
                raise WireError("unauthenticated", "MAC does not match the job key")
            return head, data
        if len(seal) == MAC_BYTES:
            raise WireError("malformed", f"signed, on a CURVE socket: is {env.CURVE}=0 where it was sent but not here?")
        if len(seal) != TAG_BYTES or len(bufs) < 3 or seal != bufs[-1]:
            raise WireError("malformed", "its first and last frames differ: frames lost or spliced in transit")
        return head, bufs[2:-1]


def _tensor(spec, buf: memoryview) -> torch.Tensor:
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], list)):
        raise WireError("malformed", "tensor spec is not [dtype, shape]")
    name, shape = spec
    dtype = DTYPES.get(name)
    if dtype is None:
        raise WireError("bad_dtype", f"dtype {name!r} is not allowed")
    if len(shape) > MAX_DIMS or not all(
        isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape
    ):
        raise WireError("malformed", "bad shape")
    numel = math.prod(shape)
    if numel * dtype.itemsize != len(buf):
        raise WireError("bad_size", f"{len(buf)} bytes for {name}{shape}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buf, dtype=dtype).view(shape)
