"""`python -m tests.workers.strangers JSON`: three strangers to a CURVE parameter server send it a
well-formed push and a stats request each, then wait a second for any answer; prints the JSON list of
which got one. JSON: endpoint, header (the server's `to` and `session`), other_key (another job's key),
server_public (the server's CURVE public key, as if learnt).

In a process of its own: libzmq 4.3.5 can abort the sending process (an assertion, zeromq/libzmq#1452)
when a peer's handshake fails while a multipart message is queued, which would end a test runner."""

import json
import sys
import time

import torch
import zmq

from shoal.comm.replay import one_time_id
from shoal.comm.security import Transport
from shoal.comm.wire import Codec


def main(args: dict) -> list[bool]:
    other = args["other_key"].encode()
    theirs = Codec(other, transport=Transport(other, curve=True))  # encodes as a CURVE member would
    public, secret = zmq.curve_keypair()
    ctx = zmq.Context()
    strangers = []
    for how in ("other job's keys", "our server key, own client key", "no CURVE"):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if how == "other job's keys":
            theirs.transport.connect(s)
        elif how == "our server key, own client key":
            s.setsockopt(zmq.CURVE_SERVERKEY, args["server_public"].encode())  # learnt somehow: ZAP still says no
            s.setsockopt(zmq.CURVE_PUBLICKEY, public)
            s.setsockopt(zmq.CURVE_SECRETKEY, secret)
        s.connect(args["endpoint"])
        strangers.append(s)
    time.sleep(0.5)
    header = args["header"]
    push = {"op": "push", "src": 0, "seq": 10**6, "clock": 0, "keys": ["w"], "hp": [{}], **header}
    for s in strangers:  # well-formed, addressed to this server and session, with fresh sequence numbers
        s.send_multipart(theirs.encode(push, [torch.full((8,), 100.0)]))
        s.send_multipart(theirs.encode({"op": "stats", "src": -1, "seq": one_time_id(), **header}))
    print("sent", flush=True)
    return [bool(s.poll(1000)) for s in strangers]


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
