"""Publish/subscribe for events and live metrics, on ZeroMQ PUB/SUB.

The launcher binds one `Subscriber`; servers and workers connect a
`Publisher` to it (its endpoint travels in SHOAL_PS_EVENTS: an ipc:// socket
in the job's private directory on one machine, `shoal.comm.ipc`). Messages go
through the same authenticated codec as everything else, so a stranger
cannot inject rows into the table. Publishing never blocks training: when
the subscriber is slow or gone, messages beyond the high-water mark are
dropped and counted.
"""

from __future__ import annotations

import zmq

from shoal.comm.wire import Codec, WireError


class Publisher:
    def __init__(self, endpoint: str, codec: Codec, ctx: zmq.Context | None = None):
        """`ctx`: a context shared with the process's other sockets (its owner terms it); else its own."""
        self.codec = codec
        self.own = ctx is None
        self.ctx = ctx or zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.setsockopt(zmq.LINGER, 500)
        codec.transport.connect(self.sock)
        self.sock.connect(endpoint)
        self.dropped = 0

    def publish(self, topic: str, header: dict) -> None:
        try:
            self.sock.send_multipart(
                [topic.encode(), *self.codec.encode({**header, "topic": topic})], flags=zmq.NOBLOCK
            )
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self.sock.close()
        if self.own:
            self.ctx.term()


class Subscriber:
    def __init__(self, codec: Codec, host: str = "127.0.0.1", topics: tuple[str, ...] = ("",)):
        self.codec = codec
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)
        for t in topics:
            self.sock.setsockopt(zmq.SUBSCRIBE, t.encode())
        codec.transport.listen(self.sock)  # only the job's processes connect; no stranger makes us hold memory
        self.endpoint = codec.transport.bind(self.sock, host, "events")
        self.dropped = 0

    def poll(self, timeout_ms: int = 100) -> list[dict]:
        """Every message that arrives within `timeout_ms` (and any already queued)."""
        out = []
        if not self.sock.poll(timeout_ms):
            return out
        while True:
            try:
                frames = self.sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return out
            try:
                header, _ = self.codec.decode(frames[1:])
            except WireError:
                self.dropped += 1
                continue
            out.append(header)

    def close(self) -> None:
        self.sock.close()
        self.codec.transport.close(self.ctx)
        self.ctx.term()
