"""One member of the embedded control plane: a pysyncobj Raft node plus a client port.

    python -m shoal.control.member --index 0 --members H0:P0,H1:P1,H2:P2 --dir DIR

Member i speaks Raft on `Hi:Pi` and answers clients on `Hi:Pi+1` (ZeroMQ
ROUTER, msgpack frames with the control plane's HMAC). Only the leader
executes a request: it submits the operation to the Raft log and replies
when pysyncobj applies it, i.e. once a majority has it; any other member
replies with who leads. Reads go through the log too, so a leader cut off
from the majority can answer nothing (it steps down after
`LEADER_FALLBACK_S`).

The Raft journal and snapshot are files in `--dir` (made private: pysyncobj
unpickles them at start), so a restarted member keeps its term, vote and log.
The job key comes from SHOAL_JOB_KEY; the members' password is derived from it
(`shoal.control.auth`).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

import zmq
from pysyncobj import FAIL_REASON, SyncObj, SyncObjConf, SyncObjConsumer, replicated
from pysyncobj.node import TCPNode

from shoal import env
from shoal.comm.security import Transport
from shoal.comm.wire import job_key
from shoal.control import auth
from shoal.control.frames import MAC_BYTES, MAX_BYTES, FrameError, Frames
from shoal.control.launch import client_address
from shoal.control.state import apply, new_state
from shoal.errors import ShoalError

log = logging.getLogger(__name__)

# Election timing, chosen for failover within a second on a loaded machine:
# a follower waits 0.3-0.6 s without a heartbeat (every 0.02 s, so 15-30 missed)
# before it stands; a wider spread makes split votes rare.
# pysyncobj batches new entries into the next heartbeat (appendEntriesUseBatch,
# its default), so a write commits in one to two heartbeats (20-40 ms). Sending
# each entry at once (appendEntriesUseBatch=False) commits in ~3 ms, but then a
# late reply rewinds the leader's next index and followers truncate and re-append
# entries they had applied (pysyncobj logs "state machine may have diverged"):
# we keep the default.
ELECTION_MIN_S = 0.3
ELECTION_MAX_S = 0.6
HEARTBEAT_S = 0.02
LEADER_FALLBACK_S = 1.0
"""A leader that has not heard from a majority for this long steps down."""
RECONNECT_S = 0.2
TICK_S = 0.005
"""The longest a client request waits for the loop (pysyncobj's poll wait)."""
LEASE_CHECK_S = 0.05
BIND_S = 10.0
"""How long a member waits for its Raft port to be free before it says that another process holds it."""


class Store(SyncObjConsumer):
    """The replicated state; `deadlines` (local monotonic expiry per lease) is not replicated."""

    def __init__(self) -> None:
        self.deadlines: dict[int, tuple[float, int]] = {}  # set before the base class: excluded from snapshots
        self.expiring: set[tuple[int, int]] = set()
        super().__init__()
        self.state = new_state()

    @replicated
    def execute(self, client: str, seq: int, op: dict) -> object:
        result = apply(self.state, client, seq, op)
        lease_id = result[1] if op.get("op") == "grant" else op.get("lease")
        lease = self.state["leases"].get(lease_id) if isinstance(lease_id, int) else None
        if isinstance(lease_id, int) and lease is not None and op.get("op") in ("grant", "keepalive"):
            self.deadlines[lease_id] = (time.monotonic() + lease["ttl"], lease["beat"])
        return result

    def submit(self, client: str, seq: int, op: dict, callback: Callable[[object, int], None]) -> None:
        """Append `op` to the log (on the leader); `callback(result, reason)` once applied or failed."""
        self.execute(client, seq, op, callback=callback)  # pyright: ignore[reportCallIssue] (added by @replicated)


def timing() -> tuple[float, float, float]:
    """(election min, election max, heartbeat): the constants, or SHOAL_CONTROL_TIMING for a benchmark."""
    given = os.environ.get(env.CONTROL_TIMING, "")
    if not given:
        return ELECTION_MIN_S, ELECTION_MAX_S, HEARTBEAT_S
    try:
        low, high, beat = (float(x) for x in given.split(","))
    except ValueError:
        raise ShoalError(f"{env.CONTROL_TIMING}={given!r} is not MIN,MAX,HEARTBEAT in seconds; unset it") from None
    return low, high, beat


def conf(directory: Path, password: str) -> SyncObjConf:
    low, high, beat = timing()
    return SyncObjConf(
        password=password,
        autoTick=False,
        journalFile=str(directory / "journal.bin"),
        fullDumpFile=str(directory / "dump.bin"),
        raftMinTimeout=low,
        raftMaxTimeout=high,
        appendEntriesPeriod=beat,
        leaderFallbackTimeout=LEADER_FALLBACK_S,
        connectionRetryTime=RECONNECT_S,
        connectionTimeout=max(1.0, high),  # pysyncobj requires it >= the longest election timeout
        commandsWaitLeader=False,
        dynamicMembershipChange=False,
        useFork=False,
    )


class Member:
    def __init__(self, index: int, members: list[str], directory: Path, key: str | bytes | None = None):
        self.index, self.members = index, members
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(directory, 0o700)
        self.store = Store()
        others = [m for i, m in enumerate(members) if i != index]
        check_bindable(members[index])
        self.raft = SyncObj(members[index], others, conf(directory, auth.raft_password(key)), consumers=[self.store])
        self.started_term = self.raft.raftCurrentTerm  # from the journal: 0 for a new member
        self.codec = Frames(auth.client_key(key))
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_BYTES + MAC_BYTES)
        self.transport = Transport(job_key(key))  # kept: it holds the ZAP handler's thread
        self.transport.listen(self.sock)  # CURVE: no stranger's bytes are held (ZeroMQ limits only frames)
        self.sock.bind(f"tcp://{client_address(members[index])}")
        self.dropped = 0

    def serve(self) -> None:
        next_check = 0.0
        while True:
            while self.sock.poll(0):
                self.handle(self.sock.recv_multipart())
            self.raft.doTick(TICK_S)
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + LEASE_CHECK_S
                self.expire_leases()

    def handle(self, frames: list[bytes]) -> None:
        ident, body = frames[0], frames[1:]
        try:
            req = self.codec.decode(body)
            if req.get("local") is not None:
                self.answer_local(ident, req)
                return
            client, seq, op = req["client"], req["seq"], req["op"]
            if not (isinstance(client, str) and client and isinstance(seq, int) and isinstance(op, dict)):
                raise FrameError("malformed request")
        except (FrameError, KeyError) as exc:
            self.dropped += 1
            log.warning("control member %d dropped a request: %s", self.index, exc)
            return
        if not self.raft._isLeader():
            self.reply(ident, self.not_leader(seq))
            return
        self.store.submit(client, seq, op, partial(self.done, ident, seq))

    def not_leader(self, seq: object) -> dict:
        leader = self.raft._getLeader()
        hint = client_address(cast(TCPNode, leader).address) if leader is not None else None
        return {"seq": seq, "ok": False, "leader": hint, "why": "not the leader"}

    def answer_local(self, ident: bytes, req: dict) -> None:
        """A read of this member's applied state; with `leader_only`, only while it believes it leads."""
        if req.get("leader_only") and not self.raft._isLeader():
            self.reply(ident, self.not_leader(req.get("seq")))
        else:
            self.reply(ident, {"seq": req.get("seq"), "ok": True, "result": ["ok", self.local(str(req["local"]))]})

    def local(self, prefix: str) -> dict:
        """This member's own applied state under `prefix`, without Raft: possibly stale, for checks and tests."""
        items = {k: v[0] for k, v in self.store.state["kv"].items() if k.startswith(prefix)}
        term = self.raft.raftCurrentTerm
        return {"items": items, "leader": self.raft._isLeader(), "term": term, "started_term": self.started_term}

    def done(self, ident: bytes, seq: int, result: object, err: int) -> None:
        if err == FAIL_REASON.SUCCESS:
            self.reply(ident, {"seq": seq, "ok": True, "result": result})
        else:
            self.reply(ident, {"seq": seq, "ok": False, "leader": None, "why": f"not committed (reason {err})"})

    def reply(self, ident: bytes, header: dict) -> None:
        self.sock.send_multipart([ident, *self.codec.encode(header)])

    def expire_leases(self) -> None:
        """On the leader: submit an expiry for each lease whose TTL passed since its last keep-alive."""
        store = self.store
        if not self.raft._isLeader():
            store.expiring.clear()
            return
        now = time.monotonic()
        for gone in set(store.deadlines) - set(store.state["leases"]):
            del store.deadlines[gone]
        for lease_id, lease in list(store.state["leases"].items()):
            deadline, beat = store.deadlines.setdefault(lease_id, (now + lease["ttl"], lease["beat"]))
            if deadline <= now and beat == lease["beat"] and (lease_id, beat) not in store.expiring:
                store.expiring.add((lease_id, beat))
                op = {"op": "expire", "lease": lease_id, "beat": beat}
                store.submit("", 0, op, lambda *_, k=(lease_id, beat): store.expiring.discard(k))


