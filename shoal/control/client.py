"""The client of the embedded control plane: finds the leader, retries, gives up in time.

A request goes to the member believed to lead. A member that does not lead
answers with who does (or that nobody does yet); a member that does not answer
within `TRY_S` is skipped. The same request number is sent on every try, so
the members apply it at most once whatever the retries. After `timeout`
seconds without a committed answer the call raises `ControlError`: the
operation was not acknowledged (it may still commit later, once, if a
majority returns).

One client is one session: its calls are serialized (a lock), so it can be
shared by threads.
"""

from __future__ import annotations

import secrets
import threading
import time
from typing import Any

import zmq

from shoal.comm.security import Transport
from shoal.comm.wire import job_key
from shoal.control import auth
from shoal.control.base import ControlError, ControlPlane
from shoal.control.frames import FrameError, Frames
from shoal.control.launch import client_address
from shoal.control.state import check_value

TIMEOUT_S = 10.0
"""How long a call waits for a majority before it raises."""
TRY_S = 0.3
"""How long one member has to answer before the client tries the next (a commit takes milliseconds)."""
CONNECT_S = 0.1
"""How long the client waits for a connection to a member (refused at once when the member is dead)."""
RETRY_PAUSE_S = 0.02


class RaftControl(ControlPlane):
    """`RaftControl(["h0:p0", "h1:p1", "h2:p2"])`: the members' Raft addresses, as given to them."""

    def __init__(self, members: list[str], key: str | bytes | None = None, timeout: float = TIMEOUT_S):
        if len(members) < 1:
            raise ControlError("the control plane needs the addresses of its members; give raft://H:P,H:P,H:P")
        self.members = list(members)
        self.endpoints = [client_address(m) for m in members]
        self.codec = Frames(auth.client_key(key))
        self.transport = Transport(job_key(key))  # CURVE: members let in only the job's processes
        self.timeout = timeout
        self.session = secrets.token_hex(8)
        self.seq = 0
        self.leader = 0
        self.ctx = zmq.Context()
        self.socks: dict[int, zmq.Socket] = {}
        self.lock = threading.Lock()

    # ----------------------------------------------------------- interface
    def get(self, key: str) -> Any:
        return self._call({"op": "get", "key": key})

    def put(self, key: str, value: Any, lease: int | None = None) -> None:
        check_value(value)
        self._call({"op": "put", "key": key, "value": value, "lease": lease})

    def delete(self, key: str) -> bool:
        return self._call({"op": "delete", "key": key})

    def compare_and_set(self, key: str, expected: Any, new: Any, lease: int | None = None) -> bool:
        if new is not None:
            check_value(new)
        return self._call({"op": "cas", "key": key, "expected": expected, "new": new, "lease": lease})

    def incr(self, key: str) -> int:
        return self._call({"op": "incr", "key": key})

    def range(self, prefix: str) -> dict[str, Any]:
        return self._call({"op": "range", "prefix": prefix})["items"]

    def grant(self, ttl: float) -> int:
        return self._call({"op": "grant", "ttl": float(ttl)})

    def keep_alive(self, lease: int) -> bool:
        return self._call({"op": "keepalive", "lease": lease})

    def revoke(self, lease: int) -> bool:
        return self._call({"op": "revoke", "lease": lease})

    def local(self, member: int, prefix: str = "", timeout: float = 2.0) -> dict:
        """Member `member`'s own applied keys under `prefix` (`items`), whether it leads, its term.

        Not linearizable (a follower applies a commit one heartbeat later); for checks
        that every member holds a write, and for monitoring.
        """
        with self.lock:
            self.seq += 1
            answer = self._try(member, self.codec.encode({"local": prefix, "seq": self.seq}), self.seq, timeout)
        if answer is None:
            self._drop(member)
            raise ControlError(f"control member {self.members[member]} did not answer within {timeout:g} s")
        return answer["result"][1]

    def close(self) -> None:
        for sock in self.socks.values():
            sock.close(linger=0)
        self.socks.clear()
        self.ctx.term()

    # ------------------------------------------------------------- request
    def _sock(self, i: int) -> zmq.Socket:
        if i not in self.socks:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.IMMEDIATE, 1)  # queue nothing for a member that is not connected
            self.transport.connect(sock)
            sock.connect(f"tcp://{self.endpoints[i]}")
            self.socks[i] = sock
        return self.socks[i]

    def _drop(self, i: int) -> None:
        """Forget member i's socket and whatever it still queues for a dead peer."""
        sock = self.socks.pop(i, None)
        if sock is not None:
            sock.close(linger=0)

    def _poll(self, prefix: str) -> dict[str, Any]:
        """`watch`'s reads: the leader's applied state, without a log entry per poll (see `local`)."""
        return self._call({"op": "range"}, {"local": prefix, "leader_only": True})["items"]

    def _call(self, op: dict, local: dict | None = None) -> Any:
        with self.lock:
            self.seq += 1
            header = {**local, "seq": self.seq} if local else {"client": self.session, "seq": self.seq, "op": op}
            frames = self.codec.encode(header)
            end = time.monotonic() + self.timeout
            while time.monotonic() < end:
                answer = self._try(self.leader, frames, self.seq, min(TRY_S, end - time.monotonic()))
                if answer is None:  # no answer: that member is down or cut off
                    self._drop(self.leader)
                    self.leader = (self.leader + 1) % len(self.endpoints)
                elif answer.get("ok"):
                    status, result = answer["result"]
                    if status != "ok":
                        raise ControlError(f"the control plane refused {op['op']}: {result}")
                    return result
                elif answer.get("leader") in self.endpoints:
                    self.leader = self.endpoints.index(answer["leader"])
                    time.sleep(RETRY_PAUSE_S if answer.get("why") != "not the leader" else 0)
                else:  # an election is under way, or the leader could not commit
                    self.leader = (self.leader + 1) % len(self.endpoints)
                    time.sleep(RETRY_PAUSE_S)
            raise ControlError(
                f"the control plane did not acknowledge {op['op']} within {self.timeout:g} s: no leader with a "
                f"majority of the members {', '.join(self.members)} answered; restart the lost members or "
                f"restore the network between them (2 of 3 must be up and reachable)"
            )

    def _try(self, i: int, frames: list, seq: int, wait: float) -> dict | None:
        sock = self._sock(i)
        if not sock.poll(int(min(CONNECT_S, wait) * 1000) + 1, zmq.POLLOUT):
            return None
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            return None
        until = time.monotonic() + wait
        while (left := until - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                return None
            try:
                answer = self.codec.decode(sock.recv_multipart())
            except FrameError:
                continue  # not from a member of this job
            if answer.get("seq") == seq:
                return answer
        return None


def connect(spec: str, key: str | bytes | None = None, timeout: float = TIMEOUT_S) -> ControlPlane:
    """The control plane named by `spec`: raft://H:P,H:P,H:P (embedded members) or etcd://HOST:PORT."""
    scheme, sep, rest = spec.partition("://")
    if sep and scheme == "raft" and rest:
        return RaftControl(rest.split(","), key=key, timeout=timeout)
    if sep and scheme == "etcd" and rest:
        from shoal.control.etcd import EtcdControl

        return EtcdControl(rest, timeout=timeout)
    raise ControlError(f"unknown control plane {spec!r}: give raft://H:P,H:P,H:P or etcd://HOST:PORT")