def check_bindable(address: str, within_s: float = BIND_S) -> None:
    """ShoalError unless this member's Raft address can be bound within `within_s`. pysyncobj retries a
    failed bind forever, silently; this says it. With SO_REUSEADDR, as pysyncobj binds, so that a member
    started again on its killed predecessor's port binds it (its connections' TIME_WAIT does not hold it)."""
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + within_s
    while True:
        try:
            family, kind, proto, _, where = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)[0]
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(where)
            return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ShoalError(
                    f"cannot bind the Raft address {address} ({exc.strerror or exc}) within {within_s:g} s: another "
                    "process holds it, so this member cannot serve there (the other members know it only by it)"
                ) from None
            time.sleep(0.2)  # a port held for a moment (a connection of another process) frees itself


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shoal.control.member", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--members", required=True, help="every member's host:port, same order everywhere")
    parser.add_argument("--dir", type=Path, required=True, help="this member's private directory (journal, snapshot)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get(env.LOG_LEVEL, "WARNING"))
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    try:
        if not 0 <= args.index < len(members):
            raise ShoalError(f"--index {args.index} names no member; give 0..{len(members) - 1}")
        member = Member(args.index, members, args.dir)
    except (ShoalError, zmq.ZMQError) as exc:
        print(f"shoal control member: {exc}", file=sys.stderr)
        return 2
    print(
        f"control member {args.index} serving Raft on {members[args.index]} (term {member.started_term} from its "
        f"journal in {args.dir})",
        flush=True,
    )
    member.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
